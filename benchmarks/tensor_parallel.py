"""Tensor parallelism on this machine (chapter 12): SmolLM2-135M, one process against world sizes 1 and 3.

    python benchmarks/tensor_parallel.py [--tokens 16] [--repeats 3]

For each world size, `run_tensor_parallel(..., "profile")` starts the gloo processes, each loading its slice of the
GGUF file, and rank 0 times a forward of `--tokens` tokens (best of `--repeats`, after a warm-up): the total, the
seconds inside the collectives, and the bytes it handed to them. The bytes are checked against
`tp_bytes_per_token`. One process (no torch.distributed) is the baseline. On a machine with fewer cores than
processes the collectives' time is mostly waiting for the slowest rank: read the chapter's notes.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads: no spinning on a shared VM

import torch

from course_lib import fetch_smollm2, load_gguf_model
from course_lib.parallel.launch import run_tensor_parallel
from course_lib.parallel.tensor import tp_bytes_per_token


def one_process(tokens, repeats):
    model = load_gguf_model(fetch_smollm2(progress=False), max_seq_len=256)
    with torch.inference_mode():
        model(tokens)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            runs.append(time.perf_counter() - start)
    return min(runs), model.args


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    tokens = torch.randint(0, 49152, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    alone, args = one_process(tokens, a.repeats)
    print(f"{'setup':>14s} {'ms/forward':>11s} {'in collectives':>15s} {'all-reduce B/token':>19s} "
          f"{'per layer':>10s} {'all-gather B/token':>19s}")
    print(f"{'one process':>14s} {alone * 1e3:11.1f} {'-':>15s} {'-':>19s} {'-':>10s} {'-':>19s}")
    for world_size in (1, 3):
        prof = run_tensor_parallel("smollm2", world_size, "profile", max_seq_len=256, tokens=tokens, repeats=a.repeats)
        want = tp_bytes_per_token(args, world_size)
        reduced, gathered = prof["bytes_reduced"] // a.tokens, prof["bytes_gathered"] // a.tokens
        assert (reduced, gathered) == (want["all_reduce"], want["all_gather"]), (reduced, gathered, want)
        share = prof["comm_seconds"] / prof["seconds"]
        print(f"{f'world size {world_size}':>14s} {prof['seconds'] * 1e3:11.1f} {share:15.0%} {reduced:19d} "
              f"{want['all_reduce_per_layer']:10d} {gathered:19d}")


if __name__ == "__main__":
    main()
