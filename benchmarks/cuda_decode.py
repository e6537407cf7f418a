"""Chapter 09 on a GPU: kernel bandwidth against the peak, quantized matrix-vector products against cuBLAS
float16, and end-to-end decode speed. Writes data/benchmarks/<gpu>.json and .png figures; prints the tables.

    python benchmarks/cuda_decode.py                      # the full run (a few minutes on an H100)
    python benchmarks/cuda_decode.py --quick              # fewer shapes, configurations and tokens
    python benchmarks/cuda_decode.py --l2 flush           # flush L2 before each matvec launch instead of rotating
    python benchmarks/cuda_decode.py --l2 none            # the old method: same weights back to back (L2-resident)
    python benchmarks/cuda_decode.py --backend emulator   # no GPU: every section once on the CPU emulator,
                                                          # tiny shapes (64 x 64), a fake timer (--dry-run: the same)

Shapes are written "out x in" (PyTorch's weight layout, (out_features, in_features)): Llama-2-7B's wq is
4096 x 4096, w1/w3 11008 x 4096 (in = 4096, out = 11008), w2 4096 x 11008, the output 32000 x 4096.

Matrix-vector products read their weights from DRAM, not from the L2 cache (an H100 has 50 MiB of L2, more
than a 4096 x 4096 q4_0 matrix): every one of them, ours and cuBLAS float16's alike, goes through DramTimer.
  --l2 rotate (default): N copies of the weights, N * copy >= 4 x L2, copy k % N launched at iteration k, so no
      copy is read again before about 4 x L2 bytes of other weights went through the cache; CUDA events around
      `--iters` back-to-back launches (after warm-up), time / iters. Falls back to flush when the copies would
      take more than half of the free GPU memory.
  --l2 flush: one copy; before each launch a kernel writes a 2 x L2 buffer (outside the timed region); CUDA events
      around that one launch only; the median over `--iters` launches (events resolve about 0.5 us).
  --l2 none: one copy launched back to back: the weights stay in L2 when they fit (the old numbers).
The L2 size is cudaDeviceProp.l2CacheSize (50 MiB assumed, and said, when it cannot be read). Bandwidth = bytes
one launch must read or write (weights + scales + x + y) / time. Each row of the printed tables and of the JSON
says how its weights were read ('l2_method', 'copies', 'l2_note'). Decode rows say how many bytes of weights one
step reads against the L2 size ('step_weight_bytes', 'l2_note'): a step reads each weight once, so when it reads
more than L2 holds, at most L2 / step of it can still be in L2. The small kernels (RMSNorm, attention, ...) run
back to back on the same buffers, as in decode. Tokens/s = new tokens / decode time (the prompt's prefill
excluded).
"""
import argparse
import copy
import json
import math
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.cuda import (CudaQuantModel, backend_status, cuda_argmax, cuda_qmatvec_dp4a,  # noqa: E402
                             cuda_quantize_x, matvec_launch_shape, cuda_attention_split, attention_n_splits,
                             cuda_attention, cuda_embedding, cuda_qmatvec, cuda_rms_norm, cuda_rope_kv_cache,
                             cuda_swiglu, decode_bytes_per_token, empty, format_benchmark, get_backend, peak_bandwidth,
                             plot_roofline, random_quant_matrix, random_state, to_device, tokens_per_second_bound)
from course_lib.model import PRESETS, ModelArgs  # noqa: E402

SCHEMES = ("q8_0", "q4_0", "q4_1")
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]     # (out, in)

L2_METHODS = ("rotate", "flush", "none")
ROTATE_FACTOR = 4                  # the rotating copies of a matrix take at least 4 x the L2 size together
FLUSH_FACTOR = 2                   # the flush writes a buffer of 2 x the L2 size
FALLBACK_L2_BYTES = 50 * 2**20     # an H100's L2, when cudaDeviceProp.l2CacheSize cannot be read
COPY_MEMORY_FRACTION = 0.5         # rotate only while the extra copies take at most this much of the free memory
EMULATOR_L2_BYTES = 4 * 2**10      # the emulator run pretends to have a 4 KiB L2, so its 64 x 64 matrices rotate
FAKE_LAUNCH_S = 1e-6               # the emulator run's fake timer: every timed launch "takes" 1 us


def _size(n: float) -> str:
    "Bytes in KiB/MiB (binary units, as l2CacheSize is)."
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- clocks: CUDA events, or the emulator's fake one

class EventClock:
    "CUDA events on the backend's CuPy stream; PyTorch's launches join that stream (torch.cuda.ExternalStream)."
    fake = False

    def __init__(self, backend):
        import cupy
        self._cupy, self.backend, self.launches = cupy, backend, 0
        self._torch_stream = torch.cuda.ExternalStream(backend.stream().ptr) if torch.cuda.is_available() else None

    @contextmanager
    def stream(self):
        "Make the backend's stream current for CuPy and PyTorch (do not nest: create buffers before entering)."
        with self.backend.stream():
            if self._torch_stream is None:
                yield
            else:
                with torch.cuda.stream(self._torch_stream):
                    yield

    def mark(self):
        event = self._cupy.cuda.Event()
        event.record()                              # on the current stream
        return event

    def seconds(self, start, stop) -> float:
        return self._cupy.cuda.get_elapsed_time(start, stop) / 1e3

    def synchronize(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.backend.synchronize()


class FakeClock:
    "The emulator run's clock: everything runs, nothing is measured (each timed launch counts FAKE_LAUNCH_S)."
    fake = True

    def __init__(self, backend):
        self.backend, self.launches = backend, 0

    def stream(self):
        return self.backend.stream()

    def mark(self) -> int:
        return self.launches

    def seconds(self, start: int, stop: int) -> float:
        return (stop - start) * FAKE_LAUNCH_S

    def synchronize(self):
        self.backend.synchronize()


# ---------------------------------------------------------------- timing with the weights in DRAM, not L2

@dataclass
class L2Cache:
    bytes: int
    source: str                     # where the size came from


def l2_cache(backend) -> L2Cache:
    "The GPU's L2 size from cudaDeviceProp.l2CacheSize; 50 MiB (an H100's), said loudly, when it cannot be read."
    if backend.name != "cupy":
        return L2Cache(EMULATOR_L2_BYTES, "pretend: the emulator run's, small enough that its matrices rotate")
    import cupy
    try:
        dev = cupy.cuda.runtime.getDevice()
        n = int(cupy.cuda.runtime.getDeviceProperties(dev)["l2CacheSize"])
        if n > 0:
            return L2Cache(n, f"cudaDeviceProp.l2CacheSize of device {dev}")
        why = "l2CacheSize is 0"
    except Exception as e:                          # an old CuPy without the key, a driver error
        why = f"{type(e).__name__}: {e}"
    print(f"warning: cannot read the GPU's L2 size ({why}); assuming {_size(FALLBACK_L2_BYTES)}", file=sys.stderr)
    return L2Cache(FALLBACK_L2_BYTES, f"assumed {_size(FALLBACK_L2_BYTES)} (could not read l2CacheSize: {why})")


@dataclass
class Placement:
    "How one matrix's launches get their weights: method, number of copies, and the sentence that says so."
    method: str                     # 'rotate', 'flush' or 'none'
    copies: int
    copy_bytes: int                 # weights + scales of one copy
    note: str
    next: int = 0                   # the copy the next launch reads (continues across warm-up and configurations)


class DramTimer:
    """Times launches so that each reads its weights from DRAM, not from the L2 cache (method: see the module's
    docstring). `time(launches, where)` takes one launch per copy, launches[k] reading copy k."""

    def __init__(self, clock, l2: L2Cache, method: str, iters: int, warmup: int):
        if method not in L2_METHODS:
            raise ValueError(f"method must be one of {L2_METHODS}, got {method!r}")
        self.clock, self.l2, self.method, self.iters, self.warmup = clock, l2, method, iters, warmup
        self._flush_buffer = None

    def placement(self, copy_bytes: int, free_bytes: Optional[int] = None) -> Placement:
        "How many copies of a copy_bytes matrix to launch in turn (free_bytes: the GPU's free memory, None: no limit)."
        l2, method, why = self.l2.bytes, self.method, ""
        if method == "none":
            said = f"the same {_size(copy_bytes)} of weights launched back to back"
            note = f"L2-resident: {said}, within the {_size(l2)} L2" if copy_bytes <= l2 \
                else f"partly L2-resident: {said}, more than the {_size(l2)} L2"
            return Placement("none", 1, copy_bytes, note)
        if method == "rotate":
            n = max(1, math.ceil(ROTATE_FACTOR * l2 / copy_bytes))
            if free_bytes is None or (n - 1) * copy_bytes <= COPY_MEMORY_FRACTION * free_bytes:
                copies = f"{n} rotating copies" if n > 1 else "1 copy (no rotation needed)"
                return Placement("rotate", n, copy_bytes, f"weights read from DRAM: {copies}, {_size(n * copy_bytes)} "
                                 f">= {ROTATE_FACTOR} x {_size(l2)} L2")
            why = (f"; {n} rotating copies ({_size(n * copy_bytes)}) would not fit in "
                   f"{COPY_MEMORY_FRACTION:.0%} of the {_size(free_bytes)} free")
        return Placement("flush", 1, copy_bytes, f"weights read from DRAM: L2 flushed before each launch "
                         f"({_size(FLUSH_FACTOR * l2)} written, untimed), {_size(l2)} L2{why}")

    def resident(self, nbytes: int) -> Placement:
        "For kernels that run back to back on the same buffers (the small ones: their data stays in L2 in decode too)."
        return Placement("none", 1, nbytes, f"back to back on the same buffers ({_size(nbytes)}; L2-resident when it "
                         f"fits the {_size(self.l2.bytes)} L2, as in decode)")

    def timing_note(self, where: Placement) -> str:
        if self.clock.fake:
            return f"fake timer ({FAKE_LAUNCH_S * 1e6:g} us a launch): the emulator run measures nothing"
        if where.method == "flush":
            return f"CUDA events around each launch alone, median of {self.iters} (after {self.warmup} warm-up)"
        return f"CUDA events around {self.iters} back-to-back launches / {self.iters} (after {self.warmup} warm-up)"

    def _flush_buf(self):
        if self._flush_buffer is None:          # allocated once, before entering the timed stream context
            self._flush_buffer = empty(self.clock.backend, (FLUSH_FACTOR * self.l2.bytes,), np.uint8)
        return self._flush_buffer

    def time(self, launches: list, where: Placement) -> float:
        "Seconds per launch; launches[k] reads copy k; copy where.next % copies goes next."
        if len(launches) != where.copies:
            raise ValueError(f"need one launch per copy: {where.copies}, got {len(launches)}")
        clock = self.clock
        flush = self._flush_buf() if where.method == "flush" else None

        def launch_next():
            launches[where.next % where.copies]()
            where.next += 1
            clock.launches += 1

        with clock.stream():
            for _ in range(self.warmup):
                launch_next()
            if flush is not None:
                marks = []
                for i in range(self.iters):
                    flush.fill(i & 0xFF)                    # a kernel writing 2 x L2 bytes, outside the timed region
                    start = clock.mark()
                    launch_next()
                    marks.append((start, clock.mark()))
            else:
                start = clock.mark()
                for _ in range(self.iters):
                    launch_next()
                stop = clock.mark()
        clock.synchronize()
        if flush is not None:
            return float(np.median([clock.seconds(a, b) for a, b in marks]))
        return clock.seconds(start, stop) / self.iters


def step_l2_note(step_bytes: int, l2: L2Cache) -> str:
    "Where one decode step's weights come from: each is read once a step, so at most L2 bytes of them can hit."
    ratio = step_bytes / l2.bytes
    said = f"a step reads {_size(step_bytes)} of weights, {ratio:.1f} x the {_size(l2.bytes)} L2"
    if ratio >= ROTATE_FACTOR:
        return f"weights read from DRAM: {said}"
    if ratio > 1:
        return f"weights mostly from DRAM: {said} (at most {100 / ratio:.0f}% of them can still be in L2)"
    return f"L2-resident possible: {said} (not rotated: tokens/s may exceed what DRAM allows)"


# ---------------------------------------------------------------- the benchmark's context

@dataclass
class Bench:
    backend: object
    clock: object
    timer: DramTimer
    peak: Optional[float]
    configs: list                   # (warps_per_block, rows_per_warp) of the qmatvec sweep
    torch_device: Optional[str]     # where the float16 baselines run: 'cuda', 'cpu' (emulator run) or None

    @property
    def l2(self) -> L2Cache:
        return self.timer.l2

    def release(self):
        "Give freed buffers back to the driver (so that free_bytes() sees them)."
        if self.backend.name == "cupy":
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def free_bytes(self) -> Optional[int]:
        if self.backend.name != "cupy":
            return None
        import cupy
        self.release()
        return int(cupy.cuda.runtime.memGetInfo()[0])

    def fraction(self, bytes_per_s: float) -> Optional[float]:
        return bytes_per_s / self.peak if self.peak else None


# ---------------------------------------------------------------- matrix-vector variants

@dataclass
class MatvecCase:
    "One variant at one shape: new_copy() makes a copy of the weights (with .nbytes), launch(copy, config) a launch."
    new_copy: Callable[[], object]
    launch: Callable[[object, dict], Callable[[], None]]
    io_bytes: int                   # x read + y written by one launch
    kernel_name: str                # its name on the roofline
    configs: list = field(default_factory=lambda: [{}])     # launch configurations to sweep; the best one is kept
    name: Optional[str] = None      # overrides the variant's name in the tables


def qmatvec_variant(scheme: str, kernel: Optional[str] = None, source: Optional[str] = None):
    "cuda_qmatvec on random scheme weights; kernel/source: another kernel taking the same arguments (e.g. a dp4a one)."
    def build(bench: Bench, out_f: int, in_f: int) -> MatvecCase:
        b = bench.backend
        x = to_device(b, np.random.default_rng(0).standard_normal(in_f).astype(np.float32))
        y = empty(b, (out_f,))
        rng = random_state(b, 0)
        return MatvecCase(
            new_copy=lambda: random_quant_matrix(b, out_f, in_f, scheme, rng),
            launch=lambda W, cfg: cuda_qmatvec(b, W, x, y, run=False, kernel=kernel, source=source, **cfg),
            io_bytes=4 * (in_f + out_f), kernel_name=kernel or f"qmatvec_{scheme}",
            configs=[{"warps_per_block": w, "rows_per_warp": r} for w, r in bench.configs])
    return build


def dp4a_variant(scheme: str):
    "Step 3: x quantized to int8 blocks (quantize_q8_1), then the __dp4a product; both launches timed, as in decode."
    def build(bench: Bench, out_f: int, in_f: int) -> MatvecCase:
        b = bench.backend
        x = to_device(b, np.random.default_rng(0).standard_normal(in_f).astype(np.float32))
        xq, xd, xs = empty(b, (in_f,), np.int8), empty(b, (in_f // 32,)), empty(b, (in_f // 32,), np.int32)
        y = empty(b, (out_f,))
        rng = random_state(b, 0)
        quantize = cuda_quantize_x(b, x, xq, xd, xs, run=False)

        def launch(W, cfg):
            product = cuda_qmatvec_dp4a(b, W, xq, xd, xs, y, run=False, n_sm=b.sm_count, **cfg)
            return lambda: (quantize(), product())
        rule = matvec_launch_shape(out_f, b.sm_count)
        configs = [{}] + [{"warps_per_block": w, "rows_per_warp": r} for w, r in bench.configs
                          if r in (1, 2, 4) and r <= out_f and w <= 8 and (w, r) != rule]
        return MatvecCase(new_copy=lambda: random_quant_matrix(b, out_f, in_f, scheme, rng), launch=launch,
                          io_bytes=4 * (in_f + out_f) + in_f + 8 * (in_f // 32), kernel_name=f"qmatvec_dp4a_{scheme}",
                          configs=configs, name=f"{scheme} dp4a")
    return build


def torch_f16_matvec(bench: Bench, out_f: int, in_f: int) -> Optional[MatvecCase]:
    "PyTorch's float16 F.linear: cuBLAS on the GPU (the emulator run uses the CPU's, only to run this code)."
    dev = bench.torch_device
    if dev is None:
        return None
    x16 = torch.randn(1, in_f, device=dev, dtype=torch.float16)
    return MatvecCase(new_copy=lambda: torch.randn(out_f, in_f, device=dev, dtype=torch.float16),
                      launch=lambda w, cfg: (lambda: F.linear(x16, w)), io_bytes=2 * (in_f + out_f),
                      kernel_name="torch f16", name=None if dev == "cuda" else "f16 (torch CPU)")


# (name in the tables, builder(bench, out_features, in_features) -> MatvecCase or None to skip): add a kernel here
MATVEC_VARIANTS = [
    ("q8_0", qmatvec_variant("q8_0")),
    ("q4_0", qmatvec_variant("q4_0")),
    ("q4_1", qmatvec_variant("q4_1")),
    ("q8_0 dp4a", dp4a_variant("q8_0")),
    ("q4_0 dp4a", dp4a_variant("q4_0")),
    ("q4_1 dp4a", dp4a_variant("q4_1")),
    ("f16 (cuBLAS)", torch_f16_matvec),
]


def bench_matvec(bench: Bench, shapes, variants=MATVEC_VARIANTS) -> tuple:
    "Every variant at every shape, its weights read from DRAM (bench.timer); the best configuration of each."
    rows, kernels = [], []
    for out_f, in_f in shapes:
        for name, build in variants:
            case = build(bench, out_f, in_f)
            if case is None:
                continue
            copies = [case.new_copy()]
            where = bench.timer.placement(int(copies[0].nbytes), bench.free_bytes())
            copies += [case.new_copy() for _ in range(where.copies - 1)]
            bench.clock.synchronize()
            sweep = []
            for config in case.configs:
                launches = [case.launch(w, config) for w in copies]
                sweep.append({**config, "seconds": bench.timer.time(launches, where)})
            del copies, launches
            bench.release()
            best = min(sweep, key=lambda s: s["seconds"])
            nbytes, flops = where.copy_bytes + case.io_bytes, 2 * out_f * in_f
            bw = nbytes / best["seconds"]
            row = {"shape": f"{out_f} x {in_f}", "format": case.name or name, "seconds": best["seconds"],
                   "bytes_per_s": bw, "fraction_of_peak": bench.fraction(bw),
                   "bytes_per_launch": nbytes, "l2_method": where.method, "copies": where.copies,
                   "copy_bytes": where.copy_bytes, "l2_bytes": bench.l2.bytes, "l2_note": where.note,
                   "timing": bench.timer.timing_note(where)}
            if len(sweep) > 1 or sweep[0].keys() != {"seconds"}:
                row.update(best=best, sweep=sweep)
            rows.append(row)
            kernels.append({"name": f"{case.kernel_name} {out_f}x{in_f}", "seconds": best["seconds"],
                            "bytes_per_s": bw, "intensity": flops / nbytes,
                            "flops_per_s": flops / best["seconds"], "l2_method": where.method})
    return rows, kernels


# ---------------------------------------------------------------- the other sections

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


def bench_small_kernels(bench: Bench, args: ModelArgs, cache_lens) -> list:
    "RMSNorm, RoPE + cache write, attention (one block per head, and split) at several cache lengths, SwiGLU, embedding row, argmax (7B shapes)."
    b, hd, out = bench.backend, args.head_dim, []
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
    partial = empty(b, (n_h, attention_n_splits(max_seq, n_h, b.sm_count), hd + 2))     # flash-decoding's splits
    for length in cache_lens:
        p = to_device(b, np.array([length - 1], np.int32))
        out.append((f"attention len={length}", cuda_attention(b, qkv, cache_k, cache_v, p, att, n_h, n_kv, hd, run=False),
                    4 * (2 * n_kv * length * hd + 2 * n_h * hd)))
        split = cuda_attention_split(b, qkv, cache_k, cache_v, p, partial, att, n_h, n_kv, hd, run=False)
        out.append((f"attention split len={length}", lambda split=split: [l() for l in split],
                    4 * (2 * n_kv * length * hd + 2 * n_h * hd)))
    h13, g = vec(2 * hidden), empty(b, (hidden,))
    out.append(("swiglu", cuda_swiglu(b, h13, g, run=False), 12 * hidden))
    E = random_quant_matrix(b, args.vocab_size, d, "q8_0", random_state(b, 2))
    tok = to_device(b, np.array([7, 0], np.int32))        # [token id, argmax's not-finite flag], as CudaQuantModel's
    out.append(("embedding_q8_0 row", cuda_embedding(b, E, tok, o, run=False), d + d // 32 * 2 + 4 * d))
    logits = vec(args.vocab_size)
    pv, pi = empty(b, (8,)), empty(b, (8,), np.int32)
    am = cuda_argmax(b, logits, tok, pv, pi, run=False)
    out.append(("argmax (two-pass)", lambda: [l() for l in am], 4 * args.vocab_size))
    results = []
    for name, fn, nbytes in out:
        where = bench.timer.resident(nbytes)
        s = bench.timer.time([fn], where)
        results.append({"name": name, "seconds": s, "bytes_per_s": nbytes / s,
                        "fraction_of_peak": bench.fraction(nbytes / s), "l2_method": "none", "l2_note": where.note})
    return results


def decode_speed(generate_fn, n_tokens: int) -> float:
    "tokens/s of generate_fn(n) over the decode steps: (time(n) - time(1)) / (n - 1) removes the prefill."
    generate_fn(1)                                               # warm-up (compiles, captures graphs)
    t = time.perf_counter(); generate_fn(1); one = time.perf_counter() - t
    t = time.perf_counter(); generate_fn(n_tokens); many = time.perf_counter() - t
    return (n_tokens - 1) / max(many - one, 1e-9)


def decode_row(bench: Bench, name: str, tokens_per_s: float, step_weight_bytes: int, bound=None, **extra) -> dict:
    "A decode row, with the bytes of weights one step reads against the L2 size."
    return {"name": name, "tokens_per_s": tokens_per_s, "bound_tokens_per_s": bound, **extra,
            "step_weight_bytes": step_weight_bytes, "l2_bytes": bench.l2.bytes,
            "l2_note": step_l2_note(step_weight_bytes, bench.l2)}


# chapter 09's decode steps: (name, CudaQuantModel options, the chapter 08 path it must equal)
STEPS = [("step 2", dict(matvec="float", attention="single"), "dequant"),
         ("step 3", dict(matvec="dp4a", attention="split"), "C step")]


def bench_smollm2(bench: Bench, n_gpu, n_cpu, check_tokens) -> tuple:
    from course_lib.generation import generate_tokens
    from course_lib.gguf_tokenizer import load_smollm2
    from course_lib.quant_model import quantize_model
    from course_lib.fast_cpu import FastQuantModel
    backend, peak = bench.backend, bench.peak
    model, tok = load_smollm2(max_seq_len=512)
    prompt = tok.encode("The capital of France is")
    rows, equal = [], {}
    a = model.args
    for scheme in SCHEMES:
        reference = quantize_model(copy.deepcopy(model), scheme, matmul="dequant")
        bound = tokens_per_second_bound(decode_bytes_per_token(a, scheme, "q8_0", kv_len=len(prompt) + n_gpu), peak) \
            if peak else None
        step_bytes = decode_bytes_per_token(a, scheme, "q8_0")           # weights only, no KV cache
        c_step = FastQuantModel(copy.deepcopy(reference), kernel="c")      # step 3's reference: the same int8 x
        for step, options, same_as in STEPS:
            for graph in (False, True):
                gpu = CudaQuantModel(copy.deepcopy(reference), backend=backend, use_graph=graph, **options)
                tps = decode_speed(lambda n: gpu.generate_greedy(prompt, n), n_gpu)
                rows.append(decode_row(bench, f"SmolLM2 {scheme} CUDA {step}{' graph' if graph else ''}", tps,
                                       step_bytes, bound, launches_per_token=gpu.n_launches))
                if graph and check_tokens:
                    ref = reference if same_as == "dequant" else c_step
                    equal.setdefault(scheme, {})[step] = {text: gpu.generate_greedy(tok.encode(text), check_tokens)
                                                          == list(generate_tokens(ref, tok.encode(text), check_tokens))
                                                          for text in ("The capital of France is", "Once upon a time,",
                                                                       "def fibonacci(n):")}
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


def bench_random_model(bench: Bench, args: ModelArgs, label: str, n_tokens: int, schemes, graphs=(False, True)) -> list:
    "A model of args' shape with random weights (Llama-2-7B's on a GPU), each scheme with and without a CUDA graph."
    rows, prompt, peak = [], [1, 2, 3, 4], bench.peak
    for scheme in schemes:
        bound = tokens_per_second_bound(decode_bytes_per_token(args, scheme, kv_len=len(prompt) + n_tokens), peak) \
            if peak else None
        step_bytes = decode_bytes_per_token(args, scheme)                  # weights only, no KV cache
        for step, options, _ in STEPS:
            for graph in graphs:
                m = CudaQuantModel.random(args, scheme, output_scheme=scheme, backend=bench.backend, use_graph=graph,
                                          **options)
                tps = decode_speed(lambda n: m.generate_greedy(prompt, n), n_tokens)
                rows.append(decode_row(bench, f"{label} {scheme} CUDA {step}{' graph' if graph else ''}", tps,
                                       step_bytes, bound))
                del m
                bench.release()
    if bench.torch_device == "cuda":
        step = torch_f16_decoder(args, args.max_seq_len)
        def run(n):
            t = 0
            for i in range(len(prompt) + n - 1):
                t = step(prompt[i] if i < len(prompt) else t, i)
        tps = decode_speed(run, n_tokens)
        d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
        f16_bytes = 2 * (args.n_layers * d * ((args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd + 3 * hidden)
                         + args.vocab_size * d)                           # every weight once, 2 bytes each
        bound = tokens_per_second_bound(f16_bytes, peak) if peak else None
        rows.append(decode_row(bench, f"{label} torch float16 (eager)", tps, f16_bytes, bound))
        del step
        bench.release()
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
        ax.set_ylabel("TB/s")
        ax.set_title(f"matrix-vector products, {result['gpu']} (--l2 {result['l2']['method']})", fontsize=9)
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


# ---------------------------------------------------------------- main

def plan(kind: str) -> dict:
    "The sizes of a run: 'full', 'quick' (GPU) or 'emulator' (tiny shapes, everything once)."
    if kind == "emulator":
        tiny = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=96, max_seq_len=16)
        return dict(shapes=[(64, 64)], configs=[(2, 1), (1, 3)], iters=1, warmup=0, small_args=tiny, cache_lens=[1, 8],
                    smollm2=None, model_args=tiny, model_label="tiny random (emulator)", model_schemes=("q4_0",),
                    model_tokens=3, graphs=(False,))
    quick = kind == "quick"
    return dict(shapes=LLAMA_SHAPES[1:3] if quick else LLAMA_SHAPES,
                configs=[(4, 1), (8, 2), (4, 4)] if quick else [(w, r) for w in (2, 4, 8) for r in (1, 2, 4)],
                iters=20 if quick else 50, warmup=5, small_args=PRESETS["llama-2-7b"],
                cache_lens=[1, 512] if quick else [1, 128, 1024, 4096],
                smollm2=(64, 8, 16) if quick else (128, 16, 32),
                model_args=replace(PRESETS["llama-2-7b"], max_seq_len=256), model_label="Llama-2-7B-shaped",
                model_schemes=("q4_0",) if quick else ("q4_0", "q8_0"), model_tokens=32 if quick else 64,
                graphs=(False, True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="fewer shapes, configurations and tokens (about a minute)")
    p.add_argument("--backend", choices=("cupy", "emulator"), default="cupy",
                   help="cupy: the GPU (default); emulator: no GPU, every section once on the CPU emulator with tiny "
                        "shapes and a fake timer (proves the code runs; nothing is measured or written)")
    p.add_argument("--dry-run", action="store_true", help="the same as --backend emulator")
    p.add_argument("--l2", choices=L2_METHODS, default="rotate",
                   help="how matvec launches avoid reading their weights from L2: rotate (default; copies totalling "
                        f">= {ROTATE_FACTOR} x L2, launched in turn), flush (write {FLUSH_FACTOR} x L2 before each launch, "
                        "untimed), none (the same weights back to back: L2-resident when they fit)")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "benchmarks", help="where the JSON and figures go")
    p.add_argument("--iters", type=int, default=None, help="timed launches per measurement (default 50, quick 20)")
    p.add_argument("--skip-smollm2", action="store_true", help="skip SmolLM2 (e.g. when its GGUF file is not cached)")
    p.add_argument("--skip-llama7b", action="store_true", help="skip the 7B-shaped model")
    a = p.parse_args(argv)
    emulated = a.dry_run or a.backend == "emulator"
    try:
        backend = get_backend("emulator" if emulated else "cupy")
    except RuntimeError as e:
        print(f"error: {e}" + ("" if emulated else " (try --backend emulator)"), file=sys.stderr)
        return 1
    size = plan("emulator" if emulated else "quick" if a.quick else "full")
    if emulated:
        print(backend_status())
    clock = FakeClock(backend) if emulated else EventClock(backend)
    l2 = l2_cache(backend)
    iters = a.iters or size["iters"]
    env = environment(backend)
    gpu = env["gpu"]
    peak = None if emulated else peak_bandwidth(gpu)
    torch_device = "cpu" if emulated else "cuda" if torch.cuda.is_available() else None
    bench = Bench(backend, clock, DramTimer(clock, l2, a.l2, iters, size["warmup"]), peak,
                  size["configs"], torch_device)
    print(f"{gpu}: datasheet peak {peak / 1e12 if peak else float('nan'):.2f} TB/s; "
          f"L2 {_size(l2.bytes)} ({l2.source}); --l2 {a.l2}; torch's float16 baselines on: {torch_device}", flush=True)
    t0 = time.perf_counter()
    matvec, kernels = bench_matvec(bench, size["shapes"])
    print(f"matvec done ({time.perf_counter() - t0:.0f} s)", flush=True)
    small = bench_small_kernels(bench, size["small_args"], size["cache_lens"])
    decode, equal = [], {}
    if size["smollm2"] and not a.skip_smollm2:
        try:
            rows, equal = bench_smollm2(bench, *size["smollm2"])
            decode += rows
        except Exception as e:                       # e.g. the GGUF file is not in data/models
            print(f"SmolLM2 skipped: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"SmolLM2 done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not a.skip_llama7b:
        decode += bench_random_model(bench, size["model_args"], size["model_label"], size["model_tokens"],
                                     size["model_schemes"], size["graphs"])
        print(f"{size['model_label']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"gpu": gpu, "peak_bandwidth": peak, "environment": env, "quick": a.quick, "iters": iters,
              "shape_convention": "out x in (weight (out_features, in_features))",
              "l2": {"bytes": l2.bytes, "source": l2.source, "method": a.l2, "rotate_factor": ROTATE_FACTOR,
                     "flush_factor": FLUSH_FACTOR},
              "l2_method": a.l2, "l2_bytes": l2.bytes,
              "matvec": matvec, "kernels": kernels, "small_kernels": small, "decode": decode,
              "smollm2_greedy_equal": equal, "date": time.strftime("%Y-%m-%d")}
    if emulated:
        result["fake_timer"] = True
        print(format_benchmark(result))
        print(f"dry run ok: {len(matvec)} matvec, {len(small)} kernel, {len(decode)} decode measurements "
              f"(emulator, fake timer: nothing measured, nothing written)")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if a.quick else "") + ("" if a.l2 == "rotate" else f"-l2-{a.l2}")
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") + suffix
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    paths = figures(result, a.out, stem)
    print(format_benchmark(result))
    print("greedy tokens equal to chapter 08's CPU path:", json.dumps(equal))
    print("wrote", a.out / f"{stem}.json", *paths, f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
