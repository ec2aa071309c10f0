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

// E2M1 magnitudes.
__device__ __forceinline__ float e2m1_f32(u32 c) {
    const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    float v = mag[c & 7];
    return (c & 8) ? -v : v;
}

// The byte -> 16-bit pair table: 4-bit formats look up both nibbles of a byte at once.
template <class Tag>
__device__ __forceinline__ void qg_build_lut(u32* lut) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
#if QFMT == QFMT_INT4
        lut[b] = pack2((float)(b & 15), (float)(b >> 4), Tag());
#else
        lut[b] = pack2(e2m1_f32(b & 15), e2m1_f32(b >> 4), Tag());
#endif
    }
}

// Dequantizes one 16-byte chunk of packed row bytes (chunk j of the k-tile) into 16-bit
// values at `dst` (EPC = 128 / BITS elements). `sw` is this row's scale word for the k-tile.
template <class Tag>
__device__ __forceinline__ void qg_dequant_chunk(const uint4 q, const u32* lut, u32 sw, int j, u16* dst) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
#if QG_BITS == 4
    // 32 elements: word i holds elements 8 i .. 8 i + 7 (low nibble first).
#if QFMT == QFMT_MXFP4
    const u32 code = (sw >> (8 * j)) & 0xFFu;  // one E8M0 per 32 elements
    const float s = __uint_as_float(code == 0 ? 0x00400000u : (code << 23));
    const u32 s2 = pack2(s, s, Tag());
#elif QFMT == QFMT_NVFP4
    // Two e4m3 scales per 32 elements (16 each); the fp32 global scale is applied in the epilogue.
    const float s_lo = e4m3_f32((sw >> (16 * j)) & 0xFFu), s_hi = e4m3_f32((sw >> (16 * j + 8)) & 0xFFu);
    const u32 s2a = pack2(s_lo, s_lo, Tag()), s2b = pack2(s_hi, s_hi, Tag());
#else   // INT4: sw = (16-bit scale, 16-bit -zero) pair
    const u32 s2 = (sw & 0xFFFFu) * 0x10001u;
    const u32 nz2 = (sw >> 16) * 0x10001u;
#endif
    u32 outw[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            u32 v = lut[(words[i] >> (8 * b)) & 0xFFu];
#if QFMT == QFMT_MXFP4
            v = mul2(v, s2, Tag());
#elif QFMT == QFMT_NVFP4
            v = mul2(v, i < 2 ? s2a : s2b, Tag());
#else
            v = mul2(fma2(v, one2(Tag()), nz2, Tag()), s2, Tag());
#endif
            outw[i * 4 + b] = v;
        }
    }
    uint4* d = (uint4*)dst;
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = make_uint4(outw[4 * i], outw[4 * i + 1], outw[4 * i + 2], outw[4 * i + 3]);
#else
    // 16 bytes -> 16 elements.
#if QFMT == QFMT_FP8_BLOCK
    const float s = __uint_as_float(sw);
#endif
    u32 outw[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float f[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            u32 byte = (words[i] >> (8 * b)) & 0xFFu;
#if QFMT == QFMT_INT8
            f[b] = (float)(signed char)byte;
#elif QFMT == QFMT_FP8_BLOCK
            f[b] = e4m3_f32(byte) * s;
#else
            f[b] = e4m3_f32(byte);
#endif
        }
        outw[2 * i] = pack2(f[0], f[1], Tag());
        outw[2 * i + 1] = pack2(f[2], f[3], Tag());
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
            if (GATE_UP) {
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
    u32* lut = (u32*)(Bs + BN * LD);

    int e, row0, row_end, tile, nb;
    qg_block_coords(p, tile, nb);
    if (!qg_tile_rows(p, tile, BM, e, row0, row_end)) return;
#if QG_BITS == 4
    qg_build_lut<Tag>(lut);
#endif
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
                qg_dequant_chunk<Tag>(q, lut, sw, j, Bs + n * LD + j * EPC);
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

// Tiles: (name, BM, warps along M, warps along N). Must match `QuantTile` in src/kernels.rs.
#define QGEMM_ENTRY(NAME, DT, TAG, BM, WMW, WNW)                                                           \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) qgemm_gate_up_##DT##_##NAME(QGemmParams p) { \
        quant_gemm<BM, WMW, WNW, true, TAG>(p);                                                              \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) qgemm_down_##DT##_##NAME(QGemmParams p) {    \
        quant_gemm<BM, WMW, WNW, false, TAG>(p);                                                             \
    }

#ifdef MOE_QGEMM_BF16
QGEMM_ENTRY(m16, bf16, Bf16Tag, 16, 1, 4)
QGEMM_ENTRY(m64, bf16, Bf16Tag, 64, 2, 2)
#endif
#ifdef MOE_QGEMM_F16
QGEMM_ENTRY(m16, f16, F16Tag, 16, 1, 4)
QGEMM_ENTRY(m64, f16, F16Tag, 64, 2, 2)
#endif
