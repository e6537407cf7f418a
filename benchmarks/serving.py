"""Serving 16 requests of mixed lengths with SmolLM2 on the CPU: one at a time, as one static batch, through the
Engine (continuous batching over a paged KV cache), and with transformers' batched generate, in one run.

    python benchmarks/serving.py [--requests 16] [--runs 3] [--threads 2] [--max-batch-size 8]

Every request arrives at time 0 and asks for its own number of greedy tokens (end-of-sequence ignored, so all
implementations do the same useful work). Throughput = the tokens the requests asked for / wall time. Latency =
the time from the start until a request has all its tokens; a static batch hands every answer back at the end.
A static batch decodes as many steps as its longest request and throws the rest away: that is its waste.
The implementations take turns, run after run; medians are printed. Chapter 11 (notebooks/11_batching.ipynb).
Then, in the same run, speculative decoding against plain decoding (chapter 11b; benchmarks/speculative.py).
"""
import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from course_lib import GGUFTokenizer, fetch_smollm2, generate_tokens, load_gguf_model, read_gguf
from course_lib.serving import Engine, generate_batch
from course_lib.serving.batch import left_pad

TEXTS = ["The capital of France is", "Once upon a time, a robot", "def fibonacci(n):", "List three colors:",
         "Water boils at", "The best way to learn a language is", "Three facts about the moon:",
         "Translate 'good morning' into Spanish:", "Write a haiku about autumn.", "The history of Rome began",
         "In machine learning, overfitting means", "A recipe for pancakes needs", "My favourite book is",
         "Explain photosynthesis to a child:", "The tallest mountain in the world", "Dear diary, today I"]
NEW_TOKENS = [16, 64, 32, 48, 16, 64, 32, 48, 24, 56, 40, 24, 16, 64, 32, 48]


def sequential(model, prompts, n_new):
    t0, done = time.perf_counter(), []
    for p, n in zip(prompts, n_new):
        out = list(generate_tokens(model, p, n))
        done.append(time.perf_counter() - t0)
    return out, done


def static_batch(model, prompts, n_new):
    t0 = time.perf_counter()
    generate_batch(model, prompts, max(n_new))
    return None, [time.perf_counter() - t0] * len(prompts)


def engine(model, prompts, n_new, max_batch_size):
    eng, t0 = Engine(model, max_batch_size=max_batch_size, page_size=16), time.perf_counter()
    ids = [eng.add_request(p, n) for p, n in zip(prompts, n_new)]
    done = {}
    while eng.has_unfinished_requests():
        eng.step()
        for i in ids:
            if i not in done and eng.finish_reason(i) is not None:
                done[i] = time.perf_counter() - t0
    return None, [done[i] for i in ids]


def transformers_batch(hf, prompts, n_new):
    tokens, valid = left_pad(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids=tokens, attention_mask=valid.long(), max_new_tokens=max(n_new),
                    min_new_tokens=max(n_new), do_sample=False, pad_token_id=0)
    return None, [time.perf_counter() - t0] * len(prompts)


def load_transformers(path):
    import gguf
    import transformers
    transformers.logging.set_verbosity_error()
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8, help="the Engine's (a second row uses all requests)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-speculative", action="store_true", help="skip the speculative-decoding table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = fetch_smollm2()
    gf = read_gguf(path)
    tok = GGUFTokenizer(gf)
    texts = (TEXTS * (args.requests // len(TEXTS) + 1))[:args.requests]
    n_new = (NEW_TOKENS * (args.requests // len(NEW_TOKENS) + 1))[:args.requests]
    prompts = [tok.encode(t) for t in texts]
    model = load_gguf_model(gf, max_seq_len=max(map(len, prompts)) + max(n_new)).eval()
    runs = {
        "one at a time": functools.partial(sequential, model),
        "static batch (all)": functools.partial(static_batch, model),
        f"Engine (max_batch_size={args.max_batch_size})": functools.partial(engine, model,
                                                                           max_batch_size=args.max_batch_size),
        f"Engine (max_batch_size={args.requests})": functools.partial(engine, model, max_batch_size=args.requests),
    }
    if not args.no_transformers:
        hf = load_transformers(path)
        runs["transformers generate (all, left-padded)"] = functools.partial(transformers_batch, hf)
    # same greedy tokens: the Engine against one at a time (the tests check this too)
    eng = Engine(model, max_batch_size=args.max_batch_size)
    ids = [eng.add_request(p, n) for p, n in zip(prompts, n_new)]
    while eng.has_unfinished_requests():
        eng.step()
    same = sum(eng.output(i) == list(generate_tokens(model, p, n)) for i, p, n in zip(ids, prompts, n_new))
    results = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, run in runs.items():                    # alternate: machine load hits all alike
            results[name].append(run(prompts, n_new)[1])
    useful = sum(n_new)
    print(f"SmolLM2-135M-Instruct float32, CPU, {args.threads} threads, torch {torch.__version__}"
          + ("" if args.no_transformers else f", transformers {__import__('transformers').__version__}"))
    print(f"{len(prompts)} requests, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{min(n_new)}-{max(n_new)} new tokens each ({useful} in all), greedy; median of {args.runs} runs")
    print(f"Engine's greedy tokens equal one-at-a-time decoding for {same}/{len(prompts)} requests")
    print(f"{'':42s} {'tokens/s':>9s} {'wall s':>7s} {'mean latency s':>15s} {'p90 latency s':>14s}")
    base = None
    for name, rs in results.items():
        walls = [max(r) for r in rs]
        wall = statistics.median(walls)
        mean_lat = statistics.median(statistics.mean(r) for r in rs)
        p90 = statistics.median(sorted(r)[int(0.9 * (len(r) - 1))] for r in rs)
        rate = useful / wall
        base = base or rate
        print(f"{name:42s} {rate:9.1f} {wall:7.1f} {mean_lat:15.1f} {p90:14.1f}   {rate / base:4.1f}x")
    if not args.no_speculative:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import speculative
        print(f"\nspeculative decoding (chapter 11b), one request at a time: {len(speculative.PROMPTS)} prompts × 64 "
              f"new tokens, k=4, target float32 fused, median of {args.runs} runs")
        print(speculative.table(speculative.measure(64, args.runs, 4, args.threads, progress=lambda s: None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
