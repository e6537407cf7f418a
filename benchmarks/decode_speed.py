"""Greedy decoding speed of SmolLM2-135M on CPU: course_lib against transformers, same GGUF weights.

    python benchmarks/decode_speed.py [--new-tokens 128] [--runs 5] [--threads 2]

Both decode `--new-tokens` tokens after the same prompt, in float32 on the CPU with `--threads`
threads, and neither stops at the end-of-sequence token (transformers: min_new_tokens =
max_new_tokens; course_lib: eos_id=None), so both do the same work. Each run times one whole call:
the prompt's prefill, then every decode step. The implementations take turns, run after run, so
that whatever else the machine is doing slows them alike; the medians, the best runs and the
ratios are printed, the ratio also per round (both sides of a round saw the same machine load).
A shared machine slows some seconds and not others, so the script also times every decode step on
its own (from one new token to the next: for transformers, between calls of a logits processor that
only takes the time; for course_lib, between the ids generate_tokens yields) and prints the median
step of each implementation over all runs: a burst of load moves a few steps, not the median.
course_lib runs twice: "plain", the model of chapters 04-06 as the loader returns it, and "fused", after
chapter 07c's `fuse_model(model)`: the same weights, each layer's wq, wk, wv (and w1, w3) as one matrix,
every matrix stored as the transpose of an (in, out) matrix.
Needs transformers (a dev dependency) and the cached model (`python -m course_lib fetch`).
"""
import argparse
import copy
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # the GGUF file is local; never touch the network
os.environ.setdefault("TQDM_DISABLE", "1")        # no progress bars from transformers' GGUF loader
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from course_lib.fused import fuse_model
from course_lib.generation import generate_tokens
from course_lib.gguf_tokenizer import GGUFTokenizer
from course_lib.weights import fetch_smollm2, load_gguf_model, read_gguf

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def load_transformers(path: Path):
    import gguf
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # transformers rebuilds gguf's (pure) tensor-name map once per tensor; memoizing it saves ~10 s of loading
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each implementation (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = fetch_smollm2()
    gf = read_gguf(path)
    prompt = GGUFTokenizer(gf).encode(PROMPT)
    max_seq_len = len(prompt) + args.new_tokens
    ours = load_gguf_model(gf, max_seq_len=max_seq_len).eval()
    ours_fused = fuse_model(copy.deepcopy(ours))
    hf = load_transformers(path)

    steps = {}                                          # name -> seconds between consecutive new tokens

    def run_ours(model, name=None):
        ids, stamps = [], []
        for i in generate_tokens(model, prompt, args.new_tokens, method="greedy", eos_id=None):
            stamps.append(time.perf_counter())
            ids.append(i)
        if name is not None:
            steps.setdefault(name, []).extend(b - a for a, b in zip(stamps, stamps[1:]))
        return ids

    import transformers
    stamps = []

    class Stamp(transformers.LogitsProcessor):          # called once per new token, right after the forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run_hf(name=None):
        stamps.clear()
        x = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=gf.metadata["tokenizer.ggml.eos_token_id"],
                              logits_processor=transformers.LogitsProcessorList([Stamp()]))
        if name is not None:
            steps.setdefault(name, []).extend(b - a for a, b in zip(stamps, stamps[1:]))
        return out[0, len(prompt):].tolist()

    contenders = {"transformers": run_hf, "course_lib plain": lambda name=None: run_ours(ours, name),
                  "course_lib fused": lambda name=None: run_ours(ours_fused, name)}
    outputs = {name: fn() for name, fn in contenders.items()}          # warm-up: caches, allocator, kernels
    lengths = {name: len(o) for name, o in outputs.items()}
    assert set(lengths.values()) == {args.new_tokens}, lengths
    # transformers forbids eos until the end (min_new_tokens), course_lib does not: compare up to the first eos
    eos = gf.metadata["tokenizer.ggml.eos_token_id"]
    ref = outputs["transformers"]
    agree = next((i for i, (a, b) in enumerate(zip(ref, outputs["course_lib plain"])) if a != b), len(ref))
    agree_fused = next((i for i, (a, b) in enumerate(zip(ref, outputs["course_lib fused"])) if a != b), len(ref))
    first_eos = outputs["course_lib plain"].index(eos) if eos in outputs["course_lib plain"] else None

    times = {name: [] for name in contenders}
    for _ in tqdm(range(args.runs), desc="alternating runs", unit="run", file=sys.stderr):
        for name, fn in contenders.items():                             # take turns, run after run
            t0 = time.perf_counter()
            fn(name)
            times[name].append(time.perf_counter() - t0)

    rate = {name: [args.new_tokens / t for t in ts] for name, ts in times.items()}
    median = {name: statistics.median(r) for name, r in rate.items()}
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers_version()}")
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens (greedy, eos ignored), "
          f"{args.runs} alternating runs each; tokens/s = new tokens / time of the whole call")
    print(f"same greedy tokens as transformers: plain {agree}/{len(ref)}, fused {agree_fused}/{len(ref)}"
          + (f" (course_lib chose eos at position {first_eos}; transformers may not before the end)"
             if first_eos is not None and min(agree, agree_fused) < len(ref) else ""))
    print(f"{'tokens/s':>20} {'median':>7} {'best':>6}   runs")
    for name in contenders:
        print(f"{name:>20} {median[name]:7.1f} {max(rate[name]):6.1f}   " + " ".join(f"{r:.1f}" for r in rate[name]))
    for name in ("course_lib plain", "course_lib fused"):
        rounds = [a / b for a, b in zip(rate[name], rate["transformers"])]   # same round: same machine load
        print(f"{name + ' / transformers':>32}: {median[name] / median['transformers']:.2f}x (medians), "
              f"per round " + " ".join(f"{r:.2f}" for r in rounds) + f", median {statistics.median(rounds):.2f}x")
    step = {name: statistics.median(s) for name, s in steps.items()}
    print(f"decode steps alone (median of {len(steps['transformers'])} per implementation, "
          f"from one new token to the next):")
    for name in contenders:
        q = statistics.quantiles(steps[name], n=10)
        print(f"{name:>20} {1e3 * step[name]:6.1f} ms  = {1 / step[name]:5.1f} tokens/s"
              f"   (10% of steps under {1e3 * q[0]:.1f} ms, 10% over {1e3 * q[-1]:.1f} ms)")
    for name in ("course_lib plain", "course_lib fused"):
        print(f"{name + ' / transformers':>32}: {step['transformers'] / step[name]:.2f}x (median decode steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
