// Decode-sized forwards (a few tokens): each (token, choice) pair's expert MLP as matrix-vector
// products, straight from the routing, in two launches. There is no layout, no permuted copy
// and no count: at T = 1 every weight byte is read exactly once either way, and the grouped
// path's five dependent launches and 16-row tiles (15 of 16 rows empty) cost more than the
// weights themselves (qwen3-30b-a3b T = 1: 83 us against a 25 us floor).
//
//   gate_up: one warp per intermediate column (its gate and up weight rows), one block row per
//            pair: act[pair, col] = act_fn(x . w_gate + b, x . w_up + b) in the activation dtype;
//   down:    one warp per hidden column, one block row per token: out[t, col] = sum over the
//            token's local choices, in order, of w * (act[pair] . w_down[col] + b) (f32).
//
// On sm_90 the down kernel is launched programmatically after gate_up (src/device.rs): its blocks
// start as gate_up's retire and wait for gate_up's activations with `griddepcontrol.wait`; the
// short-row variant first loads its weights (which depend only on the routing) into registers.

// DecodeParams: common.cuh (the packed-weight decode kernels of quant_gemm.cu embed it).


#define DECODE_WARPS 8

template <class Tag>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const u16* x = (const u16*)&a;
    const u16* y = (const u16*)&b;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(to_f32(x[i], Tag()), to_f32(y[i], Tag()), s);
    return s;
}

template <class Tag>
__device__ void decode_gate_up(const DecodeParams& p) {
    extern __shared__ __align__(16) uint4 xs[];
    pdl_launch_dependents();
    const int pair = blockIdx.y, t = pair / p.k, H8 = p.hidden / 8;
    const int slot = ((const int*)p.ids)[pair];
    if (slot < 0 || slot >= p.slot_total) {
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicCAS((int*)p.err, 0, -(pair + 1));
        return;
    }
    const int l = slot - p.slot_start;
    if (l < 0 || l >= p.n_local) return;
    // The token row (scaled by its routing weight first when the weights apply to the input,
    // rounded to the activation dtype exactly as the permute kernel does).
    const uint4* src = (const uint4*)p.x + (size_t)t * H8;
    const float s = p.scale_input ? ((const float*)p.weights)[pair] : 1.f;
    for (int c = threadIdx.x; c < H8; c += blockDim.x) {
        uint4 v = src[c];
        if (p.scale_input) {
            u16* e = (u16*)&v;
#pragma unroll
            for (int j = 0; j < 8; ++j) e[j] = from_f32(to_f32(e[j], Tag()) * s, Tag());
        }
        xs[c] = v;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col = blockIdx.x * DECODE_WARPS + warp;
    if (col >= p.inter) return;
    const uint4* wg = (const uint4*)p.w13 + ((size_t)l * 2 * p.inter + col) * H8;
    const uint4* wu = wg + (size_t)p.inter * H8;
    float g = 0.f, u = 0.f;
#pragma unroll 4
    for (int c = lane; c < H8; c += 32) {
        const uint4 xv = xs[c];
        g += dot8<Tag>(__ldg(wg + c), xv);
        u += dot8<Tag>(__ldg(wu + c), xv);
    }
    g = warp_sum(g);
    u = warp_sum(u);
    if (lane == 0) {
        if (p.b13) {
            const float* b = (const float*)p.b13 + (size_t)l * 2 * p.inter;
            g += b[col];
            u += b[p.inter + col];
        }
        ((u16*)p.act)[(size_t)pair * p.inter + col] = from_f32(apply_act(p.act_kind, g, u, p.alpha, p.limit), Tag());
    }
}

// The short-row down kernel holds its weights in registers from before the wait: 3 16-byte
// chunks a lane (whole rows up to I = 768, qwen3-30b-a3b) for the first 8 choices. Longer rows
// take the streaming kernel: 128 registers would halve its occupancy, and mixtral-8x7b /
// deepseek-v3 T = 1 measured 13-15% slower that way.
#define DOWN_PRE_PAIRS 8
#define DOWN_PRE_CHUNKS 3

// act[pair] . w over I8 chunks, lane-strided (chunk lane, lane + 32, ...: the order of the sum is
// the same with or without preloaded chunks), then summed over the warp.
template <class Tag, bool PRE>
__device__ __forceinline__ float down_dot(const uint4* a, const uint4* w, int I8, int lane,
                                          const uint4 (&pre)[DOWN_PRE_CHUNKS]) {
    float d = 0.f;
    int c = lane;
    if (PRE) {
#pragma unroll
        for (int q = 0; q < DOWN_PRE_CHUNKS; ++q, c += 32)
            if (c < I8) d += dot8<Tag>(pre[q], a[c]);
    }
#pragma unroll 4
    for (; c < I8; c += 32) d += dot8<Tag>(__ldg(w + c), a[c]);
    return warp_sum(d);
}

template <class Tag, bool SHORT>
__device__ void decode_down(const DecodeParams& p) {
    const int t = blockIdx.y, I8 = p.inter / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col = blockIdx.x * DECODE_WARPS + warp;
    if (col >= p.hidden) return;
    auto local = [&](int j) {
        const int l = ((const int*)p.ids)[t * p.k + j] - p.slot_start;
        return (l < 0 || l >= p.n_local) ? -1 : l;  // another rank's expert, or a bad id (flagged)
    };
    auto wrow = [&](int l) { return (const uint4*)p.w2 + ((size_t)l * p.hidden + col) * I8; };
    auto term = [&](int j, int l, float d) {
        if (p.b2) d += ((const float*)p.b2)[(size_t)l * p.hidden + col];
        return (p.scale_input ? 1.f : ((const float*)p.weights)[t * p.k + j]) * d;
    };
    auto act = [&](int j) { return (const uint4*)p.act + (size_t)(t * p.k + j) * I8; };
    uint4 pre[DOWN_PRE_PAIRS][DOWN_PRE_CHUNKS];
    if (SHORT) {
#pragma unroll
        for (int j = 0; j < DOWN_PRE_PAIRS; ++j) {
            const int l = j < p.k ? local(j) : -1;
#pragma unroll
            for (int q = 0; q < DOWN_PRE_CHUNKS; ++q) {
                const int c = lane + 32 * q;
                pre[j][q] = (l >= 0 && c < I8) ? __ldg(wrow(l) + c) : make_uint4(0, 0, 0, 0);
            }
        }
    }
    pdl_wait();  // gate_up's activations are complete and visible from here
    float acc = 0.f;
    int j0 = 0;
    if (SHORT) {
#pragma unroll
        for (int j = 0; j < DOWN_PRE_PAIRS; ++j) {
            if (j >= p.k) break;
            const int l = local(j);
            if (l >= 0) acc += term(j, l, down_dot<Tag, true>(act(j), wrow(l), I8, lane, pre[j]));
        }
        j0 = DOWN_PRE_PAIRS;
    }
    for (int j = j0; j < p.k; ++j) {
        const int l = local(j);
        if (l >= 0) acc += term(j, l, down_dot<Tag, false>(act(j), wrow(l), I8, lane, pre[0]));
    }
    if (lane == 0) ((float*)p.out)[(size_t)t * p.hidden + col] = acc;
}

// At most 40 registers (6 blocks of 256 threads an SM): qwen3-30b-a3b's T = 1 grid (96 x 8
// blocks) then runs in one wave on 132 SMs instead of 1.16 (48 registers: 5 blocks an SM).
extern "C" __global__ void __launch_bounds__(256, 6) moe_decode_gate_up_bf16(DecodeParams p) {
    decode_gate_up<Bf16Tag>(p);
}
extern "C" __global__ void __launch_bounds__(256, 6) moe_decode_gate_up_f16(DecodeParams p) {
    decode_gate_up<F16Tag>(p);
}
extern "C" __global__ void moe_decode_down_bf16(DecodeParams p) {
    decode_down<Bf16Tag, false>(p);
}
extern "C" __global__ void moe_decode_down_f16(DecodeParams p) {
    decode_down<F16Tag, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) moe_decode_down_short_bf16(DecodeParams p) {
    decode_down<Bf16Tag, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) moe_decode_down_short_f16(DecodeParams p) {
    decode_down<F16Tag, true>(p);
}
