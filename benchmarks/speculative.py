"""Speculative decoding against plain greedy decoding on SmolLM2-135M, CPU (chapter 11b).

    python benchmarks/speculative.py [--new-tokens 64] [--runs 3] [--k 4] [--threads 2]

The target is SmolLM2-135M-Instruct in float32 after chapter 07c's `fuse_model` (what the CLI decodes with).
Plain decoding is `generate_tokens`; speculative decoding is `speculative_generate` with these drafts:
- `layer skip N`: the target's first N of 30 layers, its final norm and output (`layer_skip_draft`), at two depths;
- `q4_0 fast` / `q4_1 fast`: a 4-bit copy (`quantize_model`) run by chapter 08b's `FastQuantModel`. The GGUF file
  stores Q4_1, so the q4_1 copy is almost the target itself (a best case); q4_0 re-rounds every weight.
Every implementation decodes the same prompts, greedy, eos ignored, and must give plain decoding's tokens.
The implementations take turns, run after run (a burst of load slows them alike), and the medians are printed
with the speed-up over plain decoding, the acceptance rate and the new tokens per target forward.
`measure(...)` returns the rows as dicts, for another benchmark script.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads: no spinning on a shared VM

import torch

from course_lib.fast_cpu import FastQuantModel
from course_lib.fused import fuse_model
from course_lib.generation import generate_tokens
from course_lib.quant_model import quantize_model
from course_lib.serving.speculative import layer_skip_draft, speculative_generate
from course_lib.weights import fetch_smollm2, load_gguf_model

PROMPTS = [[504, 3575, 282, 4649, 314],                     # "The capital of France is"
           [1604, 3987, 46477, 24, 94, 727],                # "def fibonacci(n):"
           [6403, 1980, 253, 655, 28, 665, 436, 253]]       # "Once upon a time, there was a"
SKIP_DEPTHS = (20, 26)


def build_drafts(target) -> dict:
    "name -> draft decoder, in the order of the table."
    drafts = {f"layer skip {n}": layer_skip_draft(target, n) for n in SKIP_DEPTHS}
    for scheme in ("q4_0", "q4_1"):
        drafts[f"{scheme} fast"] = FastQuantModel(quantize_model(copy.deepcopy(target), scheme))
    return drafts


def _plain(target, new_tokens):
    return [list(generate_tokens(target, p, new_tokens)) for p in PROMPTS], None


def _speculative(target, draft, new_tokens, k):
    outs, stats = [], []
    for p in PROMPTS:
        tokens, s = speculative_generate(target, draft, p, new_tokens, k=k)
        outs.append(tokens)
        stats.append(s)
    return outs, stats


def measure(new_tokens: int = 64, runs: int = 3, k: int = 4, threads: int = 2, progress=print) -> list:
    """Rows (dicts) of: name, tokens_per_s (median), seconds (each run), speedup (plain median / this median),
    acceptance_rate, tokens_per_target_forward, same_tokens (as plain greedy decoding)."""
    torch.set_num_threads(threads)
    target = fuse_model(load_gguf_model(fetch_smollm2(progress=False), max_seq_len=256))
    drafts = build_drafts(target)
    impls = {"plain": lambda: _plain(target, new_tokens)}
    impls.update({name: (lambda d=d: _speculative(target, d, new_tokens, k)) for name, d in drafts.items()})
    with torch.inference_mode():
        for fn in impls.values():                                 # warm-up, and the C kernels compiled
            fn()
    seconds = {name: [] for name in impls}
    results = {}
    for r in range(runs):
        for name, fn in impls.items():                            # alternate: the same load for everyone
            t0 = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
        progress(f"run {r + 1}/{runs}: " + ", ".join(f"{n} {s[-1]:.2f}s" for n, s in seconds.items()))
    plain_tokens, plain_median = results["plain"][0], statistics.median(seconds["plain"])
    rows = []
    for name in impls:
        outs, stats = results[name]
        median = statistics.median(seconds[name])
        judged = sum(s.accepted + s.rejected for s in stats) if stats else 0
        rows.append({
            "name": name, "k": None if stats is None else k, "seconds": seconds[name],
            "tokens_per_s": len(PROMPTS) * new_tokens / median, "speedup": plain_median / median,
            "acceptance_rate": sum(s.accepted for s in stats) / judged if judged else None,
            "tokens_per_target_forward": (sum(s.new_tokens for s in stats) / sum(s.target_forwards for s in stats))
            if stats else 1.0,
            "same_tokens": outs == plain_tokens,
        })
    return rows


def table(rows: list) -> str:
    lines = [f"{'':>16} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9} {'tokens/pass':>12}  same tokens  runs (s)"]
    for r in rows:
        acc = "" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
        lines.append(f"{r['name']:>16} {r['tokens_per_s']:9.1f} {r['speedup']:8.2f}x {acc:>9} "
                     f"{r['tokens_per_target_forward']:12.2f}  {str(r['same_tokens']):>11}  "
                     + " ".join(f"{s:.2f}" for s in r["seconds"]))
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"SmolLM2-135M-Instruct (float32, fused) as the target, CPU, {args.threads} threads, torch {torch.__version__}; "
          f"{len(PROMPTS)} prompts x {args.new_tokens} new tokens (greedy, eos ignored), k={args.k}, "
          f"{args.runs} alternating runs; tokens/s from the median run")
    rows = measure(args.new_tokens, args.runs, args.k, args.threads, progress=lambda s: print(s, file=sys.stderr))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
