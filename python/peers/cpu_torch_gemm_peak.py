#!/usr/bin/env python3
"""The best bf16 GEMM rate PyTorch reaches on this CPU (oneDNN; AMX where the CPU has it), for
issue #4's T = 1024 yardstick beside `moe bench`'s own peak GEMM line.

    python3 python/peers/cpu_torch_gemm_peak.py --threads 16 [--json out.json]
"""

import argparse
import json
import time

import torch


def rate(m, n, k, dtype, min_time):
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        t = time.perf_counter()
        a @ b
        best = max(best, 2.0 * m * n * k / (time.perf_counter() - t) / 1e9)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    # moe bench's own peak shape (256 x 2048 x 2048) and a large square product.
    for m, n, k in [(256, 2048, 2048), (4096, 4096, 4096)]:
        g = rate(m, n, k, torch.bfloat16, args.min_time)
        rows.append({"m": m, "n": n, "k": k, "dtype": "bf16", "gflops": g})
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: bf16 {m}x{n}x{k} {g:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "points": rows}, f, indent=1)


if __name__ == "__main__":
    main()
