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

// The 4-bit formats keep an expert's packed rows in tiles of 8 rows (src/quant.rs `tile_rows8`):
// a tile's 16-byte chunks go by 4-chunk block, then row, then chunk (a row's last block is 2 wide
// when its chunk count is not a multiple of 4), so the 8 rows x 4 chunks one decode instruction
// loads are 512 contiguous bytes and a tile is one contiguous run; scale words go [tile, span,
// row]. Rows as stored measured 1.1 TB/s against 1.8 TB/s tiled for the decode's loads alone
// (probes/stream_patterns.cu). The 8-bit formats keep plain rows.
#if QG_BITS == 4
#define QG_TILED 1
#else
#define QG_TILED 0
#endif

// Chunk index of chunk c of row r in an expert's packed weights of `chunks` chunks a row.
__device__ __forceinline__ size_t qw_index(int r, int c, int chunks) {
#if QG_TILED
    const int b = c >> 2, wb = min(4, chunks - (b << 2));
    return (size_t)(r >> 3) * 8 * chunks + 32 * b + (r & 7) * wb + (c & 3);
#else
    return (size_t)r * chunks + c;
#endif
}

#if QG_SW > 0
// Byte offset of the scale word of span s, row r, in an expert's scales (`rows` rows, `spans` words a row).
__device__ __forceinline__ size_t qs_offset(int r, int s, int rows, int spans) {
#if QG_TILED
    (void)rows;
    return ((size_t)(r >> 3) * 8 * spans + (size_t)s * 8 + (r & 7)) * QG_SW;
#else
    (void)spans;
    return ((size_t)s * rows + r) * QG_SW;
#endif
}
#endif

struct QGemmParams {
    GemmParams base;  // w: packed [experts, n_total, K * BITS / 8]; the rest as for the 16-bit GEMMs
    u64 scales;       // scale words [experts, K / KSPAN, n_total] of SW bytes, or 0
    u64 col_scale;    // [experts, n_total] f32 or 0
    u64 exp_scale;    // [experts] f32 or 0
};

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
// fp4_pair<K>(w): the two elements at nibbles K and K + 4 of w (bits 4 K .. 4 K + 3 and
// 16 + 4 K ..): e/m to bits 6-8 (bf16) or 9-11 (f16) of each half, sign to bit 15: value * 2^-126
// (bf16) or 2^-14 (f16). Each field is shifted straight out of w (no shift for K = 3's sign).
template <int S>
__device__ __forceinline__ u32 shift_left(u32 w) {
    if constexpr (S >= 0) return w << S;
    else return w >> (-S);
}
template <int K>
__device__ __forceinline__ u32 fp4_pair(u32 w, Bf16Tag) {
    return (shift_left<6 - 4 * K>(w) & 0x01C001C0u) | (shift_left<12 - 4 * K>(w) & 0x80008000u);
}
template <int K>
__device__ __forceinline__ u32 fp4_pair(u32 w, F16Tag) {
    return (shift_left<9 - 4 * K>(w) & 0x0E000E00u) | (shift_left<12 - 4 * K>(w) & 0x80008000u);
}
// The four pair words fp4_pair<k>(w), k = 0 .. 3.
template <class Tag>
__device__ __forceinline__ void fp4_pairs(u32 w, u32 (&b)[4]) {
    b[0] = fp4_pair<0>(w, Tag());
    b[1] = fp4_pair<1>(w, Tag());
    b[2] = fp4_pair<2>(w, Tag());
    b[3] = fp4_pair<3>(w, Tag());
}
template <bool B>
struct BoolC {
    static constexpr bool value = B;
};
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
#if QFMT == QFMT_MXFP4 || QFMT == QFMT_NVFP4
        u32 bits[4];
        fp4_pairs<Tag>(words[i], bits);
#endif
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#if QFMT == QFMT_MXFP4
            u32 v = bits[k];
            v = fold ? mul2(v, s2, Tag()) : mul2(mul2(v, fp4_unscale(Tag()), Tag()), s2, Tag());
#elif QFMT == QFMT_NVFP4
            u32 v = mul2(mul2(bits[k], fp4_unscale(Tag()), Tag()), i < 2 ? s2a : s2b, Tag());
#else
            const u32 t = words[i] >> (4 * k);
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
    const int N = p.base.N, n_total = GATE_UP ? 2 * N : N;
    const float* bias = (p.base.bias && blockIdx.z == 0) ? (const float*)p.base.bias + (size_t)e * n_total : nullptr;
    const float* cs = p.col_scale ? (const float*)p.col_scale + (size_t)e * n_total : nullptr;
    const float es = p.exp_scale ? ((const float*)p.exp_scale)[e] : 1.0f;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row_base + i * 16 + g + h * 8;
            if (row >= row_end) continue;
            if (GATE_UP && p.base.split_stride > 0) {
                // Split K: raw f32 partial sums [split, row, 2N]; qg_act adds bias + activation.
                float* out = (float*)p.base.out + blockIdx.z * p.base.split_stride + (size_t)row * 2 * N;
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
                u16* out = (u16*)p.base.out + (size_t)row * N;
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
                        v[c] = apply_act(p.base.act, gt, up, p.base.alpha, p.base.limit);
                    }
                    if (col + 1 < N) {
                        u32 packed = (u32)from_f32(v[0], Tag()) | ((u32)from_f32(v[1], Tag()) << 16);
                        *(u32*)(out + col) = packed;
                    } else if (col < N) {
                        out[col] = from_f32(v[0], Tag());
                    }
                }
            } else {
                float* out = (float*)p.base.out + blockIdx.z * p.base.split_stride + (size_t)row * N;
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
    block_coords(p.base, tile, nb);
    if (!tile_rows(p.base, tile, BM, e, row0, row_end)) return;
    const int K = p.base.K, N = p.base.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);
    const size_t row_bytes = (size_t)K * QG_BITS / 8;
    const int chunks = (int)(row_bytes / 16);
    const u16* A = (const u16*)p.base.a;
    const unsigned char* W = (const unsigned char*)p.base.w + (size_t)e * n_total * row_bytes;
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
            int wr = b_row<GATE_UP>(n, n0, N, ok);
            const unsigned char* src = ok ? W + qw_index(wr, k0 / EPC + ch, chunks) * 16 : W;
            cp_async16(ws + n * RB + ch * 16, src, ok ? 16 : 0);
        }
#if QG_SW > 0
        {
            constexpr int R = 16 / QG_SW;  // rows per 16-byte scale chunk (divides 8)
            unsigned char* ss = Ss + stage * S_BYTES;
            for (int c = tid; c < BN / R; c += THREADS) {
                bool ok;
                int wr = b_row<GATE_UP>(c * R, n0, N, ok);
                const unsigned char* src = ok ? S + qs_offset(wr, k0 / QG_KSPAN, n_total, KS) : S;
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
    int rows, flags;  // flags bit 0: scales token-major [rows, K / 128] (the dispatch wire form)
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
            if ((lane & 15) == 0) {
                const size_t at = (p.flags & 1) ? (size_t)row * groups + g : (size_t)g * p.rows + row;
                ((float*)p.scales)[at] = s;
            }
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
    block_coords(p.base, tile, nb);
    if (!tile_rows(p.base, tile, BM, e, row0, row_end)) return;
    const int K = p.base.K, N = p.base.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);
    const unsigned char* A = (const unsigned char*)p.base.a;
    const unsigned char* W = (const unsigned char*)p.base.w + (size_t)e * n_total * K;
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
            int wr = b_row<GATE_UP>(n, n0, N, ok);
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
            int wr = b_row<GATE_UP>(c * 4, n0, N, ok);
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

// ---- Decode-sized forwards: grouped matrix-vector products on the packed weights ----
// Each warp streams 8 packed weight rows of one expert over the whole reduction and multiplies
// them on the tensor cores (mma.sync m16n8k16) with up to 16 activation rows: the rows of every
// (token, choice) pair routed to that expert, so an expert's bytes are read once per forward.
// No shared-memory tile and no shuffles: the weights are the B operand, and a lane (g, t) of
// the mma layout loads chunk 4 b + t (16 bytes, EPC elements) of weight row g for 128/256-deep
// block b; the mma's k slots {2t, 2t+1, 2t+8, 2t+9} of step s take that chunk's elements
// {4s .. 4s+3} (the reduction order is a permutation, the same for A and B), so the lane's A
// fragments are its own activation rows' elements at the same positions, loaded as they are,
// and its B fragments are the words qg_dequant_chunk produces. The chunk is exactly one
// MXFP4 scale group, so the per-32 scale folds into the dequantization as in the tiled GEMM.
//
//   gate_up: grid (ceil(I / 32), pairs); warp w of block x owns intermediate columns
//            c0 .. c0 + 3 (c0 = 4 (8 x + w)); B column n = 2 j is the gate row of c0 + j and
//            n = 2 j + 1 its up row, so a lane holds both halves of its column for the
//            activation. act[pair, col] in the activation dtype.
//   down:    grid (ceil(H / 64), pairs); warp w owns hidden columns c0 .. c0 + 7; writes
//            ypair[pair, col] = w (y + b) in f32 (w = 1 when the weights scaled the input).
//   sum:     out[t, col] = the token's local pairs' ypair rows added in choice order (the same
//            order, and so the same bits, as a per-token loop).
// Only the block of an expert's first pair runs; the blocks of its other pairs return after
// the member scan, so the grid needs no count or layout pass and stays graph-capturable.
struct QDecodeParams {
    DecodeParams d;               // w13 / w2: packed [n_local, rows, K * BITS / 8]
    u64 s13, c13, e13;            // gate_up scale words, column factors, expert factors (or 0)
    u64 s2, c2, e2;               // the same for down
    u64 ypair;                    // [T*k, H] f32 scratch
    int rows_up, rows_down;       // member rows the dynamic shared memory holds (<= 16)
    int ring;                     // 1: each warp streams its weights through QD_NS cp.async slots
    int ksplit;                   // qdecode2: warps sharing one row group's reduction
};

#define QD_WARPS 8
#define QD_EPC (128 / QG_BITS)        // elements per 16-byte chunk
#define QD_U 4                        // 4-chunk blocks a lane keeps in flight
#define QD_MAX_PAIRS 256              // must match QDECODE_MAX_PAIRS in src/quant.rs
// Shared row pitch: K + QD_PAD elements, so the two member rows of one 16-byte shared-load
// phase start on different banks (4-bit chunks still pair up 2-way within a row).
#define QD_PAD 8
// Ring slots a warp cycles through (NS - 1 chunks in flight a lane): QD_NS when
// QDecodeParams.ring is 1, 2 * QD_NS when it is 2; must match QD_RING_BYTES in src/quant.rs.
#define QD_NS 8

struct QdRing {
    uint4* w;  // [slots][32] packed chunks of this warp, or null: registers
    u32* s;    // [slots][32] scale words
    int deep;  // slots: 2 * QD_NS when set, else QD_NS
};

// cp.async with a memory clobber: the ring's slots are read with plain loads, which must not move
// across the copies that refill them or the waits that publish them.
__device__ __forceinline__ void qd_cp_async16(void* smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void qd_cp_async4(void* smem, const void* gmem, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes)
                 : "memory");
}
template <int N>
__device__ __forceinline__ void qd_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Pair indices routed to slot `slot`, in pair order, into `members`; returns their count if
// `pair` is the first of them, else 0. Warp 0 scans; every thread gets the result.
__device__ __forceinline__ int qd_members(const DecodeParams& p, int pair, int slot, int* members, int* count) {
    const int P = p.tokens * p.k, lane = threadIdx.x & 31;
    if (threadIdx.x < 32) {
        int n = 0;
        for (int base = 0; base < P; base += 32) {
            const int i = base + lane;
            const bool m = i < P && ((const int*)p.ids)[i] == slot;
            const unsigned b = __ballot_sync(0xffffffffu, m);
            if (m) members[n + __popc(b & ((1u << lane) - 1u))] = i;
            n += __popc(b);
        }
        __syncwarp();
        if (lane == 0) *count = members[0] == pair ? n : 0;
    }
    __syncthreads();
    return *count;
}

// Stages member rows mt .. mt + rows - 1 (vector of member m: `src + row_of(m) * K`) into the
// shared rows, times the member's routing weight rounded to the dtype when `scale` (Llama-4
// input scaling). The whole block copies with 16-byte accesses.
template <class Tag, class RowOf>
__device__ __forceinline__ void qd_stage(u16* xs, const u16* src, int K, int rows, RowOf row_of, const float* scale) {
    const int per = K / 8, ld = K + QD_PAD;
    for (int i = threadIdx.x; i < rows * per; i += blockDim.x) {
        const int r = i / per, c = i - r * per;
        const int src_row = row_of(r);
        uint4 v = __ldg((const uint4*)(src + (size_t)src_row * K) + c);
        if (scale) {
            const float s = scale[r];
            u32* w = (u32*)&v;
#pragma unroll
            for (int j = 0; j < 4; ++j)
                w[j] = pack2(to_f32((u16)(w[j] & 0xFFFFu), Tag()) * s, to_f32((u16)(w[j] >> 16), Tag()) * s, Tag());
        }
        *(uint4*)(xs + (size_t)r * ld + 8 * c) = v;
    }
}

// The EPC activation elements of one chunk from a shared row (zeros for no row), as 16-bit
// pair words.
__device__ __forceinline__ void qd_row_words(const u16* row, bool ok, u32 (&w)[QD_EPC / 2]) {
#pragma unroll
    for (int i = 0; i < QD_EPC / 8; ++i) {
        const uint4 v = ok ? *((const uint4*)row + i) : make_uint4(0, 0, 0, 0);
        w[4 * i] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
    }
}

// acc += the MMAs of one packed chunk `qv` (chunk c of the lane's weight row, scale word `swv`)
// against the staged rows `xa` / `xb` (0: none).
template <class Tag>
__device__ __forceinline__ void qd_chunk_mma(const uint4 qv, u32 swv, int c, int chunks, const u16* xa, const u16* xb,
                                             float (&acc)[4]) {
    const bool in = c < chunks;
    const int k0 = c * QD_EPC;
    u32 wa[QD_EPC / 2], wb[QD_EPC / 2];
    qd_row_words(xa + k0, xa != nullptr && in, wa);
    qd_row_words(xb + k0, xb != nullptr && in, wb);
    __align__(16) u16 dq[QD_EPC];
    qg_dequant_chunk<Tag>(qv, swv, (k0 % QG_BK) / QD_EPC, dq);
    const u32* dw = (const u32*)dq;
#pragma unroll
    for (int s = 0; s < QD_EPC / 4; ++s) {
        const u32 a[4] = {wa[2 * s], wb[2 * s], wa[2 * s + 1], wb[2 * s + 1]};
        mma_16816(acc, a, dw[2 * s], dw[2 * s + 1], Tag());
    }
}

// The scale word at p (QG_SW bytes).
__device__ __forceinline__ u32 qd_sword(const unsigned char* p) {
#if QG_SW == 2
    return __ldg((const unsigned short*)p);
#elif QG_SW == 4
    return __ldg((const u32*)p);
#else
    (void)p;
    return 0u;
#endif
}

// One packed weight row of expert l (n_total rows of `chunks` chunks and `spans` scale words):
// where its chunk c and that chunk's scale word live.
struct QdRow {
    const uint4* w;            // the expert's packed weights
    const unsigned char* s;    // the expert's scale words (or null)
    int row, chunks, n_total, spans;
    __device__ __forceinline__ QdRow(u64 wq, u64 sc, int l, int n_total_, int row_, int K)
        : row(row_), chunks(K / QD_EPC), n_total(n_total_), spans(QG_KSPAN > 0 ? (K + QG_KSPAN - 1) / max(QG_KSPAN, 1) : 0) {
        w = (const uint4*)wq + (size_t)l * n_total * chunks;
        s = sc ? (const unsigned char*)sc + (size_t)l * spans * n_total * max(QG_SW, 1) : nullptr;
    }
    __device__ __forceinline__ const uint4* chunk(int c) const { return w + qw_index(row, c, chunks); }
#if QG_KSPAN > 0
    __device__ __forceinline__ const unsigned char* scale(int c) const {
        return s + qs_offset(row, (c * QD_EPC) / QG_KSPAN, n_total, spans);
    }
#endif
};

// Asks L2 for 4-chunk blocks kb0 .. kb1 - 1 of weight row `row` of expert l (K-deep rows); tiled
// layouts fetch the row's whole 8-row tile over those blocks (one contiguous run), so one lane of
// the tile's 8 rows is enough there.
__device__ __forceinline__ void qd_prefetch_rows(u64 w, int l, int n_total, int row, int K, int kb0, int kb1) {
    const int chunks = K / QD_EPC, c_lo = 4 * kb0, c_hi = min(chunks, 4 * kb1);
    if (c_lo >= c_hi) return;
    const uint4* we = (const uint4*)w + (size_t)l * n_total * chunks;
#if QG_TILED
    if ((row & 7) != 0) return;
    prefetch_l2(we + qw_index(row, c_lo, chunks), (u32)(8 * (c_hi - c_lo)) * 16);
#else
    prefetch_l2(we + qw_index(row, c_lo, chunks), (u32)(c_hi - c_lo) * 16);
#endif
}

// The ring path of qd_mma_rows with NS slots a lane.
template <class Tag, int NS>
__device__ __forceinline__ void qd_ring_rows(const QdRow& wr, u64 w, u64 sc, bool row_ok, int chunks, int blocks,
                                             const u16* xa, const u16* xb, float (&acc)[4], QdRing ring) {
    const int t = threadIdx.x & 3;
    const int lane = threadIdx.x & 31;
    // Slot s of the lane: ring.w[s * 32 + lane] (16 bytes), ring.s[s * 32 + lane] (a scale word,
    // read as the aligned 4 bytes holding it: the scale buffers carry 16 bytes of tail slack).
    auto issue = [&](int b, int slot) {
        const int c = 4 * b + t;
        const bool ok = row_ok && b < blocks && c < chunks;
        qd_cp_async16(ring.w + slot * 32 + lane, ok ? (const void*)wr.chunk(c) : (const void*)w, ok ? 16 : 0);
#if QG_KSPAN > 0
        const size_t a = (size_t)wr.scale(c);
        qd_cp_async4(ring.s + slot * 32 + lane, ok ? (const void*)(a & ~(size_t)3) : (const void*)sc, ok ? 4 : 0);
#endif
        cp_async_commit();
    };
#pragma unroll
    for (int b = 0; b < NS - 1; ++b) issue(b, b);  // empty groups past the end keep the count uniform
    int slot = 0;
    for (int b = 0; b < blocks; ++b) {
        qd_cp_async_wait<NS - 2>();  // this lane's copies of block b have landed
        const uint4 qv = ring.w[slot * 32 + lane];
        u32 swv = 0;
#if QG_KSPAN > 0
        swv = ring.s[slot * 32 + lane];
#if QG_SW == 2
        swv = (swv >> (((size_t)wr.scale(4 * b + t) & 2) * 8)) & 0xFFFFu;
#endif
#endif
        // The slot read one iteration ago takes block b + NS - 1 (each lane owns its entries).
        issue(b + NS - 1, slot == 0 ? NS - 1 : slot - 1);
        if (4 * b < chunks) qd_chunk_mma<Tag>(qv, swv, 4 * b + t, chunks, xa, xb, acc);
        slot = slot == NS - 1 ? 0 : slot + 1;
    }
    qd_cp_async_wait<0>();  // the trailing (empty) groups, before the ring is reused
}

// acc (mma C layout: rows = member rows g / g + 8 of the staged tile, columns = the warp's 8
// weight rows) += A(staged rows) x dequant(W rows)^T over K. `wrow` is this lane's weight row
// (n_total rows of expert l); `xa` / `xb` its staged rows (0: none). Lane (g, t) takes chunks
// 4 b + t of row g. With `ring` (this warp's QD_NS slots in shared memory), each lane keeps
// QD_NS - 1 chunks and their scale words in flight by cp.async, which costs no registers;
// otherwise QD_U chunks ride in registers.
template <class Tag>
__device__ __forceinline__ void qd_mma_rows(u64 w, u64 sc, int l, int n_total, int wrow, bool row_ok, int K,
                                            const u16* xa, const u16* xb, float (&acc)[4], QdRing ring) {
    const int t = threadIdx.x & 3, chunks = K / QD_EPC, blocks = (chunks + 3) / 4;
    const QdRow wr(w, sc, l, n_total, wrow, K);
    if (ring.w != nullptr) {
        if (ring.deep)
            qd_ring_rows<Tag, 2 * QD_NS>(wr, w, sc, row_ok, chunks, blocks, xa, xb, acc, ring);
        else
            qd_ring_rows<Tag, QD_NS>(wr, w, sc, row_ok, chunks, blocks, xa, xb, acc, ring);
        return;
    }
    uint4 q[QD_U];
    u32 sw[QD_U];
    auto load = [&](int b0) {
#pragma unroll
        for (int u = 0; u < QD_U; ++u) {
            const int c = 4 * (b0 + u) + t;
            const bool ok = row_ok && c < chunks;
            q[u] = ok ? __ldg(wr.chunk(c)) : make_uint4(0, 0, 0, 0);
            sw[u] = 0;
#if QG_KSPAN > 0
            if (ok) sw[u] = qd_sword(wr.scale(c));
#endif
        }
    };
    load(0);
    for (int b0 = 0; b0 < blocks; b0 += QD_U) {
        uint4 qc[QD_U];
        u32 swc[QD_U];
#pragma unroll
        for (int u = 0; u < QD_U; ++u) {
            qc[u] = q[u];
            swc[u] = sw[u];
        }
        if (b0 + QD_U < blocks) load(b0 + QD_U);  // the next blocks' bytes fly during these MMAs
#pragma unroll
        for (int u = 0; u < QD_U; ++u) {
            if (4 * (b0 + u) >= chunks) break;  // warp-uniform: past the last block
            qd_chunk_mma<Tag>(qc[u], swc[u], 4 * (b0 + u) + t, chunks, xa, xb, acc);
        }
    }
}

// This warp's ring slots, after the `staged` elements of staged rows in the dynamic shared memory.
__device__ __forceinline__ QdRing qd_ring(const QDecodeParams& q, u16* xs, int staged, int warp) {
    if (!q.ring) return QdRing{nullptr, nullptr, 0};
    const int ns = q.ring == 2 ? 2 * QD_NS : QD_NS;
    unsigned char* base = (unsigned char*)(xs + staged);  // 16-byte aligned: K % 8 == 0
    return QdRing{(uint4*)base + warp * ns * 32, (u32*)(base + QD_WARPS * ns * 32 * 16) + warp * ns * 32, q.ring == 2};
}

// The expert of this block's pair (grid y) as a local slot `l`, and its member count; 0 when the
// block has nothing to do: a bad id (flagged when FLAG, by the gate_up launch), another rank's
// expert, or a pair that is not its expert's first. Every thread of the block calls it.
template <bool FLAG>
__device__ __forceinline__ int qd_expert(const DecodeParams& p, int* members, int* count, int& l) {
    const int pair = blockIdx.y, slot = ((const int*)p.ids)[pair];
    if (slot < 0 || slot >= p.slot_total) {
        if (FLAG && blockIdx.x == 0 && threadIdx.x == 0) atomicCAS((int*)p.err, 0, -(pair + 1));
        return 0;
    }
    l = slot - p.slot_start;
    if (l < 0 || l >= p.n_local) return 0;
    return qd_members(p, pair, slot, members, count);
}

// The epilogue factors of gate_up column `col` of expert l: the gate and up rows' column and
// expert scales, and their biases.
struct QdGateUpCol {
    float fg, fu, bg, bu;
};
__device__ __forceinline__ QdGateUpCol qd_gate_up_col(const QDecodeParams& q, int l, int col) {
    const DecodeParams& p = q.d;
    const int I = p.inter, n_total = 2 * I;
    QdGateUpCol c{1.f, 1.f, 0.f, 0.f};
    if (q.c13) {
        c.fg = ((const float*)q.c13)[(size_t)l * n_total + col];
        c.fu = ((const float*)q.c13)[(size_t)l * n_total + I + col];
    }
    if (q.e13) {
        const float es = ((const float*)q.e13)[l];
        c.fg *= es;
        c.fu *= es;
    }
    if (p.b13) {
        c.bg = ((const float*)p.b13)[(size_t)l * n_total + col];
        c.bu = ((const float*)p.b13)[(size_t)l * n_total + I + col];
    }
    return c;
}

// The epilogue factor and bias of down column (hidden row) `col` of expert l.
__device__ __forceinline__ float2 qd_down_col(const QDecodeParams& q, int l, int col) {
    const DecodeParams& p = q.d;
    const int H = p.hidden;
    float f = q.c2 ? ((const float*)q.c2)[(size_t)l * H + col] : 1.f;
    if (q.e2) f *= ((const float*)q.e2)[l];
    return make_float2(f, p.b2 ? ((const float*)p.b2)[(size_t)l * H + col] : 0.f);
}

// act[pair, col] (I columns a row) of gate_up column `col` from its raw gate and up sums.
template <class Tag>
__device__ __forceinline__ void qd_store_act(const DecodeParams& p, const QdGateUpCol& cf, float gate, float up, int pair,
                                             int col, int I) {
    const float v = apply_act(p.act_kind, gate * cf.fg + cf.bg, up * cf.fu + cf.bu, p.alpha, p.limit);
    ((u16*)p.act)[(size_t)pair * I + col] = from_f32(v, Tag());
}

// ypair[pair, col] (H columns a row) = w (y + b) of down column `col` from its raw sum (w = 1
// when the weights scaled the input).
__device__ __forceinline__ void qd_store_ypair(const QDecodeParams& q, float2 fb, float y, int pair, int col, int H) {
    const DecodeParams& p = q.d;
    const float w = p.scale_input ? 1.f : ((const float*)p.weights)[pair];
    ((float*)q.ypair)[(size_t)pair * H + col] = w * (y * fb.x + fb.y);
}

template <class Tag>
__device__ void qdecode_gate_up(const QDecodeParams& q) {
    const DecodeParams& p = q.d;
    extern __shared__ __align__(16) u16 qd_xs[];
    __shared__ int members[QD_MAX_PAIRS];
    __shared__ float mscale[16];
    __shared__ int count;
    pdl_launch_dependents();
    int l = 0;
    const int n = qd_expert<true>(p, members, &count, l);
    if (n == 0) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int I = p.inter, H = p.hidden, n_total = 2 * I, R = q.rows_up, ld = H + QD_PAD;
    const int c0 = (blockIdx.x * QD_WARPS + warp) * 4;
    const int bcol = c0 + (g >> 1);  // this lane's B row: gate (g even) or up (g odd) of bcol
    const int wrow = (g & 1) ? I + bcol : bcol;
    const bool scale_v = p.scale_input != 0;
    for (int mt = 0; mt < n; mt += R) {
        const int rows = min(R, n - mt);
        if (mt > 0) __syncthreads();  // every warp is done with the previous rows
        if (scale_v && threadIdx.x < rows) mscale[threadIdx.x] = ((const float*)p.weights)[members[mt + threadIdx.x]];
        __syncthreads();
        qd_stage<Tag>(qd_xs, (const u16*)p.x, H, rows, [&](int r) { return members[mt + r] / p.k; },
                      scale_v ? mscale : nullptr);
        __syncthreads();
        if (c0 >= I) continue;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        qd_mma_rows<Tag>(p.w13, q.s13, l, n_total, wrow, bcol < I, H, g < rows ? qd_xs + g * ld : nullptr,
                         g + 8 < rows ? qd_xs + (g + 8) * ld : nullptr, acc, qd_ring(q, qd_xs, R * ld, warp));
        // acc[0] / acc[1]: gate / up of column c0 + t for staged row g; acc[2] / acc[3]: row g + 8.
        const int col = c0 + t;
        if (col >= I) continue;
        const QdGateUpCol cf = qd_gate_up_col(q, l, col);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = g + 8 * h;
            if (r >= rows) continue;
            qd_store_act<Tag>(p, cf, acc[2 * h], acc[2 * h + 1], members[mt + r], col, I);
        }
    }
}

template <class Tag>
__device__ void qdecode_down(const QDecodeParams& q) {
    const DecodeParams& p = q.d;
    extern __shared__ __align__(16) u16 qd_xs[];
    __shared__ int members[QD_MAX_PAIRS];
    __shared__ int count;
    pdl_launch_dependents();
    int l = 0;
    const int n = qd_expert<false>(p, members, &count, l);  // bad ids: flagged by gate_up
    if (n == 0) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int I = p.inter, H = p.hidden, R = q.rows_down, ld = I + QD_PAD;
    const int c0 = (blockIdx.x * QD_WARPS + warp) * 8;
    // Launched programmatically after gate_up (sm_90): the warp's packed weight rows depend only
    // on the routing, so L2 fetches them while gate_up finishes; its activations come after the wait.
    if (t == 0 && c0 + g < H) qd_prefetch_rows(p.w2, l, H, c0 + g, I, 0, (I / QD_EPC + 3) / 4);
    pdl_wait();
    for (int mt = 0; mt < n; mt += R) {
        const int rows = min(R, n - mt);
        if (mt > 0) __syncthreads();
        qd_stage<Tag>(qd_xs, (const u16*)p.act, I, rows, [&](int r) { return members[mt + r]; }, nullptr);
        __syncthreads();
        if (c0 >= H) continue;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        qd_mma_rows<Tag>(p.w2, q.s2, l, H, c0 + g, c0 + g < H, I, g < rows ? qd_xs + g * ld : nullptr,
                         g + 8 < rows ? qd_xs + (g + 8) * ld : nullptr, acc, qd_ring(q, qd_xs, R * ld, warp));
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int col = c0 + 2 * t + c;
            if (col >= H) continue;
            const float2 fb = qd_down_col(q, l, col);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = g + 8 * h;
                if (r >= rows) continue;
                qd_store_ypair(q, fb, acc[2 * h + c], members[mt + r], col, H);
            }
        }
    }
}

template <class Tag>
__device__ void qdecode_sum(const QDecodeParams& q) {
    const DecodeParams& p = q.d;
    pdl_wait();  // launched programmatically after the down kernel (sm_90)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)p.tokens * p.hidden) return;
    const int tok = (int)(i / p.hidden), col = (int)(i % p.hidden);
    float acc = 0.f;
    for (int j = 0; j < p.k; ++j) {
        const int pair = tok * p.k + j, l = ((const int*)p.ids)[pair] - p.slot_start;
        if (l < 0 || l >= p.n_local) continue;  // another rank's expert, or a bad id (flagged)
        acc += ((const float*)q.ypair)[(size_t)pair * p.hidden + col];
    }
    ((float*)p.out)[i] = acc;
}

// ---- Decode-sized forwards, v2: the packed weights as the A operand ----
// A row group of 16 weight rows of one expert (gate_up: the gate rows of 8 intermediate columns,
// then their up rows; down: 16 hidden rows) is multiplied on the tensor cores (mma.sync
// m16n8k16) against up to 8 member rows a pass (more members: more passes), by `ksplit` warps that
// take consecutive ranges of the reduction; the range-0 warp adds the others' partial sums in
// range order and runs the epilogue. Lane (g, t) loads chunk 4 b + t of its rows g and g + 8
// (16 bytes each, EPC elements, one MXFP4 scale group), so every weight byte is loaded and
// dequantized once, by one lane, straight into its A fragments: mma step s takes the chunk's
// words 2 s / 2 s + 1 (elements 4 s .. 4 s + 3, in the reduction order the lane's k slots
// {2t, 2t + 1, 2t + 8, 2t + 9} stand for), and the B fragment of member row g is the same four
// elements of its staged activations (one 8-byte shared load). Against v1 (weights as B, 8 rows
// a warp) this halves the MMAs and shared loads a weight and keeps the dequantization
// branch-free: MXFP4 folds its E8M0 scale and the bit-placement constant into one 16-bit
// multiply whenever the product is a normal 16-bit number, and takes two multiplies only when
// some lane of the warp needs them (warp-uniform).
// 4-chunk blocks a lane keeps in flight (both rows), and the blocks of 256 threads an SM the
// register budget is sized for; src/kernels.rs may set both (MOE_CUDA_QD2_U / _MINB), else each
// format takes its measured best (session 13, same-run H100 A/B): MXFP4 one block in flight and
// 3 blocks an SM (80 registers, no spills; 9-18% faster than 2 / 2 at T = 1 / 2 / 16); the other
// formats 2 / 2 (no spills at 128 registers; NVFP4 and int4 were 5-8% slower at T = 1 with 1 / 3,
// 5-10% faster at T = 16).
#if QFMT == QFMT_MXFP4
#define QD2_U_DEFAULT 1
#define QD2_MINB_DEFAULT 3
#else
#define QD2_U_DEFAULT 2
#define QD2_MINB_DEFAULT 2
#endif
#ifndef QD2_U
#define QD2_U QD2_U_DEFAULT
#endif
#ifndef QD2_MINB
#define QD2_MINB QD2_MINB_DEFAULT
#endif
// The scale word of a chunk past the end of a row (its bytes load as zeros): one that decodes
// zeros and keeps MXFP4 on its one-multiply path.
#if QFMT == QFMT_MXFP4
#define QD2_SW_NONE 0x7F7F7F7Fu
#else
#define QD2_SW_NONE 0u
#endif

#if QFMT == QFMT_MXFP4
// The one-multiply factor 2^(code - 127) * 2^126 (bf16) or * 2^14 (f16), as a 16-bit pair,
// when it is a normal number of the type; `ok` false otherwise.
__device__ __forceinline__ u32 qd2_fp4_factor(u32 code, bool& ok, Bf16Tag) {
    ok = code <= 128u;  // code 0 (2^-127) folds too: 2^-127 * 2^126 = 0.5
    return (code + 126u) * 0x00800080u;
}
__device__ __forceinline__ u32 qd2_fp4_factor(u32 code, bool& ok, F16Tag) {
    ok = code >= 99u && code <= 128u;
    return (code - 98u) * 0x04000400u;
}
#endif

// The EPC / 2 16-bit pair words of one packed 8-bit chunk (chunk j of its k-tile, scale word
// `sw`); 4-bit chunks go a word at a time through qd2_word.
template <class Tag>
__device__ __forceinline__ void qd2_dequant(const uint4 q, u32 sw, int j, u32 (&out)[QD_EPC / 2]) {
    __align__(16) u16 dq[QD_EPC];
    qg_dequant_chunk<Tag>(q, sw, j, dq);
#pragma unroll
    for (int w = 0; w < QD_EPC / 2; ++w) out[w] = ((const u32*)dq)[w];
}

// Whether chunk scale word `sw` (chunk j) needs MXFP4's two-multiply path.
template <class Tag>
__device__ __forceinline__ bool qd2_wide(u32 sw, int j) {
#if QFMT == QFMT_MXFP4
    bool ok;
    qd2_fp4_factor((sw >> (8 * j)) & 0xFFu, ok, Tag());
    return !ok;
#else
    (void)sw;
    (void)j;
    return false;
#endif
}

#if QG_BITS == 4
// What the four pair words of each 32-bit word of a 4-bit chunk multiply by (chunk j of its
// k-tile, scale word `sw`), so a chunk can be dequantized one word at a time: MXFP4 the folded
// factor (WIDE: the bit-placement constant and the scale, two multiplies); NVFP4 the scales of
// its two 16-element halves; int4 the scale and -(magic + zero).
struct Qd2Scale {
    u32 a, b;
};
template <class Tag, bool WIDE>
__device__ __forceinline__ Qd2Scale qd2_scale(u32 sw, int j) {
#if QFMT == QFMT_MXFP4
    const u32 code = (sw >> (8 * j)) & 0xFFu;
    if (!WIDE) {
        bool ok;
        return Qd2Scale{qd2_fp4_factor(code, ok, Tag()), 0u};
    }
    const float s = __uint_as_float(code == 0 ? 0x00400000u : (code << 23));
    return Qd2Scale{fp4_unscale(Tag()), pack2(s, s, Tag())};
#elif QFMT == QFMT_NVFP4
    const float lo = e4m3_f32((sw >> (16 * j)) & 0xFFu), hi = e4m3_f32((sw >> (16 * j + 8)) & 0xFFu);
    return Qd2Scale{pack2(lo, lo, Tag()), pack2(hi, hi, Tag())};
#else
    (void)j;
    return Qd2Scale{(sw & 0xFFFFu) * 0x10001u, (sw >> 16) * 0x10001u};
#endif
}
// Pair word K (elements 8 i + 2 K, 8 i + 2 K + 1 of the chunk) of word i, `w`, of a 4-bit chunk,
// with the same arithmetic as qg_dequant_chunk.
template <class Tag, int K, bool WIDE>
__device__ __forceinline__ u32 qd2_pair(u32 w, int i, const Qd2Scale& sc) {
#if QFMT == QFMT_MXFP4
    (void)i;
    const u32 o = mul2(fp4_pair<K>(w, Tag()), sc.a, Tag());
    return WIDE ? mul2(o, sc.b, Tag()) : o;
#elif QFMT == QFMT_NVFP4
    return mul2(mul2(fp4_pair<K>(w, Tag()), fp4_unscale(Tag()), Tag()), i < 2 ? sc.a : sc.b, Tag());
#else
    (void)i;
    const u32 v = ((w >> (4 * K)) & 0x000F000Fu) | int4_magic(Tag());
    return mul2(fma2(v, one2(Tag()), sc.b, Tag()), sc.a, Tag());
#endif
}
// The four pair words (elements 8 i .. 8 i + 7 of the chunk) of word i, `w`, of a 4-bit chunk.
template <class Tag, bool WIDE>
__device__ __forceinline__ void qd2_word(u32 w, int i, const Qd2Scale& sc, u32 (&o)[4]) {
    o[0] = qd2_pair<Tag, 0, WIDE>(w, i, sc);
    o[1] = qd2_pair<Tag, 1, WIDE>(w, i, sc);
    o[2] = qd2_pair<Tag, 2, WIDE>(w, i, sc);
    o[3] = qd2_pair<Tag, 3, WIDE>(w, i, sc);
}
#endif

// acc += block b of this lane's two weight rows (chunk 4 b + t of each: `ca` / `cb`, scale words
// `swa` / `swb`) x its staged activation row `xr` (C layout as in Qd2Rows).
template <class Tag>
__device__ __forceinline__ void qd2_block(const uint4 ca, const uint4 cb, u32 swa, u32 swb, const u16* xr, int b, int t,
                                          int chunks, float (&acc)[4]) {
    const int j = (t * QD_EPC % QG_BK) / QD_EPC;  // chunk 4 b + t's place in its k-tile (4 | QG_BK / EPC)
    // Activations of chunk 4 b + t; a narrow block's lanes t >= 2 (zero weights) read
    // chunk 4 b + t - 2 so they stay inside the row.
    const int cx = 4 * b + t < chunks ? 4 * b + t : 4 * b + t - 2;
    const u16* xc = xr + cx * QD_EPC;
#if QG_BITS == 4
    // One 32-bit word of each row at a time: its 4 pair words are mma steps 2 i and 2 i + 1.
    const u32 wa_w[4] = {ca.x, ca.y, ca.z, ca.w}, wb_w[4] = {cb.x, cb.y, cb.z, cb.w};
    auto block_mma = [&](auto wide_c) {
        constexpr bool WIDE = decltype(wide_c)::value;
        const Qd2Scale sca = qd2_scale<Tag, WIDE>(swa, j), scb = qd2_scale<Tag, WIDE>(swb, j);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u32 da[4], db[4];
            qd2_word<Tag, WIDE>(wa_w[i], i, sca, da);
            qd2_word<Tag, WIDE>(wb_w[i], i, scb, db);
            const u32 a0[4] = {da[0], db[0], da[1], db[1]};
            const u32 a1[4] = {da[2], db[2], da[3], db[3]};
            const uint4 x = *(const uint4*)(xc + 8 * i);
            mma_16816(acc, a0, x.x, x.y, Tag());
            mma_16816(acc, a1, x.z, x.w, Tag());
        }
    };
#if QFMT == QFMT_MXFP4
    // A warp-uniform branch, not a predicated second multiply on every pair.
    if (__any_sync(0xffffffffu, qd2_wide<Tag>(swa, j) || qd2_wide<Tag>(swb, j))) block_mma(BoolC<true>{});
    else block_mma(BoolC<false>{});
#else
    block_mma(BoolC<false>{});
#endif
#else
    u32 da[QD_EPC / 2], db[QD_EPC / 2];
    qd2_dequant<Tag>(ca, swa, j, da);
    qd2_dequant<Tag>(cb, swb, j, db);
#pragma unroll
    for (int s = 0; s < QD_EPC / 4; s += 2) {
        const u32 a0[4] = {da[2 * s], db[2 * s], da[2 * s + 1], db[2 * s + 1]};
        const u32 a1[4] = {da[2 * s + 2], db[2 * s + 2], da[2 * s + 3], db[2 * s + 3]};
        const uint4 x = *(const uint4*)(xc + 4 * s);
        mma_16816(acc, a0, x.x, x.y, Tag());
        mma_16816(acc, a1, x.z, x.w, Tag());
    }
#endif
}

// One lane's share of a row group's reduction over the 4-chunk blocks kb0 .. kb1 - 1: its two
// weight rows `row_a` / `row_b` of expert l (n_total rows; real rows: callers clamp, and drop the
// columns of rows past the end). prime() puts the first QD2_U blocks' loads in flight, so a block
// issues them before it stages its activation rows; run() then accumulates
// acc (C layout: rows g / g + 8 = the two weight rows, columns 2t / 2t + 1 = member rows 2t / 2t + 1
// of the staged tile) += dequant(W rows) x staged rows^T, refilling each slot QD2_U blocks ahead.
template <class Tag>
struct Qd2Rows {
    static constexpr int CSTEP = QG_TILED ? 32 : 4;  // chunks a full block steps
#if QG_KSPAN > 0
    // Tiled rows whose block covers whole scale spans (the 4-bit formats) step their scale words
    // by a constant too; the 8-bit block-scaled format computes each word's address.
    static constexpr bool SCALE_STEPS = QG_TILED && (4 * QD_EPC) % QG_KSPAN == 0;
    static constexpr int SSTEP = SCALE_STEPS ? 8 * (4 * QD_EPC / QG_KSPAN) * QG_SW : 0;  // bytes a block
    const unsigned char *psa, *psb;
#endif
    QdRow ra, rb;
    const uint4 *pa, *pb;
    int chunks, kb0, kb1, g, t;
    uint4 qa[QD2_U], qb[QD2_U];
    u32 sa_w[QD2_U], sb_w[QD2_U];

    __device__ __forceinline__ Qd2Rows(u64 w, u64 sc, int l, int n_total, int row_a, int row_b, int K, int kb0_,
                                       int kb1_)
        : ra(w, sc, l, n_total, row_a, K), rb(w, sc, l, n_total, row_b, K), chunks(K / QD_EPC), kb0(kb0_), kb1(kb1_) {
        const int lane = threadIdx.x & 31;
        g = lane >> 2;
        t = lane & 3;
        pa = ra.chunk(t);
        pb = rb.chunk(t);
#if QG_KSPAN > 0
        psa = ra.scale(t);
        psb = rb.scale(t);
#endif
    }

    // Block b into slot u; blocks past kb1 load nothing (their slots are never read). Only a
    // row's last block can be narrow (chunks % 4 == 2): there lanes t >= 2 get zero weights.
    __device__ __forceinline__ void load(int u, int b) {
        if (b >= kb1) return;
        if (4 * b + 4 <= chunks) {
            qa[u] = __ldg(pa + CSTEP * b);
            qb[u] = __ldg(pb + CSTEP * b);
#if QG_KSPAN > 0
            sa_w[u] = qd_sword(SCALE_STEPS ? psa + SSTEP * b : ra.scale(4 * b + t));
            sb_w[u] = qd_sword(SCALE_STEPS ? psb + SSTEP * b : rb.scale(4 * b + t));
#else
            sa_w[u] = sb_w[u] = QD2_SW_NONE;
#endif
        } else {  // tiled rows only (8-bit rows have whole blocks): lane (g, t) at 32 b + 2 g + t
            const bool ok = 4 * b + t < chunks;
            qa[u] = ok ? __ldg(pa + CSTEP * b - 2 * g) : make_uint4(0, 0, 0, 0);
            qb[u] = ok ? __ldg(pb + CSTEP * b - 2 * g) : make_uint4(0, 0, 0, 0);
#if QG_KSPAN > 0
            sa_w[u] = ok ? qd_sword(SCALE_STEPS ? psa + SSTEP * b : ra.scale(4 * b + t)) : QD2_SW_NONE;
            sb_w[u] = ok ? qd_sword(SCALE_STEPS ? psb + SSTEP * b : rb.scale(4 * b + t)) : QD2_SW_NONE;
#else
            sa_w[u] = sb_w[u] = QD2_SW_NONE;
#endif
        }
    }

    __device__ __forceinline__ void prime() {
#pragma unroll
        for (int u = 0; u < QD2_U; ++u) load(u, kb0 + u);
    }

    // `xs`: the staged rows (pitch ld), `rows` (1 .. 8) of them. Lanes g >= rows read staged row
    // rows - 1: they feed only output columns >= rows, which nobody reads.
    __device__ __forceinline__ void run(const u16* xs, int ld, int rows, float (&acc)[4]) {
        const u16* xr = xs + (size_t)min(g, rows - 1) * ld;
        for (int b0 = kb0; b0 < kb1; b0 += QD2_U) {
#pragma unroll
            for (int u = 0; u < QD2_U; ++u) {
                const int b = b0 + u;
                if (b >= kb1) break;  // warp-uniform
                const uint4 ca = qa[u], cb = qb[u];
                const u32 swa = sa_w[u], swb = sb_w[u];
                load(u, b + QD2_U);  // the bytes of QD2_U blocks ahead fly during these MMAs
                qd2_block<Tag>(ca, cb, swa, swb, xr, b, t, chunks, acc);
            }
        }
    }
};

// The block's warps: groups = warps / ksplit row groups, each reduced by ksplit warps over
// consecutive ranges of 4-chunk blocks. Warp w takes row group w % groups and range w / groups.
struct Qd2Split {
    int groups, grp, kb0, kb1;
};
__device__ __forceinline__ Qd2Split qd2_split(int ksplit, int K) {
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    const int groups = warps / ksplit, part = warp / groups;
    const int blocks = (K / QD_EPC + 3) / 4, per = (blocks + ksplit - 1) / ksplit;
    return Qd2Split{groups, warp % groups, min(blocks, part * per), min(blocks, (part + 1) * per)};
}

// acc of the range-0 warp of each row group += the other ranges' partial sums, in range order
// (the same order every forward). Every thread of the block calls it.
__device__ __forceinline__ void qd2_reduce(float (&acc)[4], float (*red)[32][4], int ksplit, const Qd2Split& sp) {
    if (ksplit == 1) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // the previous round's reads are done
    if (warp >= sp.groups) {
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
    }
    __syncthreads();
    if (warp < sp.groups) {
        for (int r = 1; r < ksplit; ++r)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i] += red[warp + r * sp.groups][lane][i];
    }
}

template <class Tag>
__device__ void qdecode2_gate_up(const QDecodeParams& q) {
    const DecodeParams& p = q.d;
    extern __shared__ __align__(16) u16 qd_xs[];
    __shared__ int members[QD_MAX_PAIRS];
    __shared__ float mscale[16];
    __shared__ float red[QD_WARPS][32][4];
    __shared__ int count;
    pdl_launch_dependents();
    int l = 0;
    const int n = qd_expert<true>(p, members, &count, l);
    if (n == 0) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int I = p.inter, H = p.hidden, n_total = 2 * I, R = q.rows_up, ld = H + QD_PAD;
    const Qd2Split sp = qd2_split(q.ksplit, H);
    const int c0 = (blockIdx.x * sp.groups + sp.grp) * 8;
    const int col = c0 + g;  // A rows g / g + 8: the gate and up rows of this column
    const int ca = col < I ? col : I - 1;  // lanes past the end read a real row and drop it
    const bool scale_v = p.scale_input != 0;
    Qd2Rows<Tag> wr(p.w13, q.s13, l, n_total, ca, I + ca, H, sp.kb0, sp.kb1);
    for (int mt = 0; mt < n; mt += R) {
        const int rows = min(R, n - mt);
        if (c0 < I) wr.prime();  // the first blocks' weights fly while the rows are staged
        if (mt > 0) __syncthreads();  // every warp is done with the previous rows
        if (scale_v && threadIdx.x < rows) mscale[threadIdx.x] = ((const float*)p.weights)[members[mt + threadIdx.x]];
        __syncthreads();
        qd_stage<Tag>(qd_xs, (const u16*)p.x, H, rows, [&](int r) { return members[mt + r] / p.k; },
                      scale_v ? mscale : nullptr);
        __syncthreads();
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        if (c0 < I) wr.run(qd_xs, ld, rows, acc);
        qd2_reduce(acc, red, q.ksplit, sp);
        if (warp >= sp.groups || col >= I) continue;
        const QdGateUpCol cf = qd_gate_up_col(q, l, col);
        // acc[h] / acc[2 + h]: gate / up of `col` for member row 2 t + h.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 2 * t + h;
            if (r >= rows) continue;
            qd_store_act<Tag>(p, cf, acc[h], acc[2 + h], members[mt + r], col, I);
        }
    }
}

template <class Tag>
__device__ void qdecode2_down(const QDecodeParams& q) {
    const DecodeParams& p = q.d;
    extern __shared__ __align__(16) u16 qd_xs[];
    __shared__ int members[QD_MAX_PAIRS];
    __shared__ float red[QD_WARPS][32][4];
    __shared__ int count;
    pdl_launch_dependents();
    int l = 0;
    const int n = qd_expert<false>(p, members, &count, l);  // bad ids: flagged by gate_up
    if (n == 0) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int I = p.inter, H = p.hidden, R = q.rows_down, ld = I + QD_PAD;
    const Qd2Split sp = qd2_split(q.ksplit, I);
    const int c0 = (blockIdx.x * sp.groups + sp.grp) * 16;
    const int ra = min(c0 + g, H - 1), rb = min(c0 + 8 + g, H - 1);
    // Launched programmatically after gate_up (sm_90): the warp's packed weight rows depend only
    // on the routing, so L2 fetches them while gate_up finishes; its activations come after the wait.
    if (t < 2 && c0 < H && sp.kb0 < sp.kb1) qd_prefetch_rows(p.w2, l, H, t == 0 ? ra : rb, I, sp.kb0, sp.kb1);
    Qd2Rows<Tag> wr(p.w2, q.s2, l, H, ra, rb, I, sp.kb0, sp.kb1);
    if (c0 < H) wr.prime();  // the weights do not depend on gate_up: in flight before the wait
    pdl_wait();
    for (int mt = 0; mt < n; mt += R) {
        const int rows = min(R, n - mt);
        if (mt > 0 && c0 < H) wr.prime();
        if (mt > 0) __syncthreads();
        qd_stage<Tag>(qd_xs, (const u16*)p.act, I, rows, [&](int r) { return members[mt + r]; }, nullptr);
        __syncthreads();
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        if (c0 < H) wr.run(qd_xs, ld, rows, acc);
        qd2_reduce(acc, red, q.ksplit, sp);
        if (warp >= sp.groups) continue;
        // acc[h] / acc[2 + h]: hidden row c0 + g / c0 + 8 + g for member row 2 t + h.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int col = c0 + 8 * half + g;
            if (col >= H) continue;
            const float2 fb = qd_down_col(q, l, col);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 2 * t + h;
                if (r >= rows) continue;
                qd_store_ypair(q, fb, acc[2 * half + h], members[mt + r], col, H);
            }
        }
    }
}

// qdecode_* at two blocks an SM: without the bound FP8 block's down kernel took 153 registers
// (one block an SM) and ran 23% slower at T = 16 (session 13). int8 keeps the compiler's choice
// (64 / 118 registers): bounded, its T = 16 measured 6.6% slower.
#if QFMT == QFMT_INT8
#define QD1_BOUNDS __launch_bounds__(256)
#else
#define QD1_BOUNDS __launch_bounds__(256, 2)
#endif
#define QDECODE_ENTRY(DT, TAG)                                                                            \
    extern "C" __global__ void QD1_BOUNDS qdecode_gate_up_##DT(QDecodeParams p) {                          \
        qdecode_gate_up<TAG>(p);                                                                          \
    }                                                                                                     \
    extern "C" __global__ void QD1_BOUNDS qdecode_down_##DT(QDecodeParams p) {                             \
        qdecode_down<TAG>(p);                                                                             \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) qdecode_sum_##DT(QDecodeParams p) { qdecode_sum<TAG>(p); } \
    extern "C" __global__ void __launch_bounds__(256, QD2_MINB) qdecode2_gate_up_##DT(QDecodeParams p) {   \
        qdecode2_gate_up<TAG>(p);                                                                         \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, QD2_MINB) qdecode2_down_##DT(QDecodeParams p) {      \
        qdecode2_down<TAG>(p);                                                                            \
    }
#ifdef MOE_QGEMM_BF16
QDECODE_ENTRY(bf16, Bf16Tag)
#endif
#ifdef MOE_QGEMM_F16
QDECODE_ENTRY(f16, F16Tag)
#endif
