// Weight-only quantized grouped GEMMs: the expert weights stay packed in device memory (4-bit
// E2M1 / int4 codes, int8, e4m3 bytes) and are dequantized per k-tile into a bf16/f16 shared
// tile right before the tensor-core MMAs (mma.sync m16n8k16, f32 accumulate). Packed bytes and
// their scale words stream through a STAGES-deep cp.async ring, so a decode-sized GEMM reads
// only the packed bytes from DRAM.
//
// `out = A[rows, K] x dequant(W[e])^T`, W packed `[experts, n_total, K * BITS / 8]` (nn.Linear
// order). Row tiles map to experts exactly like grouped_gemm.cu (contiguous / masked / dense).
// Scale words (prepared at upload by src/quant.rs) are `[experts, K / KSPAN, n_total]` of SW
// bytes, so the scales of one k-tile and 8 consecutive weight rows are 16-byte aligned chunks.
// Per output column (`col_scale [experts, n_total]`) and per expert (`exp_scale [experts]`)
// factors are applied to the f32 accumulators in the epilogue.
//
// The module is compiled once per (format, dtype): QFMT and MOE_QGEMM_BF16 / _F16 are
// prepended by src/kernels.rs.

#define QG_BK 64
#define QG_BN 128
#define QG_PAD 8
#define QG_STAGES 4

// Formats; must match `QuantKind` in src/kernels.rs.
#define QFMT_MXFP4 0
#define QFMT_NVFP4 1
#define QFMT_INT4 2
#define QFMT_INT8 3
#define QFMT_FP8_BLOCK 4
#define QFMT_FP8_TENSOR 5

#if QFMT == QFMT_MXFP4
#define QG_BITS 4
#define QG_KSPAN 64
#define QG_SW 2
#elif QFMT == QFMT_NVFP4
#define QG_BITS 4
#define QG_KSPAN 64
#define QG_SW 4
#elif QFMT == QFMT_INT4
#define QG_BITS 4
#define QG_KSPAN 128
#define QG_SW 4
#elif QFMT == QFMT_INT8
#define QG_BITS 8
#define QG_KSPAN 0
#define QG_SW 0
#elif QFMT == QFMT_FP8_BLOCK
#define QG_BITS 8
#define QG_KSPAN 128
#define QG_SW 4
#elif QFMT == QFMT_FP8_TENSOR
#define QG_BITS 8
#define QG_KSPAN 0
#define QG_SW 0
#endif

struct QGemmParams {
    u64 a;            // [rows, K] act dtype
    u64 w;            // packed [experts, n_total, K * BITS / 8]
    u64 scales;       // scale words [experts, K / KSPAN, n_total] of SW bytes, or 0
    u64 col_scale;    // [experts, n_total] f32 or 0
    u64 exp_scale;    // [experts] f32 or 0
    u64 bias;         // [experts, n_total] f32 or 0
    u64 out;          // gate_up: [rows, N] act dtype; down: [rows, N] f32
    u64 tile_expert;  // contiguous mode
    u64 tile_end;     // contiguous mode
    u64 counts;       // masked mode
    int K, N, mode, max_m;
    int m_total, tiles_per_expert, act, num_n;
    float alpha, limit;
    long long split_stride;
};

__device__ __forceinline__ bool qg_tile_rows(const QGemmParams& p, int tile, int bm, int& e, int& row0,
                                             int& row_end) {
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

// Same grouped block order as grouped_gemm.cu: 8 row tiles share a column block's weights.
__device__ __forceinline__ void qg_block_coords(const QGemmParams& p, int& tile, int& nb) {
    const int b = blockIdx.x, num_n = p.num_n;
    const int num_m = gridDim.x / num_n;
    const int group = b / (8 * num_n), first = group * 8;
    const int gm = min(num_m - first, 8);
    const int r = b - group * 8 * num_n;
    tile = first + r % gm;
    nb = r / gm;
}

// Weight row of local B row n: gate_up interleaves 8 gate rows with the 8 matching up rows.
template <bool GATE_UP>
__device__ __forceinline__ int qg_b_row(int n, int n0, int N, bool& ok) {
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

// ---- 16-bit pair arithmetic (sm_80+) ----
__device__ __forceinline__ u32 pack2(float lo, float hi, Bf16Tag) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ u32 pack2(float lo, float hi, F16Tag) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c, Bf16Tag) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c, F16Tag) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// a * b (adding -0 keeps the sign of a zero product).
template <class Tag>
__device__ __forceinline__ u32 mul2(u32 a, u32 b, Tag t) {
    return fma2(a, b, 0x80008000u, t);
}
__device__ __forceinline__ u32 one2(Bf16Tag) { return 0x3F803F80u; }
__device__ __forceinline__ u32 one2(F16Tag) { return 0x3C003C00u; }

// e4m3fn byte -> f32 (exact): the byte shifted into an f16 is the value times 2^-8.
__device__ __forceinline__ float e4m3_f32(u32 b) {
    u16 h = (u16)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f * 256.0f;
}

// ---- bit-level conversions to 16-bit pairs (no tables, no shared memory) ----
// The host repacks every 32-bit word of packed weights so that one shift + mask puts two
// consecutive elements into the low and high halves: 4-bit words hold elements (2k, 2k + 1) at
// nibbles (k, k + 4). fp8 bytes stay in order (the FP8 tensor-core GEMM reads them as they are);
// one byte permute per word does the same for them.
// E2M1 / e4m3 bits are moved into the 16-bit exponent/mantissa fields as they are, which gives
// the value times a constant power of two (subnormals included), undone by one multiply.
__device__ __forceinline__ u32 fp4_bits(u32 t, Bf16Tag) {
    return ((t << 6) & 0x01C001C0u) | ((t << 12) & 0x80008000u);  // value * 2^-126
}
__device__ __forceinline__ u32 fp4_bits(u32 t, F16Tag) {
    return ((t << 9) & 0x0E000E00u) | ((t << 12) & 0x80008000u);  // value * 2^-14
}
__device__ __forceinline__ u32 fp4_unscale(Bf16Tag) { return 0x7E807E80u; }  // 2^126
__device__ __forceinline__ u32 fp4_unscale(F16Tag) { return 0x74007400u; }   // 2^14
__device__ __forceinline__ u32 fp8_bits(u32 t, Bf16Tag) {
    return ((t << 4) & 0x07F007F0u) | ((t << 8) & 0x80008000u);  // value * 2^-120
}
__device__ __forceinline__ u32 fp8_bits(u32 t, F16Tag) {
    return ((t << 7) & 0x3F803F80u) | ((t << 8) & 0x80008000u);  // value * 2^-8
}
__device__ __forceinline__ u32 fp8_unscale(Bf16Tag) { return 0x7B807B80u; }  // 2^120
__device__ __forceinline__ u32 fp8_unscale(F16Tag) { return 0x5C005C00u; }   // 2^8
// 4-bit code q as the 16-bit value MAGIC + q (the code lands in the low mantissa bits).
__device__ __forceinline__ u32 int4_magic(Bf16Tag) { return 0x43004300u; }  // 128
__device__ __forceinline__ u32 int4_magic(F16Tag) { return 0x64006400u; }   // 1024
__device__ __forceinline__ float fp4_unscale_f(Bf16Tag) { return 8.507059173023462e37f; }  // 2^126
__device__ __forceinline__ float fp4_unscale_f(F16Tag) { return 16384.0f; }
// Whether a positive factor is a normal number of the 16-bit type.
__device__ __forceinline__ bool fits16(float s, Bf16Tag) { return s < 3.0e38f && s >= 1.2e-38f; }
__device__ __forceinline__ bool fits16(float s, F16Tag) { return s <= 65504.0f && s >= 6.2e-5f; }

// Dequantizes one 16-byte chunk of packed row bytes (chunk j of the k-tile) into 16-bit
// values at `dst` (EPC = 128 / BITS elements). `sw` is this row's scale word for the k-tile.
template <class Tag>
__device__ __forceinline__ void qg_dequant_chunk(const uint4 q, u32 sw, int j, u16* dst) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
#if QG_BITS == 4
    // 32 elements; word i holds elements 8 i .. 8 i + 7.
#if QFMT == QFMT_MXFP4
    const u32 code = (sw >> (8 * j)) & 0xFFu;  // one E8M0 per 32 elements
    // 2^(code - 127) times the bit-placement constant, folded into one factor when it fits.
    const float s = __uint_as_float(code == 0 ? 0x00400000u : (code << 23)) * fp4_unscale_f(Tag());
    const bool fold = fits16(s, Tag());
    const u32 s2 = fold ? pack2(s, s, Tag()) : pack2(__uint_as_float(code == 0 ? 0x00400000u : (code << 23)),
                                                    __uint_as_float(code == 0 ? 0x00400000u : (code << 23)), Tag());
#elif QFMT == QFMT_NVFP4
    // Two e4m3 scales per 32 elements (16 each); the fp32 global scale is applied in the epilogue.
    const float s_lo = e4m3_f32((sw >> (16 * j)) & 0xFFu), s_hi = e4m3_f32((sw >> (16 * j + 8)) & 0xFFu);
    const u32 s2a = pack2(s_lo, s_lo, Tag()), s2b = pack2(s_hi, s_hi, Tag());
#else   // INT4: sw = (16-bit scale, 16-bit -(MAGIC + zero)) pair
    const u32 s2 = (sw & 0xFFFFu) * 0x10001u;
    const u32 nz2 = (sw >> 16) * 0x10001u;
#endif
    u32 outw[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 t = words[i] >> (4 * k);
#if QFMT == QFMT_MXFP4
            u32 v = fp4_bits(t, Tag());
            v = fold ? mul2(v, s2, Tag()) : mul2(mul2(v, fp4_unscale(Tag()), Tag()), s2, Tag());
#elif QFMT == QFMT_NVFP4
            u32 v = mul2(mul2(fp4_bits(t, Tag()), fp4_unscale(Tag()), Tag()), i < 2 ? s2a : s2b, Tag());
#else
            u32 v = (t & 0x000F000Fu) | int4_magic(Tag());
            v = mul2(fma2(v, one2(Tag()), nz2, Tag()), s2, Tag());
#endif
            outw[i * 4 + k] = v;
        }
    }
    uint4* d = (uint4*)dst;
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = make_uint4(outw[4 * i], outw[4 * i + 1], outw[4 * i + 2], outw[4 * i + 3]);
#elif QFMT == QFMT_INT8
    // 16 signed bytes -> 16 elements (exact conversions).
    u32 outw[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float f[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) f[b] = (float)(signed char)((words[i] >> (8 * b)) & 0xFFu);
        outw[2 * i] = pack2(f[0], f[1], Tag());
        outw[2 * i + 1] = pack2(f[2], f[3], Tag());
    }
    uint4* d = (uint4*)dst;
    d[0] = make_uint4(outw[0], outw[1], outw[2], outw[3]);
    d[1] = make_uint4(outw[4], outw[5], outw[6], outw[7]);
#else
    // e4m3: 16 bytes -> 16 elements; FP8 block scales the block here, FP8 tensor in the epilogue.
#if QFMT == QFMT_FP8_BLOCK
    const float s = __uint_as_float(sw);
    const u32 s2 = pack2(s, s, Tag());
#endif
    u32 outw[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // Bytes (0, 2) then (1, 3) into the two halves: elements (0, 1) and (2, 3).
            const u32 w = __byte_perm(words[i], 0, 0x3120);
            u32 v = mul2(fp8_bits(w >> (8 * h), Tag()), fp8_unscale(Tag()), Tag());
#if QFMT == QFMT_FP8_BLOCK
            v = mul2(v, s2, Tag());
#endif
            outw[2 * i + h] = v;
        }
    }
    uint4* d = (uint4*)dst;
    d[0] = make_uint4(outw[0], outw[1], outw[2], outw[3]);
    d[1] = make_uint4(outw[4], outw[5], outw[6], outw[7]);
#endif
}

template <int MI, int NI, bool GATE_UP, class Tag>
__device__ __forceinline__ void qg_store(const QGemmParams& p, float (&acc)[MI][NI][4], int e, int row_base,
                                         int row_end, int col_base, int n0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int N = p.N, n_total = GATE_UP ? 2 * N : N;
    const float* bias = (p.bias && blockIdx.z == 0) ? (const float*)p.bias + (size_t)e * n_total : nullptr;
    const float* cs = p.col_scale ? (const float*)p.col_scale + (size_t)e * n_total : nullptr;
    const float es = p.exp_scale ? ((const float*)p.exp_scale)[e] : 1.0f;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row_base + i * 16 + g + h * 8;
            if (row >= row_end) continue;
            if (GATE_UP && p.split_stride > 0) {
                // Split K: raw f32 partial sums [split, row, 2N]; qg_act adds bias + activation.
                float* out = (float*)p.out + blockIdx.z * p.split_stride + (size_t)row * 2 * N;
#pragma unroll
                for (int j = 0; j < NI / 2; ++j) {
                    const int col = n0 + ((col_base + j * 16) >> 4) * 8 + t4 * 2;
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        if (col + c >= N) continue;
                        out[col + c] = acc[i][2 * j][h * 2 + c] * es * (cs ? cs[col + c] : 1.f);
                        out[N + col + c] = acc[i][2 * j + 1][h * 2 + c] * es * (cs ? cs[N + col + c] : 1.f);
                    }
                }
            } else if (GATE_UP) {
                u16* out = (u16*)p.out + (size_t)row * N;
#pragma unroll
                for (int j = 0; j < NI / 2; ++j) {
                    const int col = n0 + ((col_base + j * 16) >> 4) * 8 + t4 * 2;
                    float v[2];
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        float gt = acc[i][2 * j][h * 2 + c] * es, up = acc[i][2 * j + 1][h * 2 + c] * es;
                        if (col + c < N) {
                            if (cs) {
                                gt *= cs[col + c];
                                up *= cs[N + col + c];
                            }
                            if (bias) {
                                gt += bias[col + c];
                                up += bias[N + col + c];
                            }
                        }
                        v[c] = apply_act(p.act, gt, up, p.alpha, p.limit);
                    }
                    if (col + 1 < N) {
                        u32 packed = (u32)from_f32(v[0], Tag()) | ((u32)from_f32(v[1], Tag()) << 16);
                        *(u32*)(out + col) = packed;
                    } else if (col < N) {
                        out[col] = from_f32(v[0], Tag());
                    }
                }
            } else {
                float* out = (float*)p.out + blockIdx.z * p.split_stride + (size_t)row * N;
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    const int col = n0 + col_base + j * 8 + t4 * 2;
                    float v0 = acc[i][j][h * 2] * es, v1 = acc[i][j][h * 2 + 1] * es;
                    if (cs) {
                        if (col < N) v0 *= cs[col];
                        if (col + 1 < N) v1 *= cs[col + 1];
                    }
                    if (bias) {
                        if (col < N) v0 += bias[col];
                        if (col + 1 < N) v1 += bias[col + 1];
                    }
                    if (col + 1 < N) *(float2*)(out + col) = make_float2(v0, v1);
                    else if (col < N) out[col] = v0;
                }
            }
        }
    }
}

// BM x 128 output tile, BK = 64, 4 warps (WARPS_M x WARPS_N), QG_STAGES-deep cp.async ring of
// A tiles, packed weight tiles and scale words; one dequantized B tile in shared memory.
// Requires K % 64 == 0 and N % 8 == 0 (checked by the provider).
template <int BM, int WARPS_M, int WARPS_N, bool GATE_UP, class Tag>
__device__ __forceinline__ void quant_gemm(const QGemmParams& p) {
    constexpr int BN = QG_BN, BK = QG_BK, STAGES = QG_STAGES;
    constexpr int LD = BK + QG_PAD;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int ACH = BK / 8;                 // 16-byte A chunks per row per stage
    constexpr int RB = BK * QG_BITS / 8;        // packed bytes per weight row per stage
    constexpr int WCH = RB / 16;                // 16-byte packed chunks per row per stage
    constexpr int EPC = 128 / QG_BITS;          // elements per packed chunk
    constexpr int A_BYTES = BM * LD * 2;
    constexpr int W_BYTES = BN * RB;
    constexpr int S_BYTES = QG_SW > 0 ? BN * QG_SW : 16;
    static_assert(WN % 16 == 0, "warp N tile must hold gate/up pairs of 8 columns");
    extern __shared__ __align__(16) unsigned char qg_smem[];
    u16* As = (u16*)qg_smem;
    unsigned char* Ws = qg_smem + STAGES * A_BYTES;
    unsigned char* Ss = Ws + STAGES * W_BYTES;
    u16* Bs = (u16*)(Ss + STAGES * S_BYTES);

    int e, row0, row_end, tile, nb;
    qg_block_coords(p, tile, nb);
    if (!qg_tile_rows(p, tile, BM, e, row0, row_end)) return;
    const int K = p.K, N = p.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);
    const size_t row_bytes = (size_t)K * QG_BITS / 8;
    const u16* A = (const u16*)p.a;
    const unsigned char* W = (const unsigned char*)p.w + (size_t)e * n_total * row_bytes;
#if QG_SW > 0
    const int KS = (K + QG_KSPAN - 1) / QG_KSPAN;
    const unsigned char* S = (const unsigned char*)p.scales + (size_t)e * KS * n_total * QG_SW;
#endif
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        u16* as = As + stage * (A_BYTES / 2);
        unsigned char* ws = Ws + stage * W_BYTES;
        for (int c = tid; c < BM * ACH; c += THREADS) {
            int r = c / ACH, kc = (c % ACH) * 8;
            int row = row0 + r;
            bool ok = row < row_end;
            const u16* src = ok ? A + (size_t)row * K + k0 + kc : A;
            cp_async16(as + r * LD + kc, src, ok ? 16 : 0);
        }
        for (int c = tid; c < BN * WCH; c += THREADS) {
            int n = c / WCH, ch = c % WCH;
            bool ok;
            int wr = qg_b_row<GATE_UP>(n, n0, N, ok);
            const unsigned char* src = ok ? W + (size_t)wr * row_bytes + (size_t)k0 * QG_BITS / 8 + ch * 16 : W;
            cp_async16(ws + n * RB + ch * 16, src, ok ? 16 : 0);
        }
#if QG_SW > 0
        {
            constexpr int R = 16 / QG_SW;  // rows per 16-byte scale chunk (divides 8)
            unsigned char* ss = Ss + stage * S_BYTES;
            const unsigned char* sbase = S + (size_t)(k0 / QG_KSPAN) * n_total * QG_SW;
            for (int c = tid; c < BN / R; c += THREADS) {
                bool ok;
                int wr = qg_b_row<GATE_UP>(c * R, n0, N, ok);
                const unsigned char* src = ok ? sbase + (size_t)wr * QG_SW : sbase;
                cp_async16(ss + c * 16, src, ok ? 16 : 0);
            }
        }
#endif
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    // Split K (down projection, grid z > 1): this block sums k-tiles [kt0, kt0 + KT) only.
    const int KT_ALL = K / BK;
    const int per = (KT_ALL + gridDim.z - 1) / gridDim.z;
    const int kt0 = blockIdx.z * per;
    const int KT = max(0, min(KT_ALL - kt0, per));
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_stage(s, kt0 + s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed everywhere; every warp is done with the previous B tile
        int pf = kt + STAGES - 1;
        if (pf < KT) load_stage(pf % STAGES, kt0 + pf);
        cp_async_commit();
        const int stage = kt % STAGES;
        {
            const unsigned char* ws = Ws + stage * W_BYTES;
#if QG_SW > 0
            const unsigned char* ss = Ss + stage * S_BYTES;
#endif
            for (int u = tid; u < BN * WCH; u += THREADS) {
                const int n = u / WCH, j = u % WCH;
                const uint4 q = *(const uint4*)(ws + n * RB + j * 16);
                u32 sw = 0;
#if QG_SW == 2
                sw = *(const u16*)(ss + n * 2);
#elif QG_SW == 4
                sw = *(const u32*)(ss + n * 4);
#endif
                qg_dequant_chunk<Tag>(q, sw, j, Bs + n * LD + j * EPC);
            }
        }
        __syncthreads();
        const u16* as = As + stage * (A_BYTES / 2);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 af[MI][4];
            u32 bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                int r = wm * WM + i * 16 + (lane & 15);
                int c = kk + (lane >> 4) * 8;
                ldmatrix_x4(af[i], as + r * LD + c);
            }
#pragma unroll
            for (int j = 0; j < NI / 2; ++j) {
                int n = wn * WN + j * 16 + (lane & 7) + (lane >> 4) * 8;
                int c = kk + ((lane >> 3) & 1) * 8;
                u32 r[4];
                ldmatrix_x4(r, Bs + n * LD + c);
                bf[2 * j][0] = r[0];
                bf[2 * j][1] = r[1];
                bf[2 * j + 1][0] = r[2];
                bf[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_16816(acc[i][j], af[i], bf[j][0], bf[j][1], Tag());
        }
    }
    cp_async_wait<0>();
    qg_store<MI, NI, GATE_UP, Tag>(p, acc, e, row0 + wm * WM, row_end, wn * WN, n0);
}

// ---- FP8 tensor cores (sm_89+): e4m3 activations x e4m3 weights, DeepGEMM-style promotion ----
// Activations are quantized per row per 128 channels (scale = amax / 448) by moe_quant_rows;
// the GEMM sums each 128-deep k-block with mma.sync m16n8k32 into a temporary and adds it to the
// f32 accumulator times (activation scale x weight block scale). Used for large groups; decode
// sizes stay on the weight-only kernel above (same bytes of weights, no activation pass).
#if QFMT == QFMT_FP8_BLOCK || QFMT == QFMT_FP8_TENSOR
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
#define MOE_HAS_FP8_MMA 1
#endif

struct QuantRowsParams {
    u64 x;            // [src_rows, K] act dtype
    u64 q;            // [rows, K] e4m3
    u64 scales;       // [K / 128, rows] f32
    u64 dest;         // [src_rows * k] i32 layout rows of source row i (-1: none), or 0: row i itself
    u64 tile_expert;  // [rows / tile_m] i32 or 0; with dest == 0, rows past their tile's end are skipped
    u64 tile_end;     // [rows / tile_m] i32: end of each tile's real rows
    int src_rows, K, k, tile_m;
    int rows, pad;
};

#define QR_ROWS 8   // source rows a block (one warp each): 8 scale words of a group are 32 bytes
#define QR_PAIRS 4  // 128-channel group pairs a warp converts (8 groups, 1024 channels)

// Activations to e4m3 per row per 128 channels: amax over the group, scale = amax / 448,
// q = e4m3(x / scale) (DeepSeek-V3's activation quantization). A warp takes 8 groups of one
// source row (16 lanes a group, 16-byte loads, all loads issued first) and writes the codes and
// scales to each of the row's destinations: the layout rows of a token (the permutation fused
// into the quantization, each token read and converted once) or the row itself.
template <class Tag>
__device__ __forceinline__ void quant_rows(const QuantRowsParams& p) {
#ifdef MOE_HAS_FP8_MMA
    const int src = blockIdx.x * QR_ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (src >= p.src_rows) return;
    if (!p.dest && p.tile_expert) {
        const int t = src / p.tile_m;
        if (((const int*)p.tile_expert)[t] < 0 || src >= ((const int*)p.tile_end)[t]) return;
    }
    const int groups = p.K / 128, half = lane >> 4, c8 = (lane & 15) * 8;
    const int g0 = blockIdx.y * 2 * QR_PAIRS;
    const u16* x = (const u16*)p.x + (size_t)src * p.K;
    uint4 raw[QR_PAIRS];
#pragma unroll
    for (int u = 0; u < QR_PAIRS; ++u) {
        const int g = g0 + 2 * u + half;
        raw[u] = g < groups ? *(const uint4*)(x + g * 128 + c8) : make_uint4(0, 0, 0, 0);
    }
    const int* dest = p.dest ? (const int*)p.dest + (size_t)src * p.k : nullptr;
    const int nd = p.dest ? p.k : 1;
#pragma unroll
    for (int u = 0; u < QR_PAIRS; ++u) {
        const int g = g0 + 2 * u + half;
        const u32 w[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[2 * j] = to_f32((u16)(w[j] & 0xFFFF), Tag());
            v[2 * j + 1] = to_f32((u16)(w[j] >> 16), Tag());
        }
        float m = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
        // The 16 lanes of one group (xor offsets below 16 stay inside the half-warp).
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (g >= groups) continue;
        const float s = m > 0.f ? m / 448.f : 1.f;
        u16 e[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(e[j]) : "f"(v[2 * j + 1] / s), "f"(v[2 * j] / s));
        const uint2 out = make_uint2((u32)e[0] | ((u32)e[1] << 16), (u32)e[2] | ((u32)e[3] << 16));
        for (int j = 0; j < nd; ++j) {
            const int row = dest ? dest[j] : src;
            if (row < 0) continue;
            *(uint2*)((unsigned char*)p.q + (size_t)row * p.K + g * 128 + c8) = out;
            if ((lane & 15) == 0) ((float*)p.scales)[(size_t)g * p.rows + row] = s;
        }
    }
#endif
}

#ifdef MOE_HAS_FP8_MMA
__device__ __forceinline__ void mma_fp8(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

#define F8_BM 128
#define F8_BK 128
#define F8_LDB (F8_BK + 16)
#define F8_STAGES 3

// 128 x 128 output tile, k-blocks of 128, 8 warps (2 x 4, 64 x 32 each), 3-stage cp.async ring
// of A bytes, B bytes, A scales [128 rows] and B scale words [128 rows].
// `p.scales` here = weight scale words (FP8 block; 0 for FP8 tensor); `a_scales` = [K/128, rows].
template <bool GATE_UP, class Tag>
__device__ __forceinline__ void fp8_gemm(const QGemmParams& p, u64 a_scales, int rows_total) {
#ifdef MOE_HAS_FP8_MMA
    constexpr int BM = F8_BM, BN = QG_BN, BK = F8_BK, STAGES = F8_STAGES, LDB = F8_LDB;
    constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 256;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NI = WN / 8;
    constexpr int A_BYTES = BM * LDB, B_BYTES = BN * LDB;
    extern __shared__ __align__(16) unsigned char qg_smem[];
    unsigned char* As = qg_smem;
    unsigned char* Bs = As + STAGES * A_BYTES;
    float* SAs = (float*)(Bs + STAGES * B_BYTES);  // [STAGES][BM]
    float* SBs = SAs + STAGES * BM;                // [STAGES][BN]

    int e, row0, row_end, tile, nb;
    qg_block_coords(p, tile, nb);
    if (!qg_tile_rows(p, tile, BM, e, row0, row_end)) return;
    const int K = p.K, N = p.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);
    const unsigned char* A = (const unsigned char*)p.a;
    const unsigned char* W = (const unsigned char*)p.w + (size_t)e * n_total * K;
    const int KB = K / BK;
    const float* SA = (const float*)a_scales;
#if QFMT == QFMT_FP8_BLOCK
    const unsigned char* S = (const unsigned char*)p.scales + (size_t)e * KB * n_total * 4;
#endif
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int g = lane >> 2, t4 = lane & 3;

    auto load_stage = [&](int stage, int kb) {
        const int k0 = kb * BK;
        unsigned char* as = As + stage * A_BYTES;
        unsigned char* bs = Bs + stage * B_BYTES;
        for (int c = tid; c < BM * (BK / 16); c += THREADS) {
            int r = c / (BK / 16), kc = (c % (BK / 16)) * 16;
            int row = row0 + r;
            bool ok = row < row_end;
            cp_async16(as + r * LDB + kc, ok ? A + (size_t)row * K + k0 + kc : A, ok ? 16 : 0);
        }
        for (int c = tid; c < BN * (BK / 16); c += THREADS) {
            int n = c / (BK / 16), kc = (c % (BK / 16)) * 16;
            bool ok;
            int wr = qg_b_row<GATE_UP>(n, n0, N, ok);
            cp_async16(bs + n * LDB + kc, ok ? W + (size_t)wr * K + k0 + kc : W, ok ? 16 : 0);
        }
        if (tid < BM / 4) {
            // Activation scales of 4 rows (rows_total and row0 are multiples of 4).
            const float* src = SA + (size_t)kb * rows_total + row0 + tid * 4;
            cp_async16(SAs + stage * BM + tid * 4, src, 16);
        }
#if QFMT == QFMT_FP8_BLOCK
        else if (tid < BM / 4 + BN / 4) {
            const int c = tid - BM / 4;
            bool ok;
            int wr = qg_b_row<GATE_UP>(c * 4, n0, N, ok);
            const unsigned char* sb = S + (size_t)kb * n_total * 4;
            cp_async16(SBs + stage * BN + c * 4, ok ? sb + (size_t)wr * 4 : sb, ok ? 16 : 0);
        }
#endif
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KB) load_stage(s, s);
        cp_async_commit();
    }
    for (int kb = 0; kb < KB; ++kb) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int pf = kb + STAGES - 1;
        if (pf < KB) load_stage(pf % STAGES, pf);
        cp_async_commit();
        const int stage = kb % STAGES;
        const unsigned char* as = As + stage * A_BYTES;
        const unsigned char* bs = Bs + stage * B_BYTES;
        float tmp[MI][NI][4];
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) tmp[i][j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 32) {
            u32 af[MI][4];
            u32 bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                int r = wm * WM + i * 16 + (lane & 15);
                int c = kk + (lane >> 4) * 16;
                ldmatrix_x4(af[i], as + r * LDB + c);
            }
#pragma unroll
            for (int j = 0; j < NI / 2; ++j) {
                int n = wn * WN + j * 16 + (lane & 7) + (lane >> 4) * 8;
                int c = kk + ((lane >> 3) & 1) * 16;
                u32 r[4];
                ldmatrix_x4(r, bs + n * LDB + c);
                bf[2 * j][0] = r[0];
                bf[2 * j][1] = r[1];
                bf[2 * j + 1][0] = r[2];
                bf[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_fp8(tmp[i][j], af[i], bf[j][0], bf[j][1]);
        }
        // Promotion: acc += tmp x (activation scale of the row) x (weight scale of the column).
        const float* sa = SAs + stage * BM;
        const float* sb = SBs + stage * BN;
#pragma unroll
        for (int i = 0; i < MI; ++i) {
            const float a0 = sa[wm * WM + i * 16 + g], a1 = sa[wm * WM + i * 16 + g + 8];
#pragma unroll
            for (int j = 0; j < NI; ++j) {
#if QFMT == QFMT_FP8_BLOCK
                const float b0 = sb[wn * WN + j * 8 + t4 * 2], b1 = sb[wn * WN + j * 8 + t4 * 2 + 1];
#else
                const float b0 = 1.f, b1 = 1.f;
#endif
                acc[i][j][0] += tmp[i][j][0] * (a0 * b0);
                acc[i][j][1] += tmp[i][j][1] * (a0 * b1);
                acc[i][j][2] += tmp[i][j][2] * (a1 * b0);
                acc[i][j][3] += tmp[i][j][3] * (a1 * b1);
            }
        }
    }
    cp_async_wait<0>();
    qg_store<MI, NI, GATE_UP, Tag>(p, acc, e, row0 + wm * WM, row_end, wn * WN, n0);
#endif
}

struct Fp8GemmParams {
    QGemmParams g;
    u64 a_scales;
    int rows_total, pad;
};

#define FP8_ENTRY(DT, TAG)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_quant_rows_##DT(QuantRowsParams p) {         \
        quant_rows<TAG>(p);                                                                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 1) f8gemm_gate_up_##DT(Fp8GemmParams p) {        \
        fp8_gemm<true, TAG>(p.g, p.a_scales, p.rows_total);                                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 1) f8gemm_down_##DT(Fp8GemmParams p) {           \
        fp8_gemm<false, TAG>(p.g, p.a_scales, p.rows_total);                                           \
    }
#ifdef MOE_QGEMM_BF16
FP8_ENTRY(bf16, Bf16Tag)
#endif
#ifdef MOE_QGEMM_F16
FP8_ENTRY(f16, F16Tag)
#endif
#endif  // FP8 formats

// Bias + activation over the split-K partial sums of gate_up (decode sizes), real rows only.
struct QActParams {
    u64 partial;  // [splits, rows, 2N] f32
    u64 bias;     // [experts, 2N] f32 or 0
    u64 out;      // [rows, N] act dtype
    u64 tile_expert, tile_end, counts;
    long long split_stride;
    int N, splits, mode, max_m, bm, act;
    float alpha, limit;
};

template <class Tag>
__device__ __forceinline__ void qg_act(const QActParams& p) {
    const int row = blockIdx.y, col = blockIdx.x * blockDim.x + threadIdx.x;
    int e;
    if (p.mode == MOE_MODE_CONTIGUOUS) {
        const int tile = row / p.bm;
        e = ((const int*)p.tile_expert)[tile];
        if (e < 0 || row >= ((const int*)p.tile_end)[tile]) return;
    } else {
        e = row / p.max_m;
        if (row % p.max_m >= ((const int*)p.counts)[e]) return;
    }
    const int N = p.N;
    if (col >= N) return;
    const float* part = (const float*)p.partial + (size_t)row * 2 * N;
    float g = 0.f, u = 0.f;
    for (int s = 0; s < p.splits; ++s) {
        g += part[s * p.split_stride + col];
        u += part[s * p.split_stride + N + col];
    }
    if (p.bias) {
        const float* b = (const float*)p.bias + (size_t)e * 2 * N;
        g += b[col];
        u += b[N + col];
    }
    ((u16*)p.out)[(size_t)row * N + col] = from_f32(apply_act(p.act, g, u, p.alpha, p.limit), Tag());
}

// Tiles: (name, BM, warps along M, warps along N). Must match `QuantTile` in src/kernels.rs.
#define QGEMM_ENTRY(NAME, DT, TAG, BM, WMW, WNW)                                                           \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) qgemm_gate_up_##DT##_##NAME(QGemmParams p) { \
        quant_gemm<BM, WMW, WNW, true, TAG>(p);                                                              \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) qgemm_down_##DT##_##NAME(QGemmParams p) {    \
        quant_gemm<BM, WMW, WNW, false, TAG>(p);                                                             \
    }

#define QACT_ENTRY(DT, TAG) \
    extern "C" __global__ void __launch_bounds__(256) qg_act_##DT(QActParams p) { qg_act<TAG>(p); }

#ifdef MOE_QGEMM_BF16
QGEMM_ENTRY(m16, bf16, Bf16Tag, 16, 1, 4)
QGEMM_ENTRY(m64, bf16, Bf16Tag, 64, 2, 2)
QACT_ENTRY(bf16, Bf16Tag)
#endif
#ifdef MOE_QGEMM_F16
QGEMM_ENTRY(m16, f16, F16Tag, 16, 1, 4)
QGEMM_ENTRY(m64, f16, F16Tag, 64, 2, 2)
QACT_ENTRY(f16, F16Tag)
#endif

// ---- Decode-sized forwards: matrix-vector products on the packed weights ----
// Like decode.cu for 16-bit weights: one warp per output column, one block row per (token,
// choice) pair (gate_up) or per token (down, summing the token's local choices in order), the
// packed bytes streamed once with 16-byte loads and dequantized in registers by the same
// qg_dequant_chunk the tiled GEMM uses. At T = 1 this reads the packed bytes at close to
// bandwidth instead of through 16-row tiles of which 15 rows are empty.
struct QDecodeParams {
    u64 x;        // [T, H] activations
    u64 ids;      // [T*k] i32 slot ids
    u64 weights;  // [T*k] f32
    u64 w13, s13, c13, e13, b13;  // packed [n_local, 2I, H*BITS/8], scale words, col/expert factors, bias
    u64 w2, s2, c2, e2, b2;       // the same for [n_local, H, I]
    u64 act;      // [T*k, I] activation dtype (scratch)
    u64 out;      // [T, H] f32
    u64 err;      // -(1 + pair) on an out-of-range slot id
    int tokens, k, hidden, inter;
    int slot_start, n_local, slot_total, act_kind;
    float alpha, limit;
    int scale_input, pad;
};

#define QD_WARPS 8
#define QD_EPC (128 / QG_BITS)  // elements per 16-byte chunk

// NR packed rows `rows[r]` of expert `l` (rows n_total, reduction K) dotted with the 16-bit
// vector `v` (scaled by `vs` and rounded to the dtype first when `scale_v`), warp-reduced, times
// each row's column and expert factors. Each lane first issues the loads of up to QD_MAXC chunks
// of every row (and their scale words), then dequantizes: NR x QD_MAXC 16-byte loads in flight
// a lane, which a decode-sized grid needs to approach DRAM bandwidth.
#define QD_MAXC 4
template <int NR, class Tag>
__device__ __forceinline__ void qd_rows(u64 w, u64 sc, u64 cs, u64 es, int l, int n_total, const int (&rows)[NR], int K,
                                        const u16* v, bool scale_v, float vs, float (&out)[NR]) {
    const int lane = threadIdx.x & 31, chunks = K / QD_EPC;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * QD_MAXC) {
        uint4 q[NR][QD_MAXC];
        u32 sw[NR][QD_MAXC];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const uint4* wrow = (const uint4*)w + ((size_t)l * n_total + rows[r]) * (size_t)chunks;
#pragma unroll
            for (int i = 0; i < QD_MAXC; ++i) {
                const int c = c0 + 32 * i;
                sw[r][i] = 0;
                if (c < chunks) {
                    q[r][i] = __ldg(wrow + c);
#if QG_KSPAN > 0
                    const int k0 = c * QD_EPC;
                    const unsigned char* sp = (const unsigned char*)sc +
                                              (((size_t)l * ((K + QG_KSPAN - 1) / QG_KSPAN) + k0 / QG_KSPAN) * n_total + rows[r]) * QG_SW;
#if QG_SW == 2
                    sw[r][i] = *(const unsigned short*)sp;
#else
                    sw[r][i] = *(const u32*)sp;
#endif
#endif
                }
            }
        }
#pragma unroll
        for (int i = 0; i < QD_MAXC; ++i) {
            const int c = c0 + 32 * i;
            if (c >= chunks) break;
            const int k0 = c * QD_EPC;
            float xf[QD_EPC];
            const uint4* vv = (const uint4*)(v + k0);
#pragma unroll
            for (int b = 0; b < QD_EPC / 8; ++b) {
                const uint4 xv = vv[b];
                const u16* xe = (const u16*)&xv;
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    float f = to_f32(xe[t], Tag());
                    xf[8 * b + t] = scale_v ? to_f32(from_f32(f * vs, Tag()), Tag()) : f;
                }
            }
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                __align__(16) u16 dq[QD_EPC];
                qg_dequant_chunk<Tag>(q[r][i], sw[r][i], (k0 % QG_BK) / QD_EPC, dq);
#pragma unroll
                for (int t = 0; t < QD_EPC; ++t) acc[r] = fmaf(to_f32(dq[t], Tag()), xf[t], acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        float a = warp_sum(acc[r]);
        if (cs) a *= ((const float*)cs)[(size_t)l * n_total + rows[r]];
        if (es) a *= ((const float*)es)[l];
        out[r] = a;
    }
}

template <class Tag>
__device__ void qdecode_gate_up(const QDecodeParams& p) {
    const int pair = blockIdx.y, t = pair / p.k;
    const int slot = ((const int*)p.ids)[pair];
    if (slot < 0 || slot >= p.slot_total) {
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicCAS((int*)p.err, 0, -(pair + 1));
        return;
    }
    const int l = slot - p.slot_start;
    const int col = blockIdx.x * QD_WARPS + (threadIdx.x >> 5);
    if (l < 0 || l >= p.n_local || col >= p.inter) return;
    const u16* x = (const u16*)p.x + (size_t)t * p.hidden;
    const float s = p.scale_input ? ((const float*)p.weights)[pair] : 1.f;
    const int n_total = 2 * p.inter;
    const int rows[2] = {col, p.inter + col};
    float gu[2];
    qd_rows<2, Tag>(p.w13, p.s13, p.c13, p.e13, l, n_total, rows, p.hidden, x, p.scale_input, s, gu);
    float g = gu[0], u = gu[1];
    if ((threadIdx.x & 31) == 0) {
        if (p.b13) {
            const float* b = (const float*)p.b13 + (size_t)l * n_total;
            g += b[col];
            u += b[p.inter + col];
        }
        ((u16*)p.act)[(size_t)pair * p.inter + col] = from_f32(apply_act(p.act_kind, g, u, p.alpha, p.limit), Tag());
    }
}

template <class Tag>
__device__ void qdecode_down(const QDecodeParams& p) {
    const int t = blockIdx.y;
    const int col = blockIdx.x * QD_WARPS + (threadIdx.x >> 5);
    if (col >= p.hidden) return;
    float acc = 0.f;
    for (int j = 0; j < p.k; ++j) {
        const int pair = t * p.k + j;
        const int l = ((const int*)p.ids)[pair] - p.slot_start;
        if (l < 0 || l >= p.n_local) continue;  // another rank's expert, or a bad id (flagged)
        const u16* a = (const u16*)p.act + (size_t)pair * p.inter;
        const int rows[1] = {col};
        float dd[1];
        qd_rows<1, Tag>(p.w2, p.s2, p.c2, p.e2, l, p.hidden, rows, p.inter, a, false, 1.f, dd);
        float d = dd[0];
        if (p.b2) d += ((const float*)p.b2)[(size_t)l * p.hidden + col];
        acc += (p.scale_input ? 1.f : ((const float*)p.weights)[pair]) * d;
    }
    if ((threadIdx.x & 31) == 0) ((float*)p.out)[(size_t)t * p.hidden + col] = acc;
}

#define QDECODE_ENTRY(DT, TAG)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) qdecode_gate_up_##DT(QDecodeParams p) {               \
        qdecode_gate_up<TAG>(p);                                                                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) qdecode_down_##DT(QDecodeParams p) { qdecode_down<TAG>(p); }
#ifdef MOE_QGEMM_BF16
QDECODE_ENTRY(bf16, Bf16Tag)
#endif
#ifdef MOE_QGEMM_F16
QDECODE_ENTRY(f16, F16Tag)
#endif
