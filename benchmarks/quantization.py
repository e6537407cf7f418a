"""Chapter 08's measurements on SmolLM2-135M, in one run: weight memory, decode speed and quality of
course_lib in float32 / bfloat16 / q8_0 / q4_0 / q4_1, of `transformers` float32, and of llama.cpp
(`llama-cpp-python`, when installed) on the same GGUF file.

    python benchmarks/quantization.py                      # full: 128 tokens, 5 alternating runs, 8192 eval tokens
    python benchmarks/quantization.py --tokens 64 --runs 3 --eval-tokens 2048    # quicker

Speed: greedy decoding of --tokens tokens after a short prompt (prefill once, then one token per step
through the KV cache), decode time only, --threads threads; each run times every variant once, in turn,
and the table shows the median over runs (alternating runs spread any background load over all variants).
Quality: on data/wikitext-2-test.txt, non-overlapping windows of --context tokens: perplexity, and against
course_lib's float32 model the mean KL divergence of the next-token distribution and top-1 agreement.
The shipped weights are already Q4_1: "float32" means dequantized Q4_1.
"""
import argparse
import copy
import os
import warnings
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from course_lib.c_step import find_c_compiler  # noqa: E402
from course_lib.evaluation import compare_models, matching_prefix, perplexity  # noqa: E402
from course_lib.fast_cpu import FastQuantModel  # noqa: E402
from course_lib.quant_model import quantize_model, set_matmul, weight_bytes  # noqa: E402
from course_lib.weights import fetch_smollm2, load_gguf_model, read_gguf  # noqa: E402


def encoder(path):
    try:
        from course_lib.gguf_tokenizer import GGUFTokenizer
        return GGUFTokenizer(read_gguf(path)).encode, "course_lib.gguf_tokenizer"
    except ImportError:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return (lambda s: tok(s, add_special_tokens=False)["input_ids"]), "transformers"


@torch.no_grad()
def decode_course(model, prompt, n):
    "Seconds for n greedy decode steps after a prefill of prompt; and the tokens."
    ids = torch.tensor([prompt])
    logits = model(ids, 0)[:, -1]
    out, pos = [], ids.shape[1]
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, pos)[:, -1]
        pos += 1
    return time.perf_counter() - t0, out


@torch.no_grad()
def decode_hf(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    toks = []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(int(nxt))
        out = model(nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return time.perf_counter() - t0, toks


def decode_llama_cpp(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    toks = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = llm.sample(top_k=1, temp=0.0)
        toks.append(int(tok))
        llm.eval([tok])
    return time.perf_counter() - t0, toks


class HFAsCourse(torch.nn.Module):
    "transformers model with course_lib's call signature, for perplexity()."
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens, start_pos=0):
        return self.hf(tokens).logits.float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=8192, help="0 skips the quality columns")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--with-dequant", action="store_true", help="also time the slow dequantize-every-call baseline")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = fetch_smollm2(progress=False)
    encode, tok_name = encoder(path)
    prompt = encode("The history of the city of Rome begins")
    base = load_gguf_model(path, max_seq_len=max(a.context, len(prompt) + a.tokens + 8)).eval()

    def to_dtype(m, dtype):   # half-precision weights; the RoPE table stays complex float32
        with warnings.catch_warnings():   # .to() warns that it drops the table's imaginary part
            warnings.simplefilter("ignore")
            out = copy.deepcopy(m).to(dtype)
        out.freqs_cis = m.freqs_cis.clone()
        return out
    course = {"float32": base, "bfloat16": to_dtype(base, torch.bfloat16), "float16": to_dtype(base, torch.float16)}
    for scheme in ("q8_0", "q4_0", "q4_1"):
        course[scheme] = quantize_model(copy.deepcopy(base), scheme, "q8_0", matmul="fast")
    for scheme in ("q8_0", "q4_0", "q4_1"):   # the lean decoder over the same blocks (notebook 08): torch path
        course[f"{scheme} lean"] = FastQuantModel(course[scheme], kernel="torch")
    for scheme in ("q8_0", "q4_0", "q4_1"):   # ... and the whole decode step in C
        course[f"{scheme} C"] = FastQuantModel(course[scheme], kernel="c")
    if a.with_dequant:
        course["q4_1 dequant"] = set_matmul(quantize_model(copy.deepcopy(base), "q4_1", "q8_0"), "dequant")
    runners = {f"course_lib {k}": (lambda m=m: decode_course(m, prompt, a.tokens)) for k, m in course.items()}
    mem = {f"course_lib {k}": weight_bytes(m) / 1e6 for k, m in course.items()}

    hf = None
    if not a.no_hf:
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   torch_dtype=torch.float32).eval()
            runners["transformers float32"] = lambda: decode_hf(hf, prompt, a.tokens)
            mem["transformers float32"] = sum(p.numel() * p.element_size() for p in hf.parameters()) / 1e6
        except Exception as e:  # noqa: BLE001
            print(f"transformers skipped: {type(e).__name__}: {e}")
    llama_note = "llama.cpp: not installed (pip install llama-cpp-python)"
    if not a.no_llama_cpp:
        try:
            from llama_cpp import Llama
            llm = Llama(model_path=str(path), n_threads=a.threads, n_threads_batch=a.threads, n_ctx=512,
                        verbose=False)
            runners["llama.cpp Q4_1 (same GGUF)"] = lambda: decode_llama_cpp(llm, prompt, a.tokens)
            mem["llama.cpp Q4_1 (same GGUF)"] = path.stat().st_size / 1e6
            import llama_cpp
            info = llama_cpp.llama_print_system_info()
            info = (info.decode() if isinstance(info, bytes) else str(info)).strip().rstrip("|").strip()
            llama_note = f"llama.cpp: llama-cpp-python {llama_cpp.__version__} ({info})"
        except ImportError:
            pass

    # speed: alternating runs, one warm-up each
    times = {k: [] for k in runners}
    tokens = {}
    for name, run in runners.items():
        tokens[name] = run()[1]
    for _ in tqdm(range(a.runs), desc="speed runs", unit="run", file=sys.stderr):
        for name, run in runners.items():
            times[name].append(run()[0])

    # quality
    text = (ROOT / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8")
    ids = torch.tensor(encode(text[: a.eval_tokens * 6]))[: a.eval_tokens]
    quality = {}
    if a.eval_tokens:
        quality["course_lib float32"] = {"perplexity": perplexity(base, ids, a.context, progress=True), "kl": 0.0, "top1": 1.0}
        for k, m in course.items():
            if k != "float32" and not k.endswith("dequant"):
                quality[f"course_lib {k}"] = compare_models(m, base, ids, a.context, progress=True)
    if hf is not None and a.eval_tokens:
        quality["transformers float32"] = {"perplexity": perplexity(HFAsCourse(hf), ids, a.context, progress=True)}

    ref_tokens = tokens["course_lib float32"]
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF; 'float32' = dequantized Q4_1); torch {torch.__version__}, "
          f"{a.threads} threads; {a.tokens} decode tokens, median of {a.runs} alternating runs; "
          f"quality on {len(ids)} WikiText-2 test tokens ({tok_name} tokenizer), windows of {a.context}; {llama_note}")
    c_models = [m for m in course.values() if getattr(m, "kernel", None) == "c"]
    if c_models:
        print(f"course_lib C step: {c_models[0].c_step.simd} matvecs, compiled with {find_c_compiler()}")
    print(f"{'':>28} {'weights MB':>10} {'tok/s':>7} {'(min-max)':>13} {'same greedy':>11} {'perplexity':>10} "
          f"{'KL':>8} {'top-1':>6}")
    for name in runners:
        tps = [a.tokens / t for t in times[name]]
        q = quality.get(name, {})
        same = matching_prefix(tokens[name], ref_tokens)
        fmt = lambda key, f: format(q[key], f) if key in q else "-"
        print(f"{name:>28} {mem[name]:>10.0f} {statistics.median(tps):>7.1f} "
              f"{f'({min(tps):.0f}-{max(tps):.0f})':>13} {f'{same}/{a.tokens}':>11} {fmt('perplexity', '.3f'):>10} "
              f"{fmt('kl', '.5f'):>8} {fmt('top1', '.4f'):>6}")
    print("weights MB: what the forward pass reads (course_lib fast paths: the int4-packed copy, or bf16 for "
          "q8_0; the GGUF blocks kept for saving are not counted; C: the repacked GGUF blocks, one Q8_0 matrix for "
          "embedding and output); llama.cpp: the GGUF file. "
          "same greedy: leading tokens identical to course_lib float32.")


if __name__ == "__main__":
    main()
