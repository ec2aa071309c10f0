// Shared device helpers for every MoE kernel module. Header-free on purpose: NVRTC compiles these
// sources without any CUDA include directory, so CI needs only libnvrtc.
//
// Element types are raw 16-bit storage (`u16`); conversions go through PTX `cvt` (sm_80+).

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Must match `GemmMode` in src/kernels.rs.
#define MOE_MODE_CONTIGUOUS 0
#define MOE_MODE_MASKED 1
#define MOE_MODE_DENSE 2
// Must match `ActKind` in src/kernels.rs.
#define MOE_ACT_SWIGLU 0
#define MOE_ACT_GPTOSS 1
#define MOE_ACT_GELU_TANH 2

// Decode-sized forwards (decode.cu, and embedded by quant_gemm.cu's packed-weight decode).
struct DecodeParams {
    u64 x;        // [T, H] activations
    u64 ids;      // [T*k] i32 slot ids
    u64 weights;  // [T*k] f32 routing weights
    u64 w13;      // [n_local, 2I, H]: gate rows then up rows
    u64 b13;      // [n_local, 2I] f32 or 0
    u64 w2;       // [n_local, H, I]
    u64 b2;       // [n_local, H] f32 or 0
    u64 act;      // [T*k, I] activation dtype (scratch)
    u64 out;      // [T, H] f32
    u64 err;      // int flag: -(1 + pair) on an out-of-range slot id
    int tokens, k, hidden, inter;
    int slot_start, n_local, slot_total, act_kind;
    float alpha, limit;
    int scale_input, pad;
};

struct Bf16Tag {};
struct F16Tag {};

__device__ __forceinline__ float to_f32(u16 v, Bf16Tag) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ float to_f32(u16 v, F16Tag) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ u16 from_f32(float f, Bf16Tag) {
    u16 v;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}
__device__ __forceinline__ u16 from_f32(float f, F16Tag) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float c = 0.7978845608f;
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float apply_act(int act, float g, float u, float alpha, float limit) {
    if (act == MOE_ACT_SWIGLU) return g * sigmoid_f(g) * u;
    if (act == MOE_ACT_GPTOSS) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        return (u + 1.0f) * g * sigmoid_f(alpha * g);
    }
    return gelu_tanh_f(g) * u;
}

// ---- grouped GEMM parameters and the tile walk (grouped_gemm.cu, and quant_gemm.cu's QGemmParams) ----
// Must match `GemmParams` in src/kernels.rs.
struct GemmParams {
    u64 a;            // [rows, K]
    u64 w;            // [experts, n_total, K]
    u64 bias;         // [experts, n_total] f32 or 0
    u64 out;          // gate_up: [rows, N] act dtype; down: [rows, N] f32
    u64 tile_expert;  // contiguous mode
    u64 tile_end;     // contiguous mode
    u64 counts;       // masked mode
    int K, N, mode, max_m;
    int m_total, tiles_per_expert, act, num_n;  // num_n: column blocks (the grid is num_m * num_n)
    float alpha, limit;
    long long split_stride;  // down with split K: elements between the partial outputs (grid z)
};

// Expert and row range of row tile `tile`; false when the tile holds no rows.
__device__ __forceinline__ bool tile_rows(const GemmParams& p, int tile, int bm, int& e, int& row0, int& row_end) {
    if (p.mode == MOE_MODE_CONTIGUOUS) {
        e = ((const int*)p.tile_expert)[tile];
        if (e < 0) return false;
        row0 = tile * bm;
        row_end = ((const int*)p.tile_end)[tile];
    } else if (p.mode == MOE_MODE_MASKED) {
        e = tile / p.tiles_per_expert;
        row0 = e * p.max_m + (tile % p.tiles_per_expert) * bm;
        row_end = e * p.max_m + ((const int*)p.counts)[e];
    } else {
        e = 0;
        row0 = tile * bm;
        row_end = p.m_total;
    }
    return row0 < row_end;
}

// Block order: the grid is one dimension over (row tile, column block), grouped by GEMM_GROUP_M
// row tiles: blocks that run together share a group's weight tiles (read once from DRAM, then
// from L2) and its activation rows. Column-block-major order would re-read every expert's
// weights once per row tile.
#define GEMM_GROUP_M 8
__device__ __forceinline__ void block_coords_of(int b, int num_m, int num_n, int& tile, int& nb) {
    const int group = b / (GEMM_GROUP_M * num_n), first = group * GEMM_GROUP_M;
    const int gm = min(num_m - first, GEMM_GROUP_M);
    const int r = b - group * GEMM_GROUP_M * num_n;
    tile = first + r % gm;
    nb = r / gm;
}
__device__ __forceinline__ void block_coords(const GemmParams& p, int& tile, int& nb) {
    block_coords_of(blockIdx.x, gridDim.x / p.num_n, p.num_n, tile, nb);
}

// Weight row of local B row n (gate/up interleaved by 8 for the fused epilogue).
template <bool GATE_UP>
__device__ __forceinline__ int b_row(int n, int n0, int N, bool& ok) {
    if (GATE_UP) {
        int col = n0 + (n >> 4) * 8 + (n & 7);
        ok = col < N;
        return (n & 8) ? N + col : col;
    } else {
        int col = n0 + n;
        ok = col < N;
        return col;
    }
}

// ---- programmatic dependent launch (sm_90+; no-ops below, and when launched without it) ----
// A kernel launched with a programmatic edge (src/device.rs `Dep::Programmatic`) may start while
// its predecessor still runs: it does work that reads only older data (routing, weights) and
// then waits for the predecessor's completion and memory flush before reading its outputs.
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Asks L2 to fetch `bytes` (a multiple of 16, 16-byte aligned) at `p` without waiting.
__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// ---- async copies and tensor-core fragments (sm_80+) ----
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte global->shared copy; `bytes` = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, Bf16Tag) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, F16Tag) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
