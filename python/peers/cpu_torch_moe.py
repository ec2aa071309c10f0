#!/usr/bin/env python3
"""PyTorch peer for `moe bench --backend cpu`: the Hugging Face style MoE loop on the CPU.

For each hit expert: select its tokens (index_select), gate/up/down linears, SiLU, scale by the
routing weight, index_add into the output -- the loop of transformers' Mixtral/Qwen-MoE blocks.
Same shapes, expert scaling rule, token counts, routing (softmax top-k, renormalized) and thread
count as `moe bench`, so the two tables can be read side by side.

    pip install torch
    python3 python/peers/cpu_torch_moe.py --threads 2 --dtype bf16 --json out.json
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

# Standard shapes of DESIGN.md: experts, top-k, hidden, intermediate.
SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
    "gpt-oss-20b": (32, 4, 2880, 2880),
}


class MoeBlock:
    """Router + experts held as stacked [E, out, in] weights (nn.Linear order)."""

    def __init__(self, experts, top_k, hidden, inter, dtype, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.e, self.k, self.h, self.i = experts, top_k, hidden, inter
        self.router = torch.randn(experts, hidden, generator=g, dtype=torch.float32) / math.sqrt(hidden)
        self.router = self.router.to(dtype)
        # generated per expert to keep the f32 temporaries small
        def stack(rows, cols):
            return torch.stack(
                [(torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(dtype) for _ in range(experts)]
            )
        self.w_gate = stack(inter, hidden)
        self.w_up = stack(inter, hidden)
        self.w_down = stack(hidden, inter)

    @torch.inference_mode()
    def forward(self, x):
        logits = F.linear(x, self.router)
        probs = F.softmax(logits, dim=1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.e).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            idx, tok = torch.where(mask[e])
            xs = x.index_select(0, tok)
            y = F.linear(F.silu(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e]), self.w_down[e])
            out.index_add_(0, tok, y * weights[tok, idx, None])
        return out


def time_point(block, inputs, min_time, min_runs=5, warmup=2, max_runs=1000):
    for x in inputs[:warmup]:
        block.forward(x)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < max_runs):
        x = inputs[len(times) % len(inputs)]
        t = time.perf_counter()
        block.forward(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b,deepseek-v3,gpt-oss-20b")
    p.add_argument("--tokens", default="1,16,128,1024")
    p.add_argument("--dtype", default="bf16", help="comma-separated: bf16, f32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mem-gib", type=float, default=1.5, help="expert weights per shape (as moe bench)")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--min-runs", type=int, default=5, help="timed forwards per point at least")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", default=None,
                   help="per-shape cap on token counts, e.g. mixtral-8x7b=128 (slow points skipped)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, HF-style expert loop")
    print(f"{'shape':<15} {'dtype':>5} {'experts':>8} {'T':>6} {'time ms':>11} {'GFLOP/s':>9}  runs")
    points = []
    for dname in a.dtype.split(","):
        dtype = dtypes[dname.strip()]
        size = torch.tensor([], dtype=dtype).element_size()
        for name in a.shapes.split(","):
            e, k, h, i = SHAPES[name.strip()]
            per_expert = 3 * h * i * size
            fit = max(k, min(e, int(a.mem_gib * 2**30 // per_expert)))
            block = MoeBlock(fit, k, h, i, dtype)
            caps = dict(kv.split("=") for kv in a.max_tokens.split(",")) if a.max_tokens else {}
            for t in [int(v) for v in a.tokens.split(",")]:
                if name.strip() in caps and t > int(caps[name.strip()]):
                    print(f"{name:<15} {dname:>5} {f'{fit}/{e}':>8} {t:>6}  skipped (--max-tokens)")
                    continue
                g = torch.Generator().manual_seed(100 + t)
                inputs = [(torch.rand(t, h, generator=g) * 3.4 - 1.7).to(dtype) for _ in range(6)]
                sec, runs = time_point(block, inputs, a.min_time, a.min_runs, a.warmup)
                flops = 6.0 * t * k * h * i
                print(f"{name:<15} {dname:>5} {f'{fit}/{e}':>8} {t:>6} {sec * 1e3:>11.3f} {flops / sec / 1e9:>9.1f}  {runs}")
                points.append(dict(shape=name, dtype=dname, experts=fit, experts_full=e, top_k=k, hidden=h,
                                   intermediate=i, tokens=t, time_s=sec, runs=runs, gflops=flops / sec / 1e9))
            del block
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(peer="pytorch hf-style expert loop", torch=torch.__version__,
                           threads=torch.get_num_threads(), points=points), f, indent=2)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
