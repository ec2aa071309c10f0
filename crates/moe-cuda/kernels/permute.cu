// Token <-> expert layouts on the device (see crates/moe-core/src/permute.rs for the host
// reference): per-expert counts, aligned offsets and the contiguous tile map, the gather into the
// contiguous or masked layout, the weighted unpermute-reduce, and the block's final combine.

struct CountParams {
    u64 ids;      // [T*k] i32 slot ids
    u64 counts;   // [n_local] i32, zeroed before the launch
    u64 pos;      // [T*k] i32 out: position within the expert, -1 when not local
    u64 err;      // int flag: set to -(1 + index) on an out-of-range slot id
    int pairs, slot_start, n_local, slot_total;
};

extern "C" __global__ void moe_count(CountParams p) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.pairs) return;
    int slot = ((const int*)p.ids)[i];
    int l = slot - p.slot_start;
    if (slot < 0 || slot >= p.slot_total) atomicCAS((int*)p.err, 0, -(i + 1));
    int pos = -1;
    if (l >= 0 && l < p.n_local) pos = atomicAdd((int*)p.counts + l, 1);
    ((int*)p.pos)[i] = pos;
}

struct LayoutParams {
    u64 counts;       // [n_local] i32
    u64 offsets;      // [n_local + 1] i32 out (aligned, contiguous mode)
    u64 tile_expert;  // [tiles] i32 out: local expert of each BM-row tile, -1 past the end
    u64 tile_end;     // [tiles] i32 out: end of the expert's real rows
    int n_local, block_m, tiles, align;  // align: rows each expert's offset is aligned to (0: block_m)
};

// One block: the aligned offsets by a block-wide exclusive scan (256 experts a pass, a running
// total between passes; a serial scan by one thread cost 14 us at 128 experts), then the tile map.
extern "C" __global__ void moe_layout(LayoutParams p) {
    const int* counts = (const int*)p.counts;
    int* off = (int*)p.offsets;
    __shared__ int warp_tot[32];
    __shared__ int carry;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int e0 = 0; e0 < p.n_local; e0 += blockDim.x) {
        const int e = e0 + threadIdx.x;
        const int al = p.align > 0 ? p.align : p.block_m;
        const int v = e < p.n_local ? (counts[e] + al - 1) / al * al : 0;
        int x = v;  // inclusive scan within the warp
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_tot[warp] = x;
        __syncthreads();
        int before = carry;
        for (int w = 0; w < warp; ++w) before += warp_tot[w];
        if (e < p.n_local) off[e] = before + x - v;
        __syncthreads();  // every thread has read carry and warp_tot
        if (threadIdx.x == 0) {
            int total = carry;
            for (int w = 0; w < warps; ++w) total += warp_tot[w];
            carry = total;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) off[p.n_local] = carry;
    __syncthreads();  // the offsets are visible to the whole block
    for (int j = threadIdx.x; j < p.tiles; j += blockDim.x) {
        int row = j * p.block_m;
        int e = -1, end = 0;
        if (row < off[p.n_local]) {
            int lo = 0, hi = p.n_local - 1;  // last e with off[e] <= row
            while (lo < hi) {
                int mid = (lo + hi + 1) >> 1;
                if (off[mid] <= row) lo = mid; else hi = mid - 1;
            }
            e = lo;
            end = off[e] + counts[e];
        }
        ((int*)p.tile_expert)[j] = e;
        ((int*)p.tile_end)[j] = end;
    }
}

struct PermuteParams {
    u64 x;        // [T, H] activations
    u64 ids;      // [T*k] i32
    u64 pos;      // [T*k] i32
    u64 offsets;  // [n_local + 1] i32 (contiguous) or 0 (masked)
    u64 weights;  // [T*k] f32 (scales the input when scale_input)
    u64 a;        // [rows, H] out
    u64 row_of;   // [T*k] i32 out: layout row, -1 when not local
    int pairs, k, hidden, slot_start;
    int max_m, scale_input;
    u64 token_of_row;  // [rows] i32 out, or 0: gather mode records tokens instead of copying rows
};

// One block per (token, choice): copies the token's row into its layout row. In gather mode
// (token_of_row) there is no row to copy, so one thread takes a pair (the launch then has
// ceil(pairs / blockDim) blocks; a block a pair cost 23 us at 32768 pairs).
template <class Tag>
__device__ void permute(const PermuteParams& p) {
    const int i = p.token_of_row ? blockIdx.x * blockDim.x + threadIdx.x : blockIdx.x;
    if (i >= p.pairs) return;
    const int pos = ((const int*)p.pos)[i];
    int row = -1;
    if (pos >= 0) {
        int l = ((const int*)p.ids)[i] - p.slot_start;
        row = p.offsets ? ((const int*)p.offsets)[l] + pos : l * p.max_m + pos;
    }
    const int t = i / p.k;
    if (p.token_of_row) {
        ((int*)p.row_of)[i] = row;
        if (row >= 0) ((int*)p.token_of_row)[row] = t;
        return;
    }
    if (threadIdx.x == 0) ((int*)p.row_of)[i] = row;
    if (row < 0) return;
    const uint4* src = (const uint4*)((const u16*)p.x + (size_t)t * p.hidden);
    uint4* dst = (uint4*)((u16*)p.a + (size_t)row * p.hidden);
    const float s = p.scale_input ? ((const float*)p.weights)[i] : 1.f;
    for (int c = threadIdx.x; c < p.hidden / 8; c += blockDim.x) {
        uint4 v = src[c];
        if (p.scale_input) {
            u16* e = (u16*)&v;
#pragma unroll
            for (int j = 0; j < 8; ++j) e[j] = from_f32(to_f32(e[j], Tag()) * s, Tag());
        }
        dst[c] = v;
    }
}
extern "C" __global__ void moe_permute_bf16(PermuteParams p) { permute<Bf16Tag>(p); }
extern "C" __global__ void moe_permute_f16(PermuteParams p) { permute<F16Tag>(p); }

struct UnpermuteParams {
    u64 y;        // [rows, H] expert outputs: f32, or 16-bit when y_elem != 0
    u64 row_of;   // [T*k] i32
    u64 weights;  // [T*k] f32
    u64 out;      // [T, H] f32
    int tokens, k, hidden, unweighted;
    long long split_stride;  // elements between split-K partials of y
    int splits, y_elem;      // y_elem: 0 f32, 1 bf16, 2 f16 (one split only)
};

__device__ __forceinline__ float4 load_y4(const UnpermuteParams& p, size_t i4) {
    if (p.y_elem == 0) return ((const float4*)p.y)[i4];
    const uint2 v = ((const uint2*)p.y)[i4];
    const u16 e[4] = {(u16)(v.x & 0xFFFF), (u16)(v.x >> 16), (u16)(v.y & 0xFFFF), (u16)(v.y >> 16)};
    if (p.y_elem == 1)
        return make_float4(to_f32(e[0], Bf16Tag()), to_f32(e[1], Bf16Tag()), to_f32(e[2], Bf16Tag()),
                           to_f32(e[3], Bf16Tag()));
    return make_float4(to_f32(e[0], F16Tag()), to_f32(e[1], F16Tag()), to_f32(e[2], F16Tag()), to_f32(e[3], F16Tag()));
}

// out[t] = sum over local choices of w * y[row] (w = 1 when the weight scaled the input), the
// choices taken in groups of G: all loads of a group are in flight before its first add, and the
// sum keeps the order j = 0, 1, .. for every G (results are bitwise the same).
template <int G>
__device__ __forceinline__ void unpermute(const UnpermuteParams& p) {
    const int t = blockIdx.x;
    const int* row_of = (const int*)p.row_of + (size_t)t * p.k;
    const float* w = (const float*)p.weights + (size_t)t * p.k;
    const float4* y = (const float4*)p.y;
    float4* out = (float4*)((float*)p.out + (size_t)t * p.hidden);
    const int h4 = p.hidden / 4;
    for (int c = threadIdx.x; c < h4; c += blockDim.x) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j0 = 0; j0 < p.k; j0 += G) {
            int r[G];
            float4 v[G];
#pragma unroll
            for (int u = 0; u < G; ++u) {
                r[u] = j0 + u < p.k ? row_of[j0 + u] : -1;
                v[u] = r[u] >= 0 ? load_y4(p, (size_t)r[u] * h4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < G; ++u) {
                if (r[u] < 0) continue;
                float4 vu = v[u];
                for (int z = 1; z < p.splits; ++z) {
                    float4 q = y[(size_t)z * (p.split_stride / 4) + (size_t)r[u] * h4 + c];
                    vu.x += q.x;
                    vu.y += q.y;
                    vu.z += q.z;
                    vu.w += q.w;
                }
                const float s = p.unweighted ? 1.f : w[j0 + u];
                acc.x += s * vu.x;
                acc.y += s * vu.y;
                acc.z += s * vu.z;
                acc.w += s * vu.w;
            }
        }
        out[c] = acc;
    }
}

// One choice at a time: 44 registers, more resident blocks; the host takes it below k = 8.
extern "C" __global__ void moe_unpermute(UnpermuteParams p) { unpermute<1>(p); }

// Groups of 8 (the host takes it from k = 8): one dependent load at a time left the kernel
// latency-bound there. 66 registers against 44 (fewer resident blocks), so it lost at k = 4
// (gpt-oss-20b T = 4096: 1.72 -> 1.78 ms a forward) and won at k = 8 (qwen3-30b-a3b T = 16384:
// 2.85 -> 2.75 ms).
extern "C" __global__ void moe_unpermute_wide(UnpermuteParams p) { unpermute<8>(p); }

struct SharedGateParams {
    u64 x;     // [T, H]
    u64 gate;  // [H] f32
    u64 out;   // [T] f32: sigmoid(x . gate)
    int tokens, hidden;
};

// One warp per token.
template <class Tag>
__device__ void shared_gate(const SharedGateParams& p) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (t >= p.tokens) return;
    const u16* x = (const u16*)p.x + (size_t)t * p.hidden;
    const float* g = (const float*)p.gate;
    float acc = 0.f;
    for (int h = lane; h < p.hidden; h += 32) acc += to_f32(x[h], Tag()) * g[h];
    acc = warp_sum(acc);
    if (lane == 0) ((float*)p.out)[t] = sigmoid_f(acc);
}
extern "C" __global__ void moe_shared_gate_bf16(SharedGateParams p) { shared_gate<Bf16Tag>(p); }
extern "C" __global__ void moe_shared_gate_f16(SharedGateParams p) { shared_gate<F16Tag>(p); }

struct FinalizeParams {
    u64 routed;  // [T, H] f32
    u64 shared;  // [T, H] f32 or 0
    u64 gate;    // [T] f32 or 0
    u64 out;     // [T, H] activation dtype
    long long n;
    int hidden, pad;
};

template <class Tag>
__device__ void finalize(const FinalizeParams& p) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    float v = ((const float*)p.routed)[i];
    if (p.shared) {
        float g = p.gate ? ((const float*)p.gate)[i / p.hidden] : 1.f;
        v += g * ((const float*)p.shared)[i];
    }
    ((u16*)p.out)[i] = from_f32(v, Tag());
}
extern "C" __global__ void moe_finalize_bf16(FinalizeParams p) { finalize<Bf16Tag>(p); }
extern "C" __global__ void moe_finalize_f16(FinalizeParams p) { finalize<F16Tag>(p); }

struct FillParams {
    u64 out;
    long long n;
    float scale;
    u32 seed;
};

// Deterministic uniform(-scale, scale) fill (benchmarks build large expert stacks on the device).
__device__ __forceinline__ float hash_uniform(u64 i, u32 seed) {
    u64 x = i * 0x9E3779B97F4A7C15ull + ((u64)seed << 32 | seed);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (float)(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

template <class Tag>
__device__ void fill_random16(const FillParams& p) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long long)gridDim.x * blockDim.x)
        ((u16*)p.out)[i] = from_f32(hash_uniform(i, p.seed) * p.scale, Tag());
}
extern "C" __global__ void moe_fill_random_bf16(FillParams p) { fill_random16<Bf16Tag>(p); }
extern "C" __global__ void moe_fill_random_f16(FillParams p) { fill_random16<F16Tag>(p); }
extern "C" __global__ void moe_fill_random_f32(FillParams p) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long long)gridDim.x * blockDim.x)
        ((float*)p.out)[i] = hash_uniform(i, p.seed) * p.scale;
}

// FP8 activations that arrive in the wire form of post-quant dispatch (moe_core's
// quant::activation): e4m3 bytes [T, K] and f32 scales [T, K / 128], token-major.
struct F8RowsParams {
    u64 q_src;   // [src_rows, K] e4m3
    u64 s_src;   // [src_rows, K / 128] f32
    u64 dest;    // place: [src_rows * top_k] i32 layout rows (-1: none)
    u64 q;       // place: [rows, K] e4m3 out
    u64 scales;  // place: [K / 128, rows] f32 out (the FP8 GEMM's activation scales)
    u64 x;       // dequantize: [src_rows, K] activation dtype out
    int src_rows, K, top_k, rows;
};

// e4m3fn (no infinities; 0x7F / 0xFF are NaN) to f32, subnormals included.
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    const u32 sign = (b & 0x80u) << 24, e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) return __uint_as_float(0x7FC00000u | sign);
    // Normal: exponent e - 7 (+ 127); subnormal: m * 2^-9.
    const float v = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
    return __uint_as_float(__float_as_uint(v) | sign);
}

// A block per source row: its K bytes and K / 128 scales go to each of its layout rows, the
// scales transposed into the GEMM's [K / 128, rows] order (the same rows moe_quant_rows fills
// from 16-bit activations).
extern "C" __global__ void moe_place_f8_rows(F8RowsParams p) {
    const int src = blockIdx.x;
    if (src >= p.src_rows) return;
    const int groups = p.K / 128;
    const uint4* s = (const uint4*)((const unsigned char*)p.q_src + (size_t)src * p.K);
    const float* ss = (const float*)p.s_src + (size_t)src * groups;
    for (int j = 0; j < p.top_k; ++j) {
        const int row = ((const int*)p.dest)[(size_t)src * p.top_k + j];
        if (row < 0) continue;
        uint4* d = (uint4*)((unsigned char*)p.q + (size_t)row * p.K);
        for (int c = threadIdx.x; c < p.K / 16; c += blockDim.x) d[c] = s[c];
        for (int g = threadIdx.x; g < groups; g += blockDim.x) ((float*)p.scales)[(size_t)g * p.rows + row] = ss[g];
    }
}

// A block per source row: q * scale in the activation dtype, for the paths that take 16-bit
// activations (decode, masked, weight-only GEMMs).
template <class Tag>
__device__ void dequant_f8_rows(const F8RowsParams& p) {
    const int src = blockIdx.x;
    if (src >= p.src_rows) return;
    const unsigned char* q = (const unsigned char*)p.q_src + (size_t)src * p.K;
    const float* s = (const float*)p.s_src + (size_t)src * (p.K / 128);
    u16* x = (u16*)p.x + (size_t)src * p.K;
    for (int c = threadIdx.x; c < p.K; c += blockDim.x) x[c] = from_f32(e4m3_to_f32(q[c]) * s[c / 128], Tag());
}
extern "C" __global__ void moe_dequant_f8_rows_bf16(F8RowsParams p) { dequant_f8_rows<Bf16Tag>(p); }
extern "C" __global__ void moe_dequant_f8_rows_f16(F8RowsParams p) { dequant_f8_rows<F16Tag>(p); }
