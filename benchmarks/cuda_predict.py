"""Chapter 09's kernels without a GPU: what NVRTC's machine code says, and what the bandwidth model predicts.

    python benchmarks/cuda_predict.py            # NVRTC + cuobjdump (the dev extra's wheels), a few seconds

For each product kernel the decode step launches at Llama-2-7B's shapes: registers, resident warps per SM,
the bytes of weights each lane keeps in flight and the memory round trips per loop pass (read from the SASS
by course_lib.cuda.load_waves), then predicted_bandwidth's Little's-law estimate on an H100 and an H200, and
the tokens/s those products alone would allow. Every figure here is a prediction from the machine code and a
stated model (DRAM round trip 600 ns; instruction time, L2 hits and the grid's tail ignored): a GPU run of
benchmarks/cuda_decode.py must confirm it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from course_lib.cuda import (DRAM_LATENCY, GPU_PEAK_BANDWIDTH, H100_SMS, cuobjdump, cuobjdump_path,  # noqa: E402
                             decode_bytes_per_token, decode_source, kernel_resources, load_waves, nvrtc_compile,
                             nvrtc_library, predict_product, show_loads, tokens_per_second_bound)
from course_lib.model import PRESETS  # noqa: E402

LLAMA_7B = [("wqkv", 12288, 4096, 32), ("wo", 4096, 4096, 32), ("w1|w3", 22016, 4096, 32), ("w2", 4096, 11008, 32),
            ("output", 32000, 4096, 1)]                    # (name, rows, cols, launches per token)


def main():
    if nvrtc_library() is None or cuobjdump_path() is None:
        sys.exit("needs NVRTC and cuobjdump: pip install -e '.[dev]' (Linux)")
    cubin = nvrtc_compile(decode_source(), "sm_90")
    res = kernel_resources(cubin, "sm_90")
    print(f"NVRTC sm_90 cubin of {len(res)} kernels; model: DRAM round trip {DRAM_LATENCY * 1e9:.0f} ns, "
          f"{H100_SMS} SMs; every number below is a prediction\n")
    print(f"{'kernel':>26} {'regs':>4} {'local B':>7}  loop: waves of loads (bytes; w: weights) | carried to the next pass")
    for name in ("qmatvec_q4_0", "qmatvec_q4_1", "qmatvec_q8_0", *sorted(k for k in res if k.startswith("qmatvec_dp4a"))):
        waves, carried = load_waves(cuobjdump(cubin, "-sass", "-fun", name))
        shown = " → ".join(map(show_loads, waves[:3])) + (" → …" if len(waves) > 3 else "")
        print(f"{name:>26} {res[name].registers:4d} {res[name].local:7d}  {shown} | {show_loads(carried)}")
    for scheme in ("q4_0", "q8_0"):
        for gpu in ("H100", "H200"):
            print(f"\nLlama-2-7B {scheme} products on an {gpu} ({GPU_PEAK_BANDWIDTH[gpu] / 1e12:.2f} TB/s datasheet peak)")
            print(f"{'matrix':>22} {'step':>4} {'kernel':>26} {'warps/SM':>8} {'B/lane':>6} {'trips':>5} {'% of peak':>9}")
            seconds = {2: 0.0, 3: 0.0}
            for label, rows, cols, per_token in LLAMA_7B:
                for step in (2, 3):
                    p = predict_product(step, scheme, rows, cols, gpu, cubin)
                    seconds[step] += per_token * p["seconds"]
                    print(f"{label + f' {rows}x{cols}':>22} {step:>4} {p['kernel']:>26} {p['warps_per_sm']:8.1f} "
                          f"{p['bytes_per_lane']:6d} {p['round_trips']:5d} {100 * p['fraction']:8.0f}%")
            bound = tokens_per_second_bound(decode_bytes_per_token(PRESETS["llama-2-7b"], scheme), GPU_PEAK_BANDWIDTH[gpu])
            print(f"tokens/s from the products alone: step 2 {1 / seconds[2]:.0f}, step 3 {1 / seconds[3]:.0f} "
                  f"(bandwidth bound of the whole step: {bound:.0f})")


if __name__ == "__main__":
    main()
