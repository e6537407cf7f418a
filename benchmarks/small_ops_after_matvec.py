"""Why the small operations of a decode step cost more than they do in a loop of their own.

    python benchmarks/small_ops_after_matvec.py [--threads 2]

A decode step alternates matrix-vector products, which stream megabytes of weights through the CPU
caches, with a few small operations (norms, RoPE, adds). This times the same three small operations
on a 576-element vector twice: right after a (576 x 3072) float32 product whose weights come from
memory (40 different 7 MB matrices, 280 MB in all), and in a loop with no product. The difference is
what each small operation pays for finding the interpreter's and PyTorch's own data evicted.
"""
import argparse
import time

import torch


def small_ops(s: torch.Tensor) -> torch.Tensor:
    z = s * 2.0
    z = z + 1
    return torch.rsqrt(z.abs())


def median_us(after_product: bool, weights: list, x: torch.Tensor, s: torch.Tensor, n: int = 400) -> float:
    times = []
    for i in range(n):
        if after_product:
            x @ weights[i % len(weights)]                          # (576,) @ (576, 3072)
        t = time.perf_counter()
        small_ops(s)
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(576, 3072, generator=gen) for _ in range(40)]
    x, s = torch.randn(576, generator=gen), torch.randn(1, 1, 576, generator=gen)
    print(f"torch {torch.__version__}, {args.threads} threads; three small ops on 576 floats, median of 400")
    with torch.inference_mode():
        median_us(True, weights, x, s), median_us(False, weights, x, s)      # warm-up
        after, alone = median_us(True, weights, x, s), median_us(False, weights, x, s)
    print(f"  right after a 7 MB matrix-vector product: {after:6.1f} us")
    print(f"  in a loop of their own:                   {alone:6.1f} us")
    print(f"  ratio: {after / alone:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
