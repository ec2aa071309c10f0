#!/usr/bin/env python3
"""Peer for the `cuda` backend: the MoE experts in PyTorch on the same GPU, shapes and token counts.

Two implementations, both starting from given routing (top-k ids and weights), like `run_moe`:
  hf_loop     the Hugging Face style loop over experts (index, MLP, index_add)
  grouped_mm  sort by expert, torch._grouped_mm (gate_up), SwiGLU, torch._grouped_mm (down),
              weighted scatter-add
Timed with CUDA events after warm-up; the median of many runs, rotating over several inputs and
routings. Writes JSON: {"device", "torch", "results": [{shape, tokens, impl, median_ms, ...}]}.

    python3 python/peers/gpu_torch_moe.py --out peer.json [--shapes a,b] [--tokens 1,16]
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
    "gpt-oss-20b": (32, 4, 2880, 2880),
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
ROTATE = 4


def make_weights(e, h, i, dev):
    w13 = torch.empty(e, 2 * i, h, device=dev, dtype=torch.bfloat16).uniform_(-1, 1).mul_(math.sqrt(3 / h))
    w2 = torch.empty(e, h, i, device=dev, dtype=torch.bfloat16).uniform_(-1, 1).mul_(math.sqrt(3 / i))
    return w13, w2


def make_inputs(t, e, k, h, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = (torch.rand(t, h, device=dev, generator=g, dtype=torch.float32) * 2 - 1).mul_(1.7).to(torch.bfloat16)
    logits = torch.randn(t, e, device=dev, generator=g)
    p = logits.softmax(-1)
    w, ids = p.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return x, ids, w


def hf_loop(x, ids, w, w13, w2):
    t, h = x.shape
    i = w2.shape[2]
    out = torch.zeros(t, h, device=x.device, dtype=torch.float32)
    mask = F.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        kk, tok = torch.where(mask[e])
        xs = x[tok]
        gu = F.linear(xs, w13[e])
        y = F.linear(F.silu(gu[:, :i]) * gu[:, i:], w2[e])
        out.index_add_(0, tok, (y.float() * w[tok, kk, None]))
    return out.to(x.dtype)


def grouped_mm(x, ids, w, w13_t, w2_t):
    t, k = ids.shape
    e = w13_t.shape[0]
    i = w2_t.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    xs = x[tok]
    counts = torch.bincount(flat, minlength=e)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = torch._grouped_mm(xs, w13_t, offs=offs)
    a = F.silu(gu[:, :i]) * gu[:, i:]
    y = torch._grouped_mm(a, w2_t, offs=offs)
    y = y.float() * w.reshape(-1)[order, None]
    out = torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32)
    out.index_add_(0, tok, y)
    return out.to(x.dtype)


def time_fn(fn, n_inputs, target_ms=200.0):
    for r in range(2):
        fn(r % n_inputs)
    torch.cuda.synchronize()

    def run(iters, offset):
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        evs[0].record()
        for j in range(iters):
            fn((offset + j) % n_inputs)
            evs[j + 1].record()
        torch.cuda.synchronize()
        return [evs[j].elapsed_time(evs[j + 1]) for j in range(iters)]

    est = statistics.median(run(3, 0))
    iters = max(5, min(200, math.ceil(target_ms / max(est, 1e-3))))
    per = run(iters, 1)
    per.sort()
    return statistics.median(per), per[int(0.1 * (len(per) - 1))], per[int(0.9 * (len(per) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="peer.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--skip-hf-above", type=int, default=1 << 30, help="skip the HF loop above this many tokens")
    ap.add_argument("--target-ms", type=float, default=200.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = []
    for name in args.shapes.split(","):
        e, k, h, i = SHAPES[name]
        w13, w2 = make_weights(e, h, i, dev)
        # _grouped_mm takes B as [E, K, N]; the transposed views keep the nn.Linear storage.
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
        for t in [int(v) for v in args.tokens.split(",")]:
            inputs = [make_inputs(t, e, k, h, dev, 1000 + r) for r in range(ROTATE)]
            x, ids, w = inputs[0]
            ref = hf_loop(x, ids, w, w13, w2).float()
            got = grouped_mm(x, ids, w, w13_t, w2_t).float()
            rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            impls = {"grouped_mm": lambda r: grouped_mm(*inputs[r], w13_t, w2_t)}
            if t <= args.skip_hf_above:
                impls["hf_loop"] = lambda r: hf_loop(*inputs[r], w13, w2)
            for im, fn in impls.items():
                med, p10, p90 = time_fn(fn, ROTATE, args.target_ms)
                row = {"shape": name, "tokens": t, "impl": im, "median_ms": med, "p10_ms": p10, "p90_ms": p90,
                       "rel_err_grouped_vs_loop": rel}
                results.append(row)
                print(f"{name:<14} T={t:<6} {im:<10} {med:9.4f} ms  (p10 {p10:.4f}, p90 {p90:.4f}) rel {rel:.1e}",
                      flush=True)
            del inputs
        del w13, w2, w13_t, w2_t
        torch.cuda.empty_cache()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rotate_inputs": ROTATE,
           "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
