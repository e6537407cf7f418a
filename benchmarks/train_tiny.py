"""Training chapter 13's tiny Llama on tinyshakespeare for longer than the notebook does, with the course's training
code and, in the same run, with PyTorch's and transformers' built-ins on the same batches, side by side.

    python benchmarks/train_tiny.py [--steps 1500] [--eval-every 250] [--threads 2] [--only course|reference]

Both runs start from the same weights (GPT-2 init, seed 0) and see the same batches (TokenData.batch: a function of
(seed, step)). The course's run: course_lib.train (cross_entropy, AdamW, cosine_schedule, clip_grad_norm). The
reference run: torch.nn.functional.cross_entropy, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and transformers'
get_cosine_with_min_lr_schedule_with_warmup. Printed: the validation loss at each evaluation for both, the final
training/validation losses and their gap, bits per character against nanoGPT's published Shakespeare figures, and
training tokens per second. Chapter 13 (notebooks/13_training.ipynb).
"""
import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from course_lib import ModelArgs, Tokenizer, Transformer, count_parameters, train_sentencepiece
from course_lib.training import bits_per_character, evaluate_loss, init_weights, text_data, train

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
NANOGPT = [("nanoGPT baby char model, CPU, ~3 min (README)", 1.88),
           ("nanoGPT 10.7 M char model, A100, ~3 min (README)", 1.4697)]
HP = dict(batch_size=16, seq_len=128, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, seed=0)


def fresh_model(vocab_size: int) -> Transformer:
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, vocab_size=vocab_size,
                     max_seq_len=HP["seq_len"], tie_embeddings=True)
    torch.manual_seed(0)
    return init_weights(Transformer(args), seed=0)


def course_run(data, vocab_size, steps, eval_every):
    model = fresh_model(vocab_size)
    log = train(model, data, steps, eval_every=eval_every, progress=False, **HP)
    return model, log.val_steps, log.val_loss, log.train_loss, log.tokens_per_second


def reference_run(data, vocab_size, steps, eval_every):
    "The same run from PyTorch's and transformers' parts."
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    model = fresh_model(vocab_size)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": HP["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=HP["lr"], betas=HP["betas"])
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, steps // 20, steps, min_lr=HP["lr"] / 10)
    val_steps, val_loss, train_loss, seconds, tokens = [], [], [], 0.0, 0
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = data.batch("train", step, HP["batch_size"], HP["seq_len"], HP["seed"])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HP["grad_clip"])
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        tokens += x.numel()
        train_loss.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val_steps.append(step + 1)
            val_loss.append(evaluate_loss(model, data, "val", 8, HP["batch_size"], HP["seq_len"]))
    return model, val_steps, val_loss, train_loss, tokens / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["course", "reference"], default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads, "
          f"load average before {os.getloadavg()[0]:.2f}")
    tokenizer = Tokenizer(train_sentencepiece(DATA, Path(tempfile.mkdtemp()) / "shakespeare", 1024))
    data = text_data(DATA, tokenizer)
    val_chars = len(tokenizer.decode(data.val.tolist()))
    print(f"model: {count_parameters(fresh_model(1024).args):,} parameters; {a.steps} steps x "
          f"{HP['batch_size'] * HP['seq_len']:,} tokens = {a.steps * HP['batch_size'] * HP['seq_len'] / len(data.train):.1f} "
          f"epochs of {len(data.train):,} training tokens")
    runs = {}
    for key, name, fn in (("course", "course_lib", course_run), ("reference", "PyTorch + transformers", reference_run)):
        if a.only not in (None, key):
            continue
        t = time.time()
        runs[name] = fn(data, 1024, a.steps, a.eval_every)
        print(f"{name}: {time.time() - t:.0f} s")
    print("\nvalidation loss (nats per token) at each evaluation:")
    names = list(runs)
    print("step   " + "".join(f"{n:>24s}" for n in names))
    for i, step in enumerate(runs[names[0]][1]):
        print(f"{step:5d}  " + "".join(f"{runs[n][2][i]:24.4f}" for n in names))
    print()
    print(f"{'':48s}{'train loss*':>12s}{'val loss':>10s}{'gap':>7s}{'bits/char':>10s}{'tokens/s':>10s}")
    for n in names:
        _, _, val, tr, tps = runs[n]
        last_train = sum(tr[-50:]) / len(tr[-50:])
        print(f"{n:48s}{last_train:12.3f}{val[-1]:10.3f}{val[-1] - last_train:7.3f}"
              f"{bits_per_character(val[-1], len(data.val), val_chars):10.2f}{tps:10,.0f}")
    for n, loss in NANOGPT:
        print(f"{n:48s}{'':12s}{loss:10.3f}{'':7s}{loss / math.log(2):10.2f}   (nats per character)")
    print("* mean of the last 50 steps' training losses")
    if len(names) == 2:
        d = max(abs(x - y) for x, y in zip(runs[names[0]][2], runs[names[1]][2]))
        print(f"largest difference between the two runs' validation losses: {d:.2e}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
