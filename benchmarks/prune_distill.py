"""Pruning and distillation of SmolLM2-135M on WikiText-2, CPU (chapter 13b): the long version of the notebook.

    python benchmarks/prune_distill.py [--quick] [--only prune|distill] [--eval-tokens 2048] [--steps 40]

Data: `data/wikitext-2-test.txt` cut once by characters. The first 90 % gives the calibration tokens of the
importance scores and the distillation's training windows; the last 10 % gives the evaluation tokens, which no
score and no training step reads.

Pruning table: the dense model, unstructured magnitude pruning at 30 % and 50 % per matrix (dense tensors: the
same bytes and the same kernels), and structured cuts from one calibration pass (`importance_scores`):
KV groups, feed-forward channels, whole layers, and the `student` mix. Each row: distinct parameters, MB of
weights, median ms of a 128-token prefill and per greedy decode step (KV cache), perplexity, KL(dense || cut)
and top-1 agreement on the evaluation tokens in windows of --context.

Distillation table: the student trained --steps steps twice from the same pruned weights, with the same windows
(a batch is a function of seed and step) and learning rate: cross-entropy alone, and `distillation_loss`
(alpha·T²·KL(teacher || student) + (1 - alpha)·CE). The tied embedding/output matrix is frozen. Recovered:
(ppl_pruned - ppl_after) / (ppl_pruned - ppl_dense). A last row fine-tunes the dense model itself the same way:
what the same steps on WikiText give a model that lost nothing (domain adaptation, not recovery).
`--only prune` reruns just the pruning table (its timings want a quiet machine).
"""
import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads: no spinning on a shared VM

import torch

from course_lib.gguf_format import read_gguf
from course_lib.gguf_tokenizer import GGUFTokenizer
from course_lib.quant_model import weight_bytes
from course_lib.training.distill import distillation_loss, recovered_fraction
from course_lib.training.prune import (compare_to_reference, decode_timing, importance_scores, magnitude_prune,
                                       parameter_count, prune_model, reference_logits)
from course_lib.weights import fetch_smollm2, load_gguf_model

CUTS = {"30 KV groups": dict(kv_groups=30), "45 KV groups": dict(kv_groups=45),
        "30% FFN": dict(ffn_fraction=0.3), "50% FFN": dict(ffn_fraction=0.5),
        "6 layers": dict(n_layers=6), "10 layers": dict(n_layers=10),
        "student": dict(kv_groups=15, ffn_fraction=0.2, n_layers=3)}
STUDENT = CUTS["student"]


def load_data(encode, eval_tokens: int, train_chars: int):
    "(train_ids, eval_ids): tokens of the first 90 % (its first train_chars characters) and of the last 10 %."
    text = (ROOT / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    eval_ids = torch.tensor(encode(text[split:][:eval_tokens * 6]))[:eval_tokens]
    if len(eval_ids) < eval_tokens:
        raise SystemExit(f"the last 10% gave only {len(eval_ids)} tokens, fewer than --eval-tokens {eval_tokens}")
    return torch.tensor(encode(text[:split][:train_chars])), eval_ids


def row(model, eval_ids, context, ref, repeats) -> dict:
    return {"params": parameter_count(model), "mb": weight_bytes(model) / 1e6, **decode_timing(model, repeats=repeats),
            **compare_to_reference(model, eval_ids, context, ref)}


def pruning_table(model, scores, eval_ids, context, ref, repeats) -> dict:
    "Every row, printed as soon as it is measured."
    print("| cut | params | MB | prefill 128 ms | decode ms/token | perplexity | KL vs dense | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    builds = {"dense": lambda: model}
    for s in (0.3, 0.5):
        builds[f"magnitude {s:.0%}"] = lambda s=s: magnitude_prune(copy.deepcopy(model), s)
    for name, how in CUTS.items():
        builds[name] = lambda how=how: prune_model(model, scores, **how)
    rows = {}
    for name, build in builds.items():
        r = rows[name] = row(build(), eval_ids, context, ref, repeats)
        print(f"| {name} | {r['params'] / 1e6:.1f} M | {r['mb']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | "
              f"{r['perplexity']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} |", flush=True)
    return rows


def distill(model, scores, train_ids, eval_ids, context, ref, args) -> dict:
    from course_lib.training.data import TokenData
    from course_lib.training.train import train
    data = TokenData(train_ids[256:], train_ids[:256])                    # "val": the calibration windows
    student = prune_model(model, scores, **STUDENT)
    rows = {"dense": compare_to_reference(model, eval_ids, context, ref),
            "pruned student": compare_to_reference(student, eval_ids, context, ref)}
    runs = [(f"+ {args.steps} steps cross-entropy", student, None),
            (f"+ {args.steps} steps distillation (T={args.temperature}, alpha={args.alpha})", student,
             distillation_loss(model, args.temperature, args.alpha))]
    if not args.no_dense_finetune:   # how much a few steps on WikiText help the unpruned model: domain adaptation
        runs.append((f"dense + {args.steps} steps cross-entropy (not pruned)", model, None))
    for name, start, loss_fn in runs:
        m = copy.deepcopy(start).train().requires_grad_(True)
        m.tok_embeddings.weight.requires_grad_(False)                     # tied: the output matrix too
        t0 = time.perf_counter()
        train(m, data, args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=0,
              seed=0, loss_fn=loss_fn, progress=False)
        seconds = time.perf_counter() - t0
        rows[name] = {**compare_to_reference(m.eval(), eval_ids, context, ref), "s_per_step": seconds / args.steps}
        del m
    return rows


def print_distillation(rows: dict) -> None:
    dense, pruned = rows["dense"]["perplexity"], rows["pruned student"]["perplexity"]
    print("| model | perplexity | KL vs dense | top-1 | recovered | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        rec = f"{recovered_fraction(dense, pruned, r['perplexity']):.2f}" if name.startswith("+") else ""
        step = f"{r['s_per_step']:.1f}" if "s_per_step" in r else ""
        print(f"| {name} | {r['perplexity']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {rec} | {step} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 eval tokens, 2 steps of 2 x 32")
    p.add_argument("--only", choices=["prune", "distill"], help="one table only (default: both)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5, help="timing runs per row (median)")
    p.add_argument("--no-dense-finetune", action="store_true",
                   help="skip the last row: the dense model fine-tuned on the same steps (domain adaptation)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.eval_tokens, args.context, args.steps, args.batch_size, args.seq_len, args.repeats = 256, 128, 2, 2, 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    gguf = fetch_smollm2(progress=False)
    model = load_gguf_model(gguf, max_seq_len=512).eval()
    train_ids, eval_ids = load_data(GGUFTokenizer(read_gguf(gguf)).encode, args.eval_tokens, 300_000)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average before {os.getloadavg()[0]:.2f}")
    print(f"# eval: {len(eval_ids)} tokens of the last 10% in windows of {args.context}; "
          f"calibration: 2 x 128 tokens of the first 90%")
    scores = importance_scores(model, train_ids[:256].view(2, 128))
    ref = reference_logits(model, eval_ids, args.context)
    if args.only in (None, "prune"):
        print("\n## Pruning\n")
        pruning_table(model, scores, eval_ids, args.context, ref, args.repeats)
    if args.only in (None, "distill"):
        print(f"\n## Distillation: student {STUDENT}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
              f"lr {args.lr}, embedding frozen\n")
        print_distillation(distill(model, scores, train_ids, eval_ids, args.context, ref, args))
    print(f"\n# total {time.perf_counter() - t_start:.0f} s, load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
