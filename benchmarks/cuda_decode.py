"""Chapter 09 on a GPU: kernel bandwidth against the peak, quantized matrix-vector products against cuBLAS
float16, and end-to-end decode speed. Writes data/benchmarks/<gpu>.json and .png figures; prints the tables.

    python benchmarks/cuda_decode.py              # the full run (a few minutes on an H100)
    python benchmarks/cuda_decode.py --quick      # fewer shapes, configurations and tokens
    python benchmarks/cuda_decode.py --dry-run    # no GPU: every section once on the CPU emulator, tiny shapes

Shapes are written "out x in" (PyTorch's weight layout, (out_features, in_features)): Llama-2-7B's wq is
4096 x 4096, w1/w3 11008 x 4096 (in = 4096, out = 11008), w2 4096 x 11008, the output 32000 x 4096.
Times come from CUDA events around `--iters` launches after warm-up; bandwidth = bytes the kernel must read
and write / time. Tokens/s = new tokens / decode time (the prompt's prefill excluded).
"""
import argparse
import copy
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.cuda import (CudaQuantModel, FP32_PEAK_FLOPS, MATVEC_INTENSITY, backend_status, cuda_argmax,  # noqa: E402
                             cuda_attention, cuda_embedding, cuda_qmatvec, cuda_rms_norm, cuda_rope_kv_cache,
                             cuda_swiglu, decode_bytes_per_token, empty, format_benchmark, get_backend, peak_bandwidth,
                             plot_roofline, random_quant_matrix, random_state, to_device, tokens_per_second_bound)
from course_lib.model import PRESETS, ModelArgs  # noqa: E402

SCHEMES = ("q8_0", "q4_0", "q4_1")
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]     # (out, in)


# ---------------------------------------------------------------- timing

class Timer:
    "Median-free, event-based: total time of `iters` launches / iters, after `warmup` launches."
    def __init__(self, backend, iters, warmup):
        self.backend, self.iters, self.warmup = backend, iters, warmup

    def __call__(self, fn) -> float:
        b = self.backend
        for _ in range(self.warmup):
            fn()
        if b.name != "cupy":                       # the emulator: wall clock, meaningless but it runs
            t = time.perf_counter()
            for _ in range(self.iters):
                fn()
            return (time.perf_counter() - t) / self.iters
        import cupy
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        with b.stream():
            start.record()
            for _ in range(self.iters):
                fn()
            stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / self.iters


def torch_timer(fn, iters, warmup) -> float:
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


# ---------------------------------------------------------------- sections

def environment(backend) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if backend.name == "cupy":
        import cupy
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        env.update(cupy=cupy.__version__, driver=_version(rt.driverGetVersion()), cuda=_version(rt.runtimeGetVersion()),
                   gpu=name, sms=props["multiProcessorCount"])
    else:
        env.update(cupy="-", driver="-", cuda="-", gpu="CPU emulator (dry run)")
    return env


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def bench_matvec(backend, timer, shapes, configs, peak, torch_ok) -> tuple:
    "Every format at every shape, each (warps_per_block, rows_per_warp) config; the best one per pair."
    rows_out, kernels = [], []
    rng = random_state(backend, 0)
    for out_f, in_f in shapes:
        x = to_device(backend, np.random.default_rng(0).standard_normal(in_f).astype(np.float32))
        y = empty(backend, (out_f,))
        for scheme in SCHEMES:
            W = random_quant_matrix(backend, out_f, in_f, scheme, rng)
            nbytes = W.nbytes + 4 * (in_f + out_f)
            sweep = []
            for wpb, rpw in configs:
                launch = cuda_qmatvec(backend, W, x, y, warps_per_block=wpb, rows_per_warp=rpw, run=False)
                sweep.append({"warps_per_block": wpb, "rows_per_warp": rpw, "seconds": timer(launch)})
            best = min(sweep, key=lambda s: s["seconds"])
            row = {"shape": f"{out_f} x {in_f}", "format": scheme, "seconds": best["seconds"],
                   "bytes_per_s": nbytes / best["seconds"], "best": best, "sweep": sweep,
                   "fraction_of_peak": nbytes / best["seconds"] / peak if peak else None}
            rows_out.append(row)
            kernels.append({"name": f"qmatvec_{scheme} {out_f}x{in_f}", "seconds": best["seconds"],
                            "bytes_per_s": row["bytes_per_s"], "intensity": 2 * out_f * in_f / nbytes,
                            "flops_per_s": 2 * out_f * in_f / best["seconds"]})
            del W
        if torch_ok:
            w16 = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            x16 = torch.randn(1, in_f, device="cuda", dtype=torch.float16)
            s = torch_timer(lambda: F.linear(x16, w16), timer.iters, timer.warmup)
            nbytes = 2 * (out_f * in_f + in_f + out_f)
            rows_out.append({"shape": f"{out_f} x {in_f}", "format": "f16 (cuBLAS)", "seconds": s,
                             "bytes_per_s": nbytes / s, "fraction_of_peak": nbytes / s / peak if peak else None})
            kernels.append({"name": f"torch f16 {out_f}x{in_f}", "seconds": s, "bytes_per_s": nbytes / s,
                            "intensity": 2 * out_f * in_f / nbytes, "flops_per_s": 2 * out_f * in_f / s})
            del w16
    return rows_out, kernels


def bench_small_kernels(backend, timer, args: ModelArgs, cache_lens) -> list:
    "RMSNorm, RoPE + cache write, attention at several cache lengths, SwiGLU, embedding row, argmax (7B shapes)."
    b, hd, out = backend, args.head_dim, []
    d, hidden, n_h, n_kv = args.dim, args.ffn_hidden_dim, args.n_heads, args.n_kv_heads
    rng = np.random.default_rng(1)
    vec = lambda n: to_device(b, rng.standard_normal(n).astype(np.float32))
    x, w, o = vec(d), vec(d), empty(b, (d,))
    out.append(("rms_norm", cuda_rms_norm(b, x, w, o, 1e-5, run=False), 12 * d))
    max_seq = max(cache_lens)
    cache_k, cache_v = (to_device(b, rng.standard_normal((n_kv, max_seq, hd)).astype(np.float32)) for _ in range(2))
    qkv = vec((n_h + 2 * n_kv) * hd)
    cos, sin = vec(max_seq * hd // 2).reshape(max_seq, hd // 2), vec(max_seq * hd // 2).reshape(max_seq, hd // 2)
    pos = to_device(b, np.array([max_seq // 2], np.int32))
    out.append(("rope_kv_cache", cuda_rope_kv_cache(b, qkv, cos, sin, pos, cache_k, cache_v, n_h, n_kv, hd, run=False),
                4 * (qkv.size * 2 + hd * (n_h + n_kv))))
    att = empty(b, (n_h * hd,))
    for length in cache_lens:
        p = to_device(b, np.array([length - 1], np.int32))
        out.append((f"attention len={length}", cuda_attention(b, qkv, cache_k, cache_v, p, att, n_h, n_kv, hd, run=False),
                    4 * (2 * n_kv * length * hd + 2 * n_h * hd)))
    h13, g = vec(2 * hidden), empty(b, (hidden,))
    out.append(("swiglu", cuda_swiglu(b, h13, g, run=False), 12 * hidden))
    E = random_quant_matrix(b, args.vocab_size, d, "q8_0", random_state(b, 2))
    tok = to_device(b, np.array([7], np.int32))
    out.append(("embedding_q8_0 row", cuda_embedding(b, E, tok, o, run=False), d + d // 32 * 2 + 4 * d))
    logits = vec(args.vocab_size)
    pv, pi = empty(b, (8,)), empty(b, (8,), np.int32)
    am = cuda_argmax(b, logits, tok, pv, pi, run=False)
    out.append(("argmax (two-pass)", lambda: [l() for l in am], 4 * args.vocab_size))
    results = []
    for name, fn, nbytes in out:
        s = timer(fn)
        results.append({"name": name, "seconds": s, "bytes_per_s": nbytes / s})
    return results


def decode_speed(generate_fn, n_tokens: int) -> float:
    "tokens/s of generate_fn(n) over the decode steps: (time(n) - time(1)) / (n - 1) removes the prefill."
    generate_fn(1)                                               # warm-up (compiles, captures graphs)
    t = time.perf_counter(); generate_fn(1); one = time.perf_counter() - t
    t = time.perf_counter(); generate_fn(n_tokens); many = time.perf_counter() - t
    return (n_tokens - 1) / max(many - one, 1e-9)


def bench_smollm2(backend, n_gpu, n_cpu, peak, check_tokens) -> tuple:
    from course_lib.generation import generate_tokens
    from course_lib.gguf_tokenizer import load_smollm2
    from course_lib.quantization import FastQuantModel, quantize_model
    model, tok = load_smollm2(max_seq_len=512)
    prompt = tok.encode("The capital of France is")
    rows, equal = [], {}
    a = model.args
    for scheme in SCHEMES:
        reference = quantize_model(copy.deepcopy(model), scheme, backend="dequant")
        bound = tokens_per_second_bound(decode_bytes_per_token(a, scheme, "q8_0", kv_len=len(prompt) + n_gpu), peak) \
            if peak else None
        for graph in (False, True):
            gpu = CudaQuantModel(copy.deepcopy(reference), backend=backend, use_graph=graph)
            tps = decode_speed(lambda n: gpu.generate_greedy(prompt, n), n_gpu)
            rows.append({"name": f"SmolLM2 {scheme} CUDA{' graph' if graph else ''}", "tokens_per_s": tps,
                         "bound_tokens_per_s": bound, "launches_per_token": gpu.n_launches})
            if graph and check_tokens:
                equal[scheme] = {}
                for text in ("The capital of France is", "Once upon a time,", "def fibonacci(n):"):
                    ids = tok.encode(text)
                    equal[scheme][text] = gpu.generate_greedy(ids, check_tokens) == list(generate_tokens(reference, ids, check_tokens))
            del gpu
        if scheme == "q4_1":                                     # the course's fastest CPU path
            fast = FastQuantModel(quantize_model(copy.deepcopy(model), "q4_1"))
            tps = decode_speed(lambda n: list(generate_tokens(fast, prompt, n)), n_cpu)
            rows.append({"name": f"SmolLM2 q4_1 CPU FastQuantModel ({torch.get_num_threads()} threads)", "tokens_per_s": tps})
    tps = decode_speed(lambda n: list(generate_tokens(model, prompt, n)), n_cpu)
    rows.append({"name": f"SmolLM2 float32 CPU ({torch.get_num_threads()} threads)", "tokens_per_s": tps})
    return rows, equal


def torch_f16_decoder(args: ModelArgs, max_seq: int):
    "A minimal Llama decode step in PyTorch float16 on the GPU, random weights (the cuBLAS baseline)."
    dev, h = "cuda", torch.float16
    d, hd, n_h, n_kv, hidden = args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim
    rand = lambda *s: torch.randn(*s, device=dev, dtype=h) / math.sqrt(s[-1])
    layers = [dict(wqkv=rand((n_h + 2 * n_kv) * hd, d), wo=rand(d, n_h * hd), w13=rand(2 * hidden, d),
                   w2=rand(d, hidden), k=torch.zeros(n_kv, max_seq, hd, device=dev, dtype=h),
                   v=torch.zeros(n_kv, max_seq, hd, device=dev, dtype=h)) for _ in range(args.n_layers)]
    emb, out_w, ones = rand(args.vocab_size, d), rand(args.vocab_size, d), torch.ones(d, device=dev, dtype=h)
    freqs = torch.polar(torch.ones(max_seq, hd // 2, device=dev),
                        torch.outer(torch.arange(max_seq, device=dev).float(),
                                    args.rope_theta ** (-torch.arange(0, hd, 2, device=dev).float() / hd)))

    @torch.inference_mode()
    def step(token: int, pos: int) -> int:
        x = emb[token][None]                                                  # (1, d)
        for L in layers:
            qkv = F.linear(F.rms_norm(x, (d,), ones, 1e-5), L["wqkv"])[0]
            qk = torch.view_as_complex(qkv[:(n_h + n_kv) * hd].float().reshape(-1, hd // 2, 2)) * freqs[pos]
            qk = torch.view_as_real(qk).reshape(-1).to(h)
            q, k, v = qk[:n_h * hd], qk[n_h * hd:], qkv[(n_h + n_kv) * hd:]
            L["k"][:, pos], L["v"][:, pos] = k.view(n_kv, hd), v.view(n_kv, hd)
            a = F.scaled_dot_product_attention(q.view(n_h, 1, hd), L["k"][:, :pos + 1], L["v"][:, :pos + 1],
                                               enable_gqa=True)
            x = x + F.linear(a.reshape(1, -1), L["wo"])
            gate, up = F.linear(F.rms_norm(x, (d,), ones, 1e-5), L["w13"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L["w2"])
        return int(F.linear(F.rms_norm(x, (d,), ones, 1e-5), out_w).argmax())
    return step


def bench_llama7b(backend, n_tokens, peak, torch_ok, schemes) -> list:
    from dataclasses import replace
    args = replace(PRESETS["llama-2-7b"], max_seq_len=256)
    rows, prompt = [], [1, 2, 3, 4]
    for scheme in schemes:
        bound = tokens_per_second_bound(decode_bytes_per_token(args, scheme, kv_len=len(prompt) + n_tokens), peak) \
            if peak else None
        for graph in (False, True):
            m = CudaQuantModel.random(args, scheme, output_scheme=scheme, backend=backend, use_graph=graph)
            tps = decode_speed(lambda n: m.generate_greedy(prompt, n), n_tokens)
            rows.append({"name": f"Llama-2-7B-shaped {scheme} CUDA{' graph' if graph else ''}", "tokens_per_s": tps,
                         "bound_tokens_per_s": bound})
            del m
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
    if torch_ok:
        step = torch_f16_decoder(args, 256)
        def run(n):
            t = 0
            for i in range(len(prompt) + n - 1):
                t = step(prompt[i] if i < len(prompt) else t, i)
        tps = decode_speed(run, n_tokens)
        d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
        f16_bytes = 2 * (args.n_layers * d * ((args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd + 3 * hidden)
                         + args.vocab_size * d)                           # every weight once, 2 bytes each
        bound = tokens_per_second_bound(f16_bytes, peak) if peak else None
        rows.append({"name": "Llama-2-7B-shaped torch float16 (eager)", "tokens_per_s": tps, "bound_tokens_per_s": bound})
        del step
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- figures and output

def figures(result: dict, out_dir: Path, stem: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    ax = plot_roofline([result])
    p = out_dir / f"{stem}-roofline.png"
    ax.figure.savefig(p, dpi=120, bbox_inches="tight"); plt.close(ax.figure); paths.append(p)
    if result.get("matvec"):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        labels = [f"{m['shape']}\n{m['format']}" for m in result["matvec"]]
        ax.bar(range(len(labels)), [m["bytes_per_s"] / 1e12 for m in result["matvec"]])
        if result.get("peak_bandwidth"):
            ax.axhline(result["peak_bandwidth"] / 1e12, color="k", ls="--", label="datasheet peak")
            ax.axhline(0.7 * result["peak_bandwidth"] / 1e12, color="gray", ls=":", label="70% (issue's target)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_ylabel("TB/s"); ax.set_title(f"matrix-vector products, {result['gpu']}", fontsize=9)
        p = out_dir / f"{stem}-matvec.png"
        fig.savefig(p, dpi=120, bbox_inches="tight"); plt.close(fig); paths.append(p)
    if result.get("decode"):
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(result["decode"]) + 1))
        names = [d["name"] for d in result["decode"]]
        ax.barh(range(len(names)), [d["tokens_per_s"] for d in result["decode"]])
        ax.set_yticks(range(len(names)), names, fontsize=7); ax.set_xscale("log")
        ax.set_xlabel("tokens/s (log)"); ax.set_title(f"decode speed, {result['gpu']}", fontsize=9)
        p = out_dir / f"{stem}-decode.png"
        fig.savefig(p, dpi=120, bbox_inches="tight"); plt.close(fig); paths.append(p)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="fewer shapes, configurations and tokens (about a minute)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: every section once on the CPU emulator, tiny shapes")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "benchmarks", help="where the JSON and figures go")
    p.add_argument("--iters", type=int, default=None, help="timed launches per measurement (default 50, quick 20)")
    p.add_argument("--skip-smollm2", action="store_true", help="skip SmolLM2 (e.g. when its GGUF file is not cached)")
    p.add_argument("--skip-llama7b", action="store_true", help="skip the 7B-shaped model")
    a = p.parse_args(argv)
    if a.dry_run:
        return dry_run()
    try:
        backend = get_backend("cupy")
    except RuntimeError as e:
        print(f"error: {e} (try --dry-run)", file=sys.stderr)
        return 1
    torch_ok = torch.cuda.is_available()
    iters = a.iters or (20 if a.quick else 50)
    timer = Timer(backend, iters, warmup=5)
    env = environment(backend)
    gpu, peak = env["gpu"], peak_bandwidth(env["gpu"])
    print(f"{gpu}: datasheet peak {peak / 1e12 if peak else float('nan'):.2f} TB/s; torch sees CUDA: {torch_ok}", flush=True)
    configs = [(4, 1), (8, 2), (4, 4)] if a.quick else [(w, r) for w in (2, 4, 8) for r in (1, 2, 4)]
    shapes = LLAMA_SHAPES[1:3] if a.quick else LLAMA_SHAPES
    t0 = time.perf_counter()
    matvec, kernels = bench_matvec(backend, timer, shapes, configs, peak, torch_ok)
    print(f"matvec done ({time.perf_counter() - t0:.0f} s)", flush=True)
    small = bench_small_kernels(backend, timer, PRESETS["llama-2-7b"], [1, 512] if a.quick else [1, 128, 1024, 4096])
    for k in small:
        k["fraction_of_peak"] = k["bytes_per_s"] / peak if peak else None
    decode, equal = [], {}
    if not a.skip_smollm2:
        try:
            rows, equal = bench_smollm2(backend, 64 if a.quick else 128, 8 if a.quick else 16, peak,
                                        32 if not a.quick else 16)
            decode += rows
        except Exception as e:                       # e.g. the GGUF file is not in data/models
            print(f"SmolLM2 skipped: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"SmolLM2 done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not a.skip_llama7b:
        decode += bench_llama7b(backend, 32 if a.quick else 64, peak, torch_ok, ("q4_0",) if a.quick else ("q4_0", "q8_0"))
        print(f"Llama-2-7B-shaped done ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"gpu": gpu, "peak_bandwidth": peak, "environment": env, "quick": a.quick, "iters": iters,
              "shape_convention": "out x in (weight (out_features, in_features))",
              "matvec": matvec, "kernels": kernels, "small_kernels": small, "decode": decode,
              "smollm2_greedy_equal": equal, "date": time.strftime("%Y-%m-%d")}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") + ("-quick" if a.quick else "")
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    paths = figures(result, a.out, stem)
    print(format_benchmark(result))
    for k in small:
        pct = f"{100 * k['fraction_of_peak']:.1f}% of peak" if k["fraction_of_peak"] else ""
        print(f"{k['name']:>24} {k['seconds'] * 1e6:8.1f} us {k['bytes_per_s'] / 1e9:8.0f} GB/s {pct}")
    print("greedy tokens equal to chapter 08's CPU path:", json.dumps(equal))
    print("wrote", a.out / f"{stem}.json", *paths, f"({time.perf_counter() - t0:.0f} s)")
    return 0


def dry_run() -> int:
    "Every section once on the CPU emulator with tiny shapes: proves the script runs; its numbers mean nothing."
    backend = get_backend("emulator")
    print(backend_status())
    timer = Timer(backend, iters=1, warmup=0)
    matvec, kernels = bench_matvec(backend, timer, [(40, 64)], [(2, 1), (1, 3)], None, False)
    tiny = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=96, max_seq_len=16)
    small = bench_small_kernels(backend, timer, tiny, [1, 8])
    for k in small:
        k["fraction_of_peak"] = None
    m = CudaQuantModel.random(tiny, "q4_0", backend=backend)
    decode = [{"name": "tiny random q4_0 (emulator)", "tokens_per_s": decode_speed(lambda n: m.generate_greedy([1, 2], n), 3)}]
    result = {"gpu": "CPU emulator (dry run)", "peak_bandwidth": None, "environment": environment(backend),
              "matvec": matvec, "kernels": kernels, "small_kernels": small, "decode": decode}
    print(format_benchmark(result))
    print(f"dry run ok: {len(matvec)} matvec, {len(small)} kernel, {len(decode)} decode measurements (nothing written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
