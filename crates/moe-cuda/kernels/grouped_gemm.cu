// Grouped GEMMs for the expert MLPs on tensor cores (bf16/f16 in, f32 accumulate), fed by a
// multi-stage cp.async pipeline. Two engines:
//   mma:   mma.sync m16n8k16 with ldmatrix (sm_80+), tiles m16 / m64 / m128;
//   wgmma: Hopper warpgroup MMA (sm_90a only), tile w128 = 128 x 128 x 64, operands read from
//          128-byte-swizzled shared memory through matrix descriptors.
//
// `out = A[rows, K] x W[e]^T` where W is `[experts, n_total, K]` (nn.Linear order).
// Row tiles of BM rows map to experts in one of three ways (`mode`):
//   contiguous: tile j belongs to tile_expert[j] and its real rows end at tile_end[j];
//   masked:     tile j is expert j / tiles_per_expert, rows e*max_m.., real rows counts[e];
//   dense:      one expert (e = 0), rows 0..m_total (the shared expert).
// Epilogues: `gate_up` fuses bias + activation (the B tile interleaves 8 gate rows with the 8
// matching up rows, so each thread holds gate and up of the same column) and writes the
// activation dtype; `down` adds the bias and writes f32.

#define GEMM_BK 32
#define GEMM_PAD 8

// Stores a warp's accumulators: MI x NI fragments of 16 x 8 in the mma C layout; fragment (i, j)
// covers rows row_base + 16 i .. and local B columns col_base + 8 j ...
template <int MI, int NI, bool GATE_UP, class Tag, bool Y16 = false>
__device__ __forceinline__ void store_acc(const GemmParams& p, float (&acc)[MI][NI][4], int e, int row_base,
                                          int row_end, int col_base, int n0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int N = p.N, n_total = GATE_UP ? 2 * N : N;
    const float* bias = (p.bias && blockIdx.z == 0) ? (const float*)p.bias + (size_t)e * n_total : nullptr;
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
                        float gt = acc[i][2 * j][h * 2 + c], up = acc[i][2 * j + 1][h * 2 + c];
                        if (bias && col + c < N) {
                            gt += bias[col + c];
                            up += bias[N + col + c];
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
            } else if (Y16) {
                // 16-bit expert outputs (T256 tile, no split): half the bytes of the f32 buffer.
                u16* out = (u16*)p.out + (size_t)row * N;
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    const int col = n0 + col_base + j * 8 + t4 * 2;
                    float v0 = acc[i][j][h * 2], v1 = acc[i][j][h * 2 + 1];
                    if (bias) {
                        if (col < N) v0 += bias[col];
                        if (col + 1 < N) v1 += bias[col + 1];
                    }
                    if (col + 1 < N) *(u32*)(out + col) = (u32)from_f32(v0, Tag()) | ((u32)from_f32(v1, Tag()) << 16);
                    else if (col < N) out[col] = from_f32(v0, Tag());
                }
            } else {
                float* out = (float*)p.out + blockIdx.z * p.split_stride + (size_t)row * N;
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    const int col = n0 + col_base + j * 8 + t4 * 2;
                    float v0 = acc[i][j][h * 2], v1 = acc[i][j][h * 2 + 1];
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

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool GATE_UP, class Tag>
__device__ __forceinline__ void grouped_gemm(const GemmParams& p) {
    constexpr int LD = BK + GEMM_PAD;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int CH = BK / 8;  // 16-byte chunks per row per stage
    static_assert(WN % 16 == 0, "warp N tile must hold gate/up pairs of 8 columns");
    extern __shared__ __align__(16) u16 gemm_smem[];
    u16* As = gemm_smem;
    u16* Bs = gemm_smem + STAGES * BM * LD;

    int e, row0, row_end, tile, nb;
    block_coords(p, tile, nb);
    if (!tile_rows(p, tile, BM, e, row0, row_end)) return;
    const int K = p.K, N = p.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);  // first output column of this block
    const u16* A = (const u16*)p.a;
    const u16* W = (const u16*)p.w + (size_t)e * n_total * K;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        u16* as = As + stage * BM * LD;
        u16* bs = Bs + stage * BN * LD;
        for (int c = tid; c < BM * CH; c += THREADS) {
            int r = c / CH, kc = (c % CH) * 8;
            int row = row0 + r, k = k0 + kc;
            bool ok = row < row_end && k < K;
            const u16* src = ok ? A + (size_t)row * K + k : A;
            cp_async16(as + r * LD + kc, src, ok ? 16 : 0);
        }
        for (int c = tid; c < BN * CH; c += THREADS) {
            int n = c / CH, kc = (c % CH) * 8;
            bool ok;
            int wr = b_row<GATE_UP>(n, n0, N, ok);
            int k = k0 + kc;
            ok = ok && k < K;
            const u16* src = ok ? W + (size_t)wr * K + k : W;
            cp_async16(bs + n * LD + kc, src, ok ? 16 : 0);
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    // Split K (down projection, grid z > 1): this block sums k-tiles [kt0, kt0 + KT) only.
    const int KT_ALL = (K + BK - 1) / BK;
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
        __syncthreads();
        int pf = kt + STAGES - 1;
        if (pf < KT) load_stage(pf % STAGES, kt0 + pf);
        cp_async_commit();
        const u16* as = As + (kt % STAGES) * BM * LD;
        const u16* bs = Bs + (kt % STAGES) * BN * LD;
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
                ldmatrix_x4(r, bs + n * LD + c);
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
    store_acc<MI, NI, GATE_UP, Tag>(p, acc, e, row0 + wm * WM, row_end, wn * WN, n0);
}

// ---- Hopper warpgroup MMA (sm_90a) ----
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_HAS_WGMMA 1
#endif

#define WG_BM 128
#define WG_BK 64

#ifdef MOE_HAS_WGMMA
// K-major operand tile with the 128-byte swizzle: rows of 64 elements (128 bytes), 8-row groups
// of 1024 bytes; the leading byte offset is unused for this layout, the stride is 1024 bytes.
// The descriptor as two 32-bit halves: the high one is a constant, and the low one (the
// address field) moves by (byte offset >> 4) within a stage's tiles (shared addresses stay below
// 2^18, so the 14-bit field never carries). Hot loops add constants to one register instead of
// rebuilding the whole descriptor per MMA.
#define WG_DESC_HI ((1024u >> 4) | (1u << 30))
__device__ __forceinline__ u32 wgmma_desc_lo(const void* smem) {
    return ((smem_addr(smem) & 0x3FFFF) >> 4) | (1u << 16);
}
__device__ __forceinline__ u64 wgmma_desc_of(u32 lo) { return ((u64)WG_DESC_HI << 32) | lo; }
__device__ __forceinline__ u64 wgmma_desc(const void* smem) { return wgmma_desc_of(wgmma_desc_lo(smem)); }
// A shared-memory f32 read by its 32-bit shared address (no generic 64-bit address arithmetic).
__device__ __forceinline__ float lds_f32(u32 addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 da, u64 db, Bf16Tag) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 da, u64 db, F16Tag) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], u64 da, u64 db, Bf16Tag) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], u64 da, u64 db, F16Tag) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));
}
#endif

// 128 x BN x 64 tile, two warpgroups (each 64 rows x BN columns), STAGES-deep cp.async ring.
// The MMAs of k-tile kt stay in flight while the block waits for and issues k-tile kt + 1
// (wgmma.wait_group 1); loads therefore run STAGES - 2 tiles ahead, so a stage is rewritten only
// after the MMAs that read it have completed.
template <int BN, int STAGES, bool GATE_UP, class Tag>
__device__ __forceinline__ void wgmma_gemm(const GemmParams& p) {
#ifdef MOE_HAS_WGMMA
    constexpr int BM = WG_BM, BK = WG_BK, THREADS = 256, NI = BN / 8;
    constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // elements
    static_assert(STAGES >= 3, "the wgmma ring needs at least 3 stages");
    extern __shared__ __align__(16) u16 gemm_smem[];
    // Swizzled tiles need 1024-byte alignment; the launch reserves 1 KiB of slack.
    u16* base = (u16*)(((size_t)gemm_smem + 1023) & ~(size_t)1023);
    u16* As = base;
    u16* Bs = base + STAGES * A_STAGE;

    int e, row0, row_end, tile, nb;
    block_coords(p, tile, nb);
    if (!tile_rows(p, tile, BM, e, row0, row_end)) return;
    const int K = p.K, N = p.N;
    const int n_total = GATE_UP ? 2 * N : N;
    const int n0 = nb * (GATE_UP ? BN / 2 : BN);
    const u16* A = (const u16*)p.a;
    const u16* W = (const u16*)p.w + (size_t)e * n_total * K;
    const int tid = threadIdx.x, warp = tid >> 5, wg = warp >> 2;

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        u16* as = As + stage * A_STAGE;
        u16* bs = Bs + stage * B_STAGE;
        for (int c = tid; c < BM * 8; c += THREADS) {
            int r = c >> 3, ch = c & 7;
            int row = row0 + r, k = k0 + ch * 8;
            bool ok = row < row_end && k < K;
            const u16* src = ok ? A + (size_t)row * K + k : A;
            cp_async16(as + r * BK + ((ch ^ (r & 7)) << 3), src, ok ? 16 : 0);
        }
        for (int c = tid; c < BN * 8; c += THREADS) {
            int n = c >> 3, ch = c & 7;
            bool ok;
            int wr = b_row<GATE_UP>(n, n0, N, ok);
            int k = k0 + ch * 8;
            ok = ok && k < K;
            const u16* src = ok ? W + (size_t)wr * K + k : W;
            cp_async16(bs + n * BK + ((ch ^ (n & 7)) << 3), src, ok ? 16 : 0);
        }
    };

    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;

    const int KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 3>();
        fence_proxy_async();  // make this thread's cp.async writes visible to the tensor cores
        __syncthreads();      // every thread's tile kt landed; every warpgroup finished tile kt - 2
        int pf = kt + STAGES - 2;
        if (pf < KT) load_stage(pf % STAGES, pf);
        cp_async_commit();
        const u16* as = As + (kt % STAGES) * A_STAGE + wg * 64 * BK;
        const u16* bs = Bs + (kt % STAGES) * B_STAGE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            if constexpr (BN == 256) wgmma_m64n256k16(d, wgmma_desc(as + kk), wgmma_desc(bs + kk), Tag());
            else wgmma_m64n128k16(d, wgmma_desc(as + kk), wgmma_desc(bs + kk), Tag());
        }
        wgmma_commit();
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    // Accumulator layout: register 4 j + r holds (row 16 w + g (+8 for r >= 2), column 8 j + 2 t4
    // + r % 2) of this warpgroup's 64 x BN slab, i.e. the mma C layout per 8-column fragment.
    float acc[1][NI][4];
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[0][j][r] = d[4 * j + r];
    store_acc<1, NI, GATE_UP, Tag>(p, acc, e, row0 + wg * 64 + (warp & 3) * 16, row_end, 0, n0);
#endif
}


// ---- TMA-fed, warp-specialized, persistent wgmma (sm_90a) ----
// 128 x 256 x 64 tiles. Warpgroup 0 is the producer: one thread issues TMA bulk-tensor loads of
// the A rows and the weight rows into a STAGES-deep ring (128-byte swizzle, the layout the wgmma
// descriptors read) and signals each stage's `full` mbarrier by transaction bytes. Warpgroups 1
// and 2 each own 64 rows x 256 columns of the tile: they wait on `full`, issue the MMAs, keep
// one k-tile of MMAs in flight and release the previous stage through its `empty` mbarrier. The
// grid is persistent (one block per SM walking the grouped block order), so the producer
// prefetches the next tile while the consumers run the epilogue. 168 registers a thread fit 384
// threads without setmaxnreg (ptxas reports no spills), so the register split is left alone.
// gate_up loads the gate rows n0.. into B rows 0..127 and the matching up rows into 128..255,
// so accumulator column j and j + 128 of a thread are the gate and up of one output column.
struct __align__(64) TmaDesc {
    u64 opaque[16];
};
// Must match `TmaGemmParams` in src/kernels.rs.
struct __align__(64) TmaGemmParams {
    TmaDesc a;  // A [rows, K], box 64 x 128
    TmaDesc b;  // W [experts * n_total, K], box 64 x 128 (gate_up) / 64 x 256 (down)
    GemmParams p;
    int num_m;  // row tiles
    int y16;    // down: write the expert outputs in the activation dtype instead of f32
    u64 token_of_row;  // gate_up gather mode: [rows] i32 token of each layout row; A = x [T, K]
    u64 tile_counter;  // u32, zero at launch: the dynamic tile scheduler's next block
    int flags;         // TW_SKIP_DEAD | TW_STAGED_EPI | TW_THREE_STAGES (A/B switches)
    int pad;
};

#define TW_BM 128
#define TW_BN 256
#define TW_BK 64
#define TW_STAGES 4
// A consumer whose 64 rows all lie past the expert's end issues no MMAs (the other one then has
// the tensor cores to itself) and the gather copies none of those rows.
#define TW_SKIP_DEAD 1
// 16-bit outputs go through a per-warp shared-memory buffer and leave as 16-byte row chunks.
#define TW_STAGED_EPI 2
// Per consumer warp: 16 rows x 128 16-bit columns, rows 272 bytes apart (16 bytes of padding
// put the 8 rows of one accumulator store on distinct banks; the last row needs no padding, so
// 8 buffers fit next to the 4 stages within 227 KiB).
#define TW_EPI_LD 68
#define TW_EPI_BYTES (15 * TW_EPI_LD * 4 + 256)
// A 3-stage ring (measurement switch: more L1 beside the epilogue buffer).
#define TW_THREE_STAGES 4
// Barriers and scheduler slots after the ring: 2 x 4 + 4 mbarriers and 3 block ids.
#define TW_BAR_BYTES 128

#ifdef MOE_HAS_WGMMA
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
// Arrives on `bar` once all of this thread's earlier cp.async copies have landed (the barrier's
// expected count includes this arrival).
__device__ __forceinline__ void cp_async_arrive(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* map, u64* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
            smem_addr(dst)),
        "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
        : "memory");
}
#endif

// The tile scheduler: producer thread 0 takes block indices from a global counter (zeroed
// before the launch) in the grouped order and hands the non-empty ones to the consumers through
// a 2-slot ring (`sched_full` / `sched_empty` mbarriers); -1 ends the walk. Taking blocks in
// order, as blocks free up, keeps the row tiles that share an expert's weight tile running at
// the same time, so the weights come from L2 for all but the first. (A static stride walk let
// those partners drift apart: ncu showed 28.3 GB of DRAM reads against 19.2 GB for the
// non-persistent kernel at deepseek-v3 T = 4096.)
// `num_m` counts units of `cl` row tiles; a unit has work when its first tile has rows.
__device__ __forceinline__ int next_block(const GemmParams& p, int num_m, int num_n, u64 counter, int total, int& tile,
                                          int& nb, int& e, int& row0, int& row_end, int cl = 1) {
    for (;;) {
        const int b = (int)atomicAdd((unsigned int*)counter, 1u);
        if (b >= total) return -1;
        block_coords_of(b, num_m, num_n, tile, nb);
        tile *= cl;
        if (tile_rows(p, tile, TW_BM, e, row0, row_end)) return b;
    }
}


#ifdef MOE_HAS_WGMMA
// Staged epilogue, part 1: the packed pair of 16-bit values of row g + 8 h, local columns
// 8 j + 2 t4 (+1) of a warp's 16 x 128 slab goes to its buffer. The offset beyond the thread's
// base is a constant, so no address registers compete with the 128 accumulators.
__device__ __forceinline__ void tw_epi_put(u32* buf, int h, int j, u32 v) {
    const int lane = threadIdx.x & 31;
    buf[(lane >> 2) * TW_EPI_LD + (lane & 3) + 8 * h * TW_EPI_LD + 4 * j] = v;
}
// Part 2: the slab leaves as 16-byte chunks, a warp store covering two whole 256-byte row
// segments (the register layout writes 8 rows x 16 bytes per store). Rows from `row_end` and
// columns from `n` are dropped; `ld` is the output's row length in elements.
__device__ __forceinline__ void tw_epi_flush(u32* buf, u16* out, int ld, int row_base, int row_end, int col0, int n) {
    const int lane = threadIdx.x & 31;
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 8; ++it) {
        const int r = 2 * it + (lane >> 4), ch = lane & 15;
        const int row = row_base + r, col = col0 + ch * 8;
        if (row < row_end && col < n) {
            const uint4 v = *(const uint4*)(buf + r * TW_EPI_LD + 4 * ch);
            u16* dst = out + (size_t)row * ld + col;
            if (col + 8 <= n && (ld & 7) == 0 && ((size_t)out & 15) == 0) {
                *(uint4*)dst = v;
            } else {
                for (int q = 0; q < 8 && col + q < n; ++q) {
                    const u32 w = q < 2 ? v.x : q < 4 ? v.y : q < 6 ? v.z : v.w;
                    dst[q] = (u16)(w >> (16 * (q & 1)));
                }
            }
        }
    }
    __syncwarp();  // the buffer is rewritten next
}
#endif

#ifdef MOE_HAS_WGMMA
// ---- 2-CTA clusters (sm_90): the partner's shared memory and barriers ----
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// The address of `p` (this CTA's shared memory) in CTA `rank`'s shared memory window.
__device__ __forceinline__ u32 cluster_addr(const void* p, u32 rank) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
    return a;
}
// Arrives on CTA `rank`'s copy of `bar` (default semantics: release at CTA scope, as a local
// arrive; enough for a stage release, whose reads were the MMAs this thread waited for).
__device__ __forceinline__ void mbar_arrive_cluster(u64* bar, u32 rank) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr(bar, rank)) : "memory");
}
// The same, releasing this thread's earlier writes (a block id stored into the partner) to the
// whole cluster: once per tile, not on every stage release.
__device__ __forceinline__ void mbar_arrive_cluster_release(u64* bar, u32 rank) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr(bar, rank))
                 : "memory");
}
// mbar_wait that also acquires what other CTAs of the cluster released before arriving.
__device__ __forceinline__ void mbar_wait_cluster(u64* bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, "
            "0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void st_cluster(int* p, u32 rank, int v) {
    asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(cluster_addr(p, rank)), "r"(v) : "memory");
}
// Every thread of every CTA of the cluster (threads may arrive from divergent paths).
__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// TMA tile load written to the same offset of every CTA in `mask`, completing on each one's `bar`.
__device__ __forceinline__ void tma_load_2d_mc(void* dst, const TmaDesc* map, u64* bar, int c0, int c1, u16 mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
        "%4}], [%2], %5;\n" ::"r"(smem_addr(dst)),
        "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(mask)
        : "memory");
}

// Barriers of the TMA tiles: `full` expects `full_count` arrivals; `empty` one per consumer warp
// of the cluster; the scheduler's 2-slot ring (CTA 0's slots are released by every consumer warp
// of the cluster and CTA 1's producer). Visible to the whole cluster on return.
template <int CL>
__device__ __forceinline__ void tw_init_cluster_barriers(u64* full, u64* empty, u64* sched_full, u64* sched_empty,
                                                         int stages, u32 full_count) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], full_count);
            mbar_init(&empty[s], 8 * CL);
        }
        for (int s = 0; s < 2; ++s) {
            mbar_init(&sched_full[s], 1);
            mbar_init(&sched_empty[s], CL > 1 ? 8 * CL + 1 : 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (CL > 1) cluster_sync_all();  // the partner's barriers exist before anything arrives on them
    else __syncthreads();
}

// The tile scheduler's slot ring and the stage releases of a TMA tile, for CTAs of a CL-CTA
// cluster (CL = 1: one CTA). CTA 0's producer takes block ids (next_block) and publishes them to
// every CTA; the others read them from their own slot.
template <int CL>
struct TwSync {
    u64* empty;
    u64* sched_full;
    u64* sched_empty;
    int* sched_block;
    u32 rank;

    // The block id of iteration `it`, once published into this CTA's slot.
    __device__ __forceinline__ int get(int it) const {
        const int slot = it & 1;
        if (CL > 1) mbar_wait_cluster(&sched_full[slot], (it >> 1) & 1);
        else mbar_wait(&sched_full[slot], (it >> 1) & 1);
        return sched_block[slot];
    }
    // This reader is done with iteration `it`'s slot (CTA 0's slot counts every reader).
    __device__ __forceinline__ void release(int it) const {
        if (CL > 1 && rank != 0) mbar_arrive_cluster(&sched_empty[it & 1], 0);
        else mbar_arrive(&sched_empty[it & 1]);
    }
    // CTA 0's producer: writes block `b` into every CTA's slot of iteration `it` once all its
    // readers released the slot's previous use.
    __device__ __forceinline__ void publish(int it, int b) const {
        const int slot = it & 1;
        if (CL > 1) mbar_wait_cluster(&sched_empty[slot], ((it >> 1) & 1) ^ 1);
        else mbar_wait(&sched_empty[slot], ((it >> 1) & 1) ^ 1);
        sched_block[slot] = b;
        if (CL > 1) {
            st_cluster(&sched_block[slot], 1, b);
            mbar_arrive_cluster_release(&sched_full[slot], 1);
        }
        mbar_arrive(&sched_full[slot]);
    }
    // A consumer warp releases stage `st` in every CTA of the cluster (the producers multicast
    // into all of them).
    __device__ __forceinline__ void stage_release(int st) const {
        mbar_arrive(&empty[st]);
        if (CL > 1) mbar_arrive_cluster(&empty[st], rank ^ 1);
    }
};
#endif

// CL = 2 (T256X2): a cluster of two CTAs takes two consecutive row tiles of one expert (the
// layout aligns experts to 256 rows, so tile 2u + 1 is 2u's expert or empty) and one column
// block; each CTA loads half of the shared weight tile and multicasts it to both, so L2 serves
// the weights once per pair (ncu: t256 runs at 96-98% of the L2's throughput). CTA 0's producer
// runs the scheduler and hands each block id to both; a stage is refilled only after the
// consumers of both CTAs released it. A CTA whose tile is empty keeps the protocol without MMAs.
// Opt-in (MOE_CUDA_WGMMA=t256x2): as first built it measured 1.35-1.9x slower than t256
// (docs/perf/cuda.md, session 7).
template <bool GATE_UP, class Tag, int CL>
__device__ __forceinline__ void tma_ws_gemm(const TmaGemmParams& tp) {
#ifdef MOE_HAS_WGMMA
    constexpr int A_BYTES = TW_BM * TW_BK * 2, B_BYTES = TW_BN * TW_BK * 2;
    const int STAGES = (tp.flags & TW_THREE_STAGES) ? 3 : TW_STAGES;
    const GemmParams& p = tp.p;
    extern __shared__ __align__(16) unsigned char tw_smem[];
    unsigned char* base = (unsigned char*)(((size_t)tw_smem + 1023) & ~(size_t)1023);
    unsigned char* As = base;
    unsigned char* Bs = base + STAGES * A_BYTES;
    u64* full = (u64*)(Bs + STAGES * B_BYTES);
    u64* empty = full + STAGES;
    u64* sched_full = empty + STAGES;
    u64* sched_empty = sched_full + 2;
    int* sched_block = (int*)(sched_empty + 2);  // [2] ring + [1] the producer warpgroup's copy
    // 8 consumer warps x TW_EPI_BYTES after the barriers; allocated only with TW_STAGED_EPI.
    unsigned char* epi = Bs + STAGES * B_BYTES + TW_BAR_BYTES;
    const int tid = threadIdx.x, wg = tid >> 7;
    const bool skip_dead = (tp.flags & TW_SKIP_DEAD) != 0;
    // Gather mode (gate_up of the contiguous layout): the producer warpgroup copies A rows
    // straight from the token activations with cp.async (row r of the tile is token
    // token_of_row[row0 + r]), so the permuted copy of the activations is never materialized.
    const bool gather = GATE_UP && tp.token_of_row != 0;
    const u32 rank = CL > 1 ? cluster_rank() : 0;
    tw_init_cluster_barriers<CL>(full, empty, sched_full, sched_empty, STAGES, gather ? 1 + 128 : 1);
    const int K = p.K, N = p.N, num_n = p.num_n;
    const int n_total = GATE_UP ? 2 * N : N;
    const int KT = (K + TW_BK - 1) / TW_BK;
    const int num_u = tp.num_m / CL;  // row-tile units (pairs of tiles when CL = 2)
    const int total = num_u * num_n;
    const TwSync<CL> sync{empty, sched_full, sched_empty, sched_block, rank};
    // This CTA's tile of block b: its rows (false: none) and the expert whose weights the pair
    // streams (the first tile's; the second is that expert's or empty).
    auto coords = [&](int b, int& nb, int& e, int& row0, int& row_end, int& e_w) {
        int tu;
        block_coords_of(b, num_u, num_n, tu, nb);
        const bool rows = tile_rows(p, tu * CL + (int)rank, TW_BM, e, row0, row_end);
        e_w = e;
        if (CL > 1 && rank != 0) {
            int r0, re;
            tile_rows(p, tu * CL, TW_BM, e_w, r0, re);
        }
        return rows;
    };
    if (wg == 0) {
        const u16* X = (const u16*)p.a;
        const int ch = tid & 7, rsub = tid >> 3;
        int stage = 0, it = 0;
        u32 phase = 0;
        for (; gather || tid == 0; ++it) {
            int nb = 0, e = 0, row0 = 0, row_end = 0, e_w = 0, b = -1;
            if (tid == 0) {
                if (rank == 0) {
                    int tile;
                    b = next_block(p, num_u, num_n, tp.tile_counter, total, tile, nb, e, row0, row_end, CL);
                    sync.publish(it, b);
                } else {
                    b = sync.get(it);
                    sync.release(it);
                }
            }
            if (gather) {
                // Share the block with the other producer threads (named barrier 1, 128 threads).
                if (tid == 0) sched_block[2] = b;
                asm volatile("bar.sync 1, 128;\n" ::: "memory");
                b = sched_block[2];
                asm volatile("bar.sync 1, 128;\n" ::: "memory");
            }
            if (b < 0) break;
            const bool has_rows = coords(b, nb, e, row0, row_end, e_w);
            const int wrow = e_w * n_total + nb * (GATE_UP ? TW_BN / 2 : TW_BN);
            // Gather: eight threads copy one 128-byte row segment (coalesced); thread tid covers
            // rows tid / 8 + 16 i. Rows past the expert's end are zero-filled.
            int tok[8];
            if (gather) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const int r = row0 + rsub + 16 * i;
                    tok[i] = r < row_end ? ((const int*)tp.token_of_row)[r] : -1;
                }
            }
            for (int kt = 0; kt < KT; ++kt) {
                mbar_wait(&empty[stage], phase ^ 1);
                const int k0 = kt * TW_BK;
                if (tid == 0) {
                    const bool load_a = !gather && has_rows;
                    mbar_expect_tx(&full[stage], load_a ? A_BYTES + B_BYTES : B_BYTES);
                    if (load_a) tma_load_2d(As + stage * A_BYTES, &tp.a, &full[stage], k0, row0);
                    if (CL > 1) {
                        // This CTA's half of the weight tile (gate_up: the gate or the up rows;
                        // down: 128 of the 256 rows), into both CTAs.
                        const int wr = GATE_UP ? wrow + (int)rank * N : wrow + (int)rank * (TW_BN / 2);
                        tma_load_2d_mc(Bs + stage * B_BYTES + rank * (B_BYTES / 2), &tp.b, &full[stage], k0, wr, (u16)3);
                    } else if (GATE_UP) {
                        tma_load_2d(Bs + stage * B_BYTES, &tp.b, &full[stage], k0, wrow);
                        tma_load_2d(Bs + stage * B_BYTES + B_BYTES / 2, &tp.b, &full[stage], k0, wrow + N);
                    } else {
                        tma_load_2d(Bs + stage * B_BYTES, &tp.b, &full[stage], k0, wrow);
                    }
                }
                if (gather) {
                    u16* dst = (u16*)(As + stage * A_BYTES) + rsub * TW_BK + ((ch ^ (rsub & 7)) << 3);
                    const int k = k0 + ch * 8;
                    // Rows 64.. (i >= 4) feed the second consumer, idle when they are all past the end.
                    const int copies = !has_rows ? 0 : skip_dead && row0 + 64 >= row_end ? 4 : 8;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        if (i >= copies) break;
                        const bool ok = tok[i] >= 0 && k < K;
                        cp_async16(dst + 16 * i * TW_BK, ok ? X + (size_t)tok[i] * K + k : X, ok ? 16 : 0);
                    }
                    cp_async_arrive(&full[stage]);
                }
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
        }
        if (CL > 1) cluster_sync_all();  // the partner may still multicast into / arrive on this CTA
        return;
    }
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    int stage = 0;
    u32 phase = 0;
    float d[TW_BN / 2];
    for (int it = 0;; ++it) {
        const int b = sync.get(it);
        __syncwarp();
        if (lane == 0) sync.release(it);
        if (b < 0) break;
        int nb, e, row0, row_end, e_w;
        const bool has_rows = coords(b, nb, e, row0, row_end, e_w);
#pragma unroll
        for (int i = 0; i < TW_BN / 2; ++i) d[i] = 0.f;
        // This consumer's rows row0 + 64 c.. hold no expert rows (or the CTA's tile none): it
        // only keeps the barrier protocol (wait on full, release on empty), so the other
        // consumer's MMAs run alone.
        const bool live = has_rows && (!skip_dead || row0 + c * 64 < row_end);
        int prev = -1;
        for (int kt = 0; kt < KT; ++kt) {
            mbar_wait(&full[stage], phase);
            if (live) {
                // cp.async (generic proxy) wrote A in gather mode; the MMAs read through the async proxy.
                if (gather) fence_proxy_async();
                const u16* as = (const u16*)(As + stage * A_BYTES) + c * 64 * TW_BK;
                const u16* bs = (const u16*)(Bs + stage * B_BYTES);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < TW_BK; kk += 16)
                    wgmma_m64n256k16(d, wgmma_desc(as + kk), wgmma_desc(bs + kk), Tag());
                wgmma_commit();
                wgmma_wait<1>();
                if (prev >= 0 && lane == 0) sync.stage_release(prev);
                prev = stage;
            } else {
                __syncwarp();
                if (lane == 0) sync.stage_release(stage);
            }
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        wgmma_wait<0>();
        if (prev >= 0 && lane == 0) sync.stage_release(prev);
        if (!live) continue;
        const int row_base = row0 + c * 64 + warp * 16;
        const int n0 = nb * (GATE_UP ? TW_BN / 2 : TW_BN);
        if ((tp.flags & TW_STAGED_EPI) && (GATE_UP || tp.y16)) {
            u32* buf = (u32*)(epi + (c * 4 + warp) * TW_EPI_BYTES);
            const int t4 = lane & 3;
            const float* bias = p.bias ? (const float*)p.bias + (size_t)e * n_total : nullptr;
            if (GATE_UP) {
                // Gate column block j (registers 4 j..) pairs with up block j + 16.
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        const int col = n0 + j * 8 + t4 * 2;
                        float v[2];
#pragma unroll
                        for (int q = 0; q < 2; ++q) {
                            float gt = d[4 * j + 2 * h + q], up = d[4 * (j + 16) + 2 * h + q];
                            if (bias && col + q < N) {
                                gt += bias[col + q];
                                up += bias[N + col + q];
                            }
                            v[q] = apply_act(p.act, gt, up, p.alpha, p.limit);
                        }
                        tw_epi_put(buf, h, j, (u32)from_f32(v[0], Tag()) | ((u32)from_f32(v[1], Tag()) << 16));
                    }
                tw_epi_flush(buf, (u16*)p.out, N, row_base, row_end, n0, N);
            } else {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int j = 0; j < 16; ++j) {
                            const int jj = 16 * half + j, col = n0 + jj * 8 + t4 * 2;
                            float v0 = d[4 * jj + 2 * h], v1 = d[4 * jj + 2 * h + 1];
                            if (bias) {
                                if (col < N) v0 += bias[col];
                                if (col + 1 < N) v1 += bias[col + 1];
                            }
                            tw_epi_put(buf, h, j, (u32)from_f32(v0, Tag()) | ((u32)from_f32(v1, Tag()) << 16));
                        }
                    tw_epi_flush(buf, (u16*)p.out, N, row_base, row_end, n0 + 128 * half, N);
                }
            }
            continue;
        }
        constexpr int NI = TW_BN / 8;
        float acc[1][NI][4];
        if (GATE_UP) {
            // Pair gate column block j with up block j + NI/2 in the (gate, up) order store_acc expects.
#pragma unroll
            for (int j = 0; j < NI / 2; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    acc[0][2 * j][r] = d[4 * j + r];
                    acc[0][2 * j + 1][r] = d[4 * (j + NI / 2) + r];
                }
        } else {
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[0][j][r] = d[4 * j + r];
        }
        if (!GATE_UP && tp.y16) store_acc<1, NI, false, Tag, true>(p, acc, e, row_base, row_end, 0, n0);
        else store_acc<1, NI, GATE_UP, Tag>(p, acc, e, row_base, row_end, 0, n0);
    }
    if (CL > 1) cluster_sync_all();
#endif
}


// ---- FP8 (e4m3) TMA tile: block-scaled weights and activations (DeepSeek-V3 FP8) ----
// The T256 structure (TMA producer warpgroup, two wgmma consumer warpgroups, dynamic scheduler)
// with 128 x 128 tiles and 128-byte k-tiles, i.e. one 128-channel scale block per k-tile. Each
// k-tile's MMAs start a fresh partial sum (scale-d = 0) that is promoted into the f32
// accumulator with the activation scale of its row x the weight block scale of its columns, as
// DeepSeek prescribes: Hopper's FP8 MMAs accumulate with limited precision, so the running sum
// over K stays on the CUDA cores. 64 + 64 accumulator registers a thread.
// Requires N % 128 == 0 when gate_up (the up rows start on a scale block) and K % 16 == 0.
struct F8TmaParams {
    TmaDesc a;  // A e4m3 [a_rows, K], box 128 x 128
    TmaDesc b;  // W e4m3 [experts * n_total, K], box 128 x 64 (gate_up, twice) / 128 x 128 (down)
    GemmParams p;
    int num_m;
    int y16;
    u64 tile_counter;
    u64 a_scales;  // f32 [ceil(K / 128), a_rows], 16-byte aligned
    u64 w_scales;  // f32 [experts][ceil(K / 128), n_total]: block scale of each weight row, 16-byte aligned
    int a_rows;  // a multiple of 4, at least num_m * 128 (whole tiles' scales are copied)
    int flags;   // F8_PINGPONG (measurement switch)
};
// Two partial-sum register sets per consumer: k-tile kt's MMAs run while kt - 1's partial sum is
// promoted (the producer warpgroup gives its registers to the consumers with setmaxnreg).
#define F8_PINGPONG 1
#define F8_PRODUCER_REGS 40
#define F8_CONSUMER_REGS 232

#define F8_BK 128
#define F8_BN 128
#define F8_STAGES 6
// The wide tile (f8t256): 128 x 256, 4 stages of 48 KiB.
#define F8W_STAGES 4

// 1-D bulk copy global -> shared (16-byte aligned, size a multiple of 16) completing on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst)),
                 "l"((u64)src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

// CL = 2: a cluster of two CTAs takes a row tile and two neighbouring column blocks (one each);
// each CTA loads half of the shared A tile and multicasts it to both, so L2 serves the A rows
// once per pair. CTA 0's producer runs the tile scheduler for the pair and hands each block id
// to both CTAs; a stage is refilled only after the consumers of both CTAs released it. Needs an
// even column-block count. Opt-in (MOE_CUDA_F8_CLUSTER=1): measured slower as first built.
// Two partial-sum register sets per consumer when F8_PINGPONG is set.
// BN = 256 (f8t256, CL = 1): 128 x 256 tiles, a quarter fewer operand bytes per MMA than
// 128 x 128. A consumer's 64 x 256 accumulator takes 128 registers, so its partial sum covers
// one 128-column half at a time (64 registers): each k-tile runs the gate (or first) half's
// MMAs, promotes them, then the other half's; the two consumers' halves interleave on the
// tensor cores. gate_up's halves are the gate rows n0.. and the up rows N + n0.. (128 output
// columns a tile); down's are columns n0.. and n0 + 128.., each its own weight scale block.
template <bool GATE_UP, class Tag, int CL, int BN = F8_BN>
__device__ __forceinline__ void f8_tma_ws_gemm(const F8TmaParams& tp) {
#ifdef MOE_HAS_WGMMA
    static_assert(BN == F8_BN || BN == 2 * F8_BN, "f8t128 or f8t256");
    constexpr int A_BYTES = TW_BM * F8_BK, B_BYTES = BN * F8_BK, STAGES = BN == F8_BN ? F8_STAGES : F8W_STAGES;
    const GemmParams& p = tp.p;
    extern __shared__ __align__(16) unsigned char f8_smem[];
    unsigned char* base = (unsigned char*)(((size_t)f8_smem + 1023) & ~(size_t)1023);
    unsigned char* As = base;
    unsigned char* Bs = base + STAGES * A_BYTES;
    // Each stage also carries its k-tile's scales (copied by the producer with the tiles, so the
    // consumers never wait on global loads): the activation scales of the tile's 128 rows and
    // the weight block scales, gate (or the first 128 columns) at 0 and up (the next 128) at 4
    // (4 words each: one 16-byte copy).
    float* Sa = (float*)(Bs + STAGES * B_BYTES);
    float* Sw = Sa + STAGES * TW_BM;
    constexpr bool TWO_SCALES = GATE_UP || BN > F8_BN;
    constexpr u32 SC_BYTES = TW_BM * 4 + (TWO_SCALES ? 32 : 16);
    u64* full = (u64*)(Sw + STAGES * 8);
    u64* empty = full + STAGES;
    u64* sched_full = empty + STAGES;
    u64* sched_empty = sched_full + 2;
    int* sched_block = (int*)(sched_empty + 2);
    const int tid = threadIdx.x, wg = tid >> 7;
    const u32 rank = CL > 1 ? cluster_rank() : 0;
    tw_init_cluster_barriers<CL>(full, empty, sched_full, sched_empty, STAGES, 1);
    const int K = p.K, N = p.N, num_n = p.num_n / CL;  // num_n: column-block units (pairs)
    const int n_total = GATE_UP ? 2 * N : N;
    const int KT = (K + F8_BK - 1) / F8_BK;
    const int total = tp.num_m * num_n;
    const bool pingpong = (tp.flags & F8_PINGPONG) != 0;
    const TwSync<CL> sync{empty, sched_full, sched_empty, sched_block, rank};
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(F8_PRODUCER_REGS));
        int stage = 0;
        u32 phase = 0;
        for (int it = 0; tid == 0; ++it) {
            int tile = 0, nb = 0, e = 0, row0 = 0, row_end = 0, b;
            if (rank == 0) {
                b = next_block(p, tp.num_m, num_n, tp.tile_counter, total, tile, nb, e, row0, row_end);
                sync.publish(it, b);
            } else {
                b = sync.get(it);
                sync.release(it);
                if (b >= 0) {
                    block_coords_of(b, tp.num_m, num_n, tile, nb);
                    tile_rows(p, tile, TW_BM, e, row0, row_end);
                }
            }
            if (b < 0) break;
            nb = nb * CL + rank;
            const int n0 = nb * (GATE_UP ? BN / 2 : BN), wrow = e * n_total + n0;
            // The second scale word: the up rows' block, or (down, wide) columns n0 + 128's,
            // which a partial column tile may not have (its outputs are dropped; any row will do).
            const int n1 = GATE_UP ? N + n0 : n0 + F8_BN < N ? n0 + F8_BN : n0;
            const float* ws = (const float*)tp.w_scales + (size_t)e * KT * n_total;
            for (int kt = 0; kt < KT; ++kt) {
                mbar_wait(&empty[stage], phase ^ 1);
                const int k0 = kt * F8_BK;
                mbar_expect_tx(&full[stage], A_BYTES + B_BYTES + SC_BYTES);
                if (CL > 1) {
                    // This CTA's half of the A rows, into both CTAs (the partner sends the other).
                    tma_load_2d_mc(As + stage * A_BYTES + rank * (A_BYTES / 2), &tp.a, &full[stage], k0,
                                   row0 + (int)rank * (TW_BM / 2), (u16)3);
                } else {
                    tma_load_2d(As + stage * A_BYTES, &tp.a, &full[stage], k0, row0);
                }
                bulk_load(Sa + stage * TW_BM, (const float*)tp.a_scales + (size_t)kt * tp.a_rows + row0, TW_BM * 4,
                          &full[stage]);
                bulk_load(Sw + stage * 8, ws + (size_t)kt * n_total + n0, 16, &full[stage]);
                if (TWO_SCALES) bulk_load(Sw + stage * 8 + 4, ws + (size_t)kt * n_total + n1, 16, &full[stage]);
                if (GATE_UP) {
                    tma_load_2d(Bs + stage * B_BYTES, &tp.b, &full[stage], k0, wrow);
                    tma_load_2d(Bs + stage * B_BYTES + B_BYTES / 2, &tp.b, &full[stage], k0, wrow + N);
                } else {
                    tma_load_2d(Bs + stage * B_BYTES, &tp.b, &full[stage], k0, wrow);
                }
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
        }
        if (CL > 1) cluster_sync_all();  // the partner may still multicast into / arrive on this CTA
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(F8_CONSUMER_REGS));
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2;
    int stage = 0;
    u32 phase = 0;
    auto advance = [&]() {
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    };
    constexpr int NI = BN / 8;
    float acc[1][NI][4];
    for (int it = 0;; ++it) {
        const int b = sync.get(it);
        __syncwarp();
        if (lane == 0) sync.release(it);
        if (b < 0) break;
        int tile, nb, e, row0, row_end;
        block_coords_of(b, tp.num_m, num_n, tile, nb);
        nb = nb * CL + rank;
        tile_rows(p, tile, TW_BM, e, row0, row_end);
        const int n0 = nb * (GATE_UP ? BN / 2 : BN);
        if (row0 + c * 64 >= row_end) {
            // All 64 rows of this warpgroup are padding (an expert's last, partial tile): release
            // the stages without MMAs so the other warpgroup has the tensor cores to itself.
            for (int kt = 0; kt < KT; ++kt) {
                mbar_wait(&full[stage], phase);
                __syncwarp();
                if (lane == 0) sync.stage_release(stage);
                advance();
            }
            continue;
        }
        // This thread's two rows (r_lo, r_lo + 8 of the tile) and the weight block scales that
        // apply: gate_up the gate block (f8t128: columns 0..63 of the tile; f8t256: the first
        // half) and the up block, down one block (f8t256: one a half).
        const int r_lo = c * 64 + warp * 16 + g;
        // Shared addresses of this thread's row scale (+ 32 bytes: row r_lo + 8) and of the
        // weight block scales, and the descriptors of its A rows and of B, all in stage 0.
        const u32 sa_addr = smem_addr(Sa + r_lo), sw_addr = smem_addr(Sw);
        const u32 da0 = wgmma_desc_lo(As + c * 64 * F8_BK), db0 = wgmma_desc_lo(Bs);
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[0][j][r] = 0.f;
        if constexpr (BN > F8_BN) {
            float d[F8_BN / 2];
            for (int kt = 0; kt < KT; ++kt) {
                mbar_wait(&full[stage], phase);
                const u32 da = da0 + stage * (A_BYTES >> 4), db = db0 + stage * (B_BYTES >> 4);
                // Read before the release below lets the producer refill the stage.
                const u32 sa = sa_addr + stage * (TW_BM * 4), sw = sw_addr + stage * 32;
                const float a_lo = lds_f32(sa), a_hi = lds_f32(sa + 32);
                const float bw[2] = {lds_f32(sw), lds_f32(sw + 16)};
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < F8_BK; kk += 32)
                        wgmma_m64n128k32_e4m3(d, wgmma_desc_of(da + (kk >> 4)),
                                              wgmma_desc_of(db + ((h * F8_BN * F8_BK + kk) >> 4)), kk > 0);
                    wgmma_commit();
                    wgmma_wait<0>();
                    if (h == 1 && lane == 0) sync.stage_release(stage);
                    const float s_lo = a_lo * bw[h], s_hi = a_hi * bw[h];
#pragma unroll
                    for (int j = 0; j < F8_BN / 8; ++j) {
                        float* o = acc[0][(NI / 2) * h + j];
                        o[0] = fmaf(d[4 * j + 0], s_lo, o[0]);
                        o[1] = fmaf(d[4 * j + 1], s_lo, o[1]);
                        o[2] = fmaf(d[4 * j + 2], s_hi, o[2]);
                        o[3] = fmaf(d[4 * j + 3], s_hi, o[3]);
                    }
                }
                advance();
            }
        } else {
            float d[F8_BN / 2], d2[F8_BN / 2];
            // Register 4 j + r of a partial sum: row lo (r < 2) or hi; column block 1 (the up
            // rows) for j >= NI/2 in gate_up, one block in down.
            auto promote = [&](const float(&dp)[F8_BN / 2], const float(&s)[4]) {
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    const bool blk1 = GATE_UP && j >= NI / 2;
                    acc[0][j][0] = fmaf(dp[4 * j + 0], blk1 ? s[1] : s[0], acc[0][j][0]);
                    acc[0][j][1] = fmaf(dp[4 * j + 1], blk1 ? s[1] : s[0], acc[0][j][1]);
                    acc[0][j][2] = fmaf(dp[4 * j + 2], blk1 ? s[3] : s[2], acc[0][j][2]);
                    acc[0][j][3] = fmaf(dp[4 * j + 3], blk1 ? s[3] : s[2], acc[0][j][3]);
                }
            };
            // Waits for k-tile kt's stage, issues its MMAs into `dn` and reads its scales into `s`.
            auto issue = [&](float(&dn)[F8_BN / 2], float(&s)[4]) {
                mbar_wait(&full[stage], phase);
                const u32 da = da0 + stage * (A_BYTES >> 4), db = db0 + stage * (B_BYTES >> 4);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < F8_BK; kk += 32)
                    wgmma_m64n128k32_e4m3(dn, wgmma_desc_of(da + (kk >> 4)), wgmma_desc_of(db + (kk >> 4)), kk > 0);
                wgmma_commit();
                const u32 sa = sa_addr + stage * (TW_BM * 4), sw = sw_addr + stage * 32;
                const float a_lo = lds_f32(sa), a_hi = lds_f32(sa + 32);
                const float b0 = lds_f32(sw), b1 = lds_f32(sw + (GATE_UP ? 16 : 0));
                s[0] = a_lo * b0;
                s[1] = a_lo * b1;
                s[2] = a_hi * b0;
                s[3] = a_hi * b1;
            };
            // Releases the oldest stage still held (`held` k-tiles back from the current one).
            auto release = [&](int held) {
                int st = stage - held;
                if (st < 0) st += STAGES;
                if (lane == 0) sync.stage_release(st);
            };
            if (pingpong) {
                // kt's MMAs (in one partial-sum set) stay in flight while kt - 1's (in the other)
                // are promoted; a stage is released once its MMAs have completed.
                float s_even[4], s_odd[4];
                issue(d, s_even);
                advance();
                int kt = 1;
                for (; kt + 1 < KT; kt += 2) {
                    issue(d2, s_odd);
                    advance();
                    wgmma_wait<1>();
                    release(2);
                    promote(d, s_even);
                    issue(d, s_even);
                    advance();
                    wgmma_wait<1>();
                    release(2);
                    promote(d2, s_odd);
                }
                if (kt < KT) {
                    issue(d2, s_odd);
                    advance();
                    wgmma_wait<1>();
                    release(2);
                    promote(d, s_even);
                    wgmma_wait<0>();
                    release(1);
                    promote(d2, s_odd);
                } else {
                    wgmma_wait<0>();
                    release(1);
                    promote(d, s_even);
                }
            } else {
                for (int kt = 0; kt < KT; ++kt) {
                    float s[4];
                    issue(d, s);
                    advance();
                    wgmma_wait<0>();
                    release(1);
                    promote(d, s);
                }
            }
        }
        const int row_base = row0 + c * 64 + warp * 16;
        if (GATE_UP) {
            // Pair gate column block j with up block j + NI/2 in the order store_acc expects.
            float pairs[1][NI][4];
#pragma unroll
            for (int j = 0; j < NI / 2; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    pairs[0][2 * j][r] = acc[0][j][r];
                    pairs[0][2 * j + 1][r] = acc[0][j + NI / 2][r];
                }
            store_acc<1, NI, true, Tag>(p, pairs, e, row_base, row_end, 0, n0);
        } else if (tp.y16) {
            store_acc<1, NI, false, Tag, true>(p, acc, e, row_base, row_end, 0, n0);
        } else {
            store_acc<1, NI, false, Tag>(p, acc, e, row_base, row_end, 0, n0);
        }
    }
    if (CL > 1) cluster_sync_all();
#endif
}

// Tile configurations: (name, dtype, BM, BN, BK, warps along M, warps along N, stages).
// Must match `GemmTile` in src/kernels.rs.
#define GEMM_ENTRY(NAME, DT, TAG, BM, BN, BK, WMW, WNW, ST)                                              \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) gemm_gate_up_##DT##_##NAME(GemmParams p) { \
        grouped_gemm<BM, BN, BK, WMW, WNW, ST, true, TAG>(p);                                           \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(WMW * WNW * 32) gemm_down_##DT##_##NAME(GemmParams p) {    \
        grouped_gemm<BM, BN, BK, WMW, WNW, ST, false, TAG>(p);                                          \
    }
#define TMA_WS_ENTRY(NAME, DT, TAG, CL)                                                                 \
    extern "C" __global__ void MOE_CLUSTER_##CL __launch_bounds__(384, 1)                                  \
        gemm_gate_up_##DT##_##NAME(const __grid_constant__ TmaGemmParams p) {                           \
        tma_ws_gemm<true, TAG, CL>(p);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void MOE_CLUSTER_##CL __launch_bounds__(384, 1)                                  \
        gemm_down_##DT##_##NAME(const __grid_constant__ TmaGemmParams p) {                              \
        tma_ws_gemm<false, TAG, CL>(p);                                                                 \
    }
// CL = 2 kernels carry their cluster shape (a plain launch runs them as 2-CTA clusters); below
// sm_90 they are empty and plain.
#define MOE_CLUSTER_1
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_CLUSTER_2 __cluster_dims__(2, 1, 1)
#else
#define MOE_CLUSTER_2
#endif
#define F8_TMA_ENTRY(NAME, DT, TAG, CL, BN)                                                             \
    extern "C" __global__ void MOE_CLUSTER_##CL __launch_bounds__(384, 1)                                  \
        gemm_gate_up_##DT##_##NAME(const __grid_constant__ F8TmaParams p) {                             \
        f8_tma_ws_gemm<true, TAG, CL, BN>(p);                                                           \
    }                                                                                                   \
    extern "C" __global__ void MOE_CLUSTER_##CL __launch_bounds__(384, 1)                                  \
        gemm_down_##DT##_##NAME(const __grid_constant__ F8TmaParams p) {                                \
        f8_tma_ws_gemm<false, TAG, CL, BN>(p);                                                          \
    }
#define WGMMA_ENTRY(NAME, DT, TAG, BN, ST)                                                         \
    extern "C" __global__ void __launch_bounds__(256, 1) gemm_gate_up_##DT##_##NAME(GemmParams p) { \
        wgmma_gemm<BN, ST, true, TAG>(p);                                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 1) gemm_down_##DT##_##NAME(GemmParams p) {    \
        wgmma_gemm<BN, ST, false, TAG>(p);                                                         \
    }

// Each dtype is its own module (MOE_GEMM_BF16 / MOE_GEMM_F16 are prepended by src/kernels.rs),
// so the first forward compiles only the kernels of its dtype.
#ifdef MOE_GEMM_BF16
GEMM_ENTRY(m16, bf16, Bf16Tag, 16, 128, 64, 1, 4, 4)
GEMM_ENTRY(m64, bf16, Bf16Tag, 64, 128, 64, 2, 2, 3)
GEMM_ENTRY(m128, bf16, Bf16Tag, 128, 128, 32, 2, 4, 4)
WGMMA_ENTRY(w128, bf16, Bf16Tag, 128, 4)
WGMMA_ENTRY(w256, bf16, Bf16Tag, 256, 4)
TMA_WS_ENTRY(t256, bf16, Bf16Tag, 1)
TMA_WS_ENTRY(t256x2, bf16, Bf16Tag, 2)
F8_TMA_ENTRY(f8t128, bf16, Bf16Tag, 1, 128)
F8_TMA_ENTRY(f8t128x2, bf16, Bf16Tag, 2, 128)
F8_TMA_ENTRY(f8t256, bf16, Bf16Tag, 1, 256)
F8_TMA_ENTRY(f8t256x2, bf16, Bf16Tag, 2, 256)
#endif
#ifdef MOE_GEMM_F16
GEMM_ENTRY(m16, f16, F16Tag, 16, 128, 64, 1, 4, 4)
GEMM_ENTRY(m64, f16, F16Tag, 64, 128, 64, 2, 2, 3)
GEMM_ENTRY(m128, f16, F16Tag, 128, 128, 32, 2, 4, 4)
WGMMA_ENTRY(w128, f16, F16Tag, 128, 4)
WGMMA_ENTRY(w256, f16, F16Tag, 256, 4)
TMA_WS_ENTRY(t256, f16, F16Tag, 1)
TMA_WS_ENTRY(t256x2, f16, F16Tag, 2)
F8_TMA_ENTRY(f8t128, f16, F16Tag, 1, 128)
F8_TMA_ENTRY(f8t128x2, f16, F16Tag, 2, 128)
F8_TMA_ENTRY(f8t256, f16, F16Tag, 1, 256)
F8_TMA_ENTRY(f8t256x2, f16, F16Tag, 2, 256)
#endif
