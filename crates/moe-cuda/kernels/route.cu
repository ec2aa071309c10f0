// Router logits and every routing method of moe-core's routing module, one warp per token.
// Must stay in step with crates/moe-core/src/routing (ties: the lower expert index wins).

// Must match `RouteMethod` in src/kernels.rs.
#define ROUTE_SOFTMAX_TOPK 0
#define ROUTE_DEEPSEEK_V3 1
#define ROUTE_DEEPSEEK_V2 2
#define ROUTE_GPT_OSS 3
#define ROUTE_LLAMA4 4
#define ROUTE_MAX_GROUPS 64
#define ROUTE_WARPS 4

struct RouterLogitsParams {
    u64 x;       // [T, H] activations
    u64 w;       // [E, H] f32
    u64 bias;    // [E] f32 or 0
    u64 logits;  // [T, E] f32 out
    int tokens, experts, hidden, pad;
};

// One warp per (token, expert) dot product in f32 (the router stays f32 like the reference).
template <class Tag>
__device__ void router_logits(const RouterLogitsParams& p) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= p.tokens * p.experts) return;
    const int t = warp / p.experts, e = warp % p.experts;
    const u16* x = (const u16*)p.x + (size_t)t * p.hidden;
    const float* w = (const float*)p.w + (size_t)e * p.hidden;
    float acc = 0.f;
    for (int h = lane * 8; h < p.hidden; h += 256) {
        uint4 xv = *(const uint4*)(x + h);
        float4 w0 = *(const float4*)(w + h), w1 = *(const float4*)(w + h + 4);
        const u16* xs = (const u16*)&xv;
        acc += to_f32(xs[0], Tag()) * w0.x + to_f32(xs[1], Tag()) * w0.y + to_f32(xs[2], Tag()) * w0.z +
               to_f32(xs[3], Tag()) * w0.w + to_f32(xs[4], Tag()) * w1.x + to_f32(xs[5], Tag()) * w1.y +
               to_f32(xs[6], Tag()) * w1.z + to_f32(xs[7], Tag()) * w1.w;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        if (p.bias) acc += ((const float*)p.bias)[e];
        ((float*)p.logits)[(size_t)t * p.experts + e] = acc;
    }
}

extern "C" __global__ void router_logits_bf16(RouterLogitsParams p) { router_logits<Bf16Tag>(p); }
extern "C" __global__ void router_logits_f16(RouterLogitsParams p) { router_logits<F16Tag>(p); }

struct RouterPrepParams {
    u64 x;       // [T, H] 16-bit activations
    u64 x32;     // [T, H] f32 out (the SGEMM's input)
    u64 bias;    // [E] f32 or 0
    u64 logits;  // [T, E] f32: the bias rows, which the SGEMM then adds to (beta = 1)
    long long n; // T * H
    int tokens, experts;
};

// Before the cuBLAS router SGEMM (large T): activations to f32 and the bias broadcast.
template <class Tag>
__device__ void router_prep(const RouterPrepParams& p) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = first; i < p.n; i += stride) ((float*)p.x32)[i] = to_f32(((const u16*)p.x)[i], Tag());
    if (p.bias) {
        const long long m = (long long)p.tokens * p.experts;
        for (long long i = first; i < m; i += stride)
            ((float*)p.logits)[i] = ((const float*)p.bias)[i % p.experts];
    }
}

extern "C" __global__ void router_prep_bf16(RouterPrepParams p) { router_prep<Bf16Tag>(p); }
extern "C" __global__ void router_prep_f16(RouterPrepParams p) { router_prep<F16Tag>(p); }

struct RouteParams {
    u64 logits;   // [T, E] f32
    u64 bias;     // [E] f32 selection bias (DeepSeek-V3) or 0
    u64 ids;      // [T, k] i32 out
    u64 weights;  // [T, k] f32 out
    u64 err;      // int flag: 1 + first token with a non-finite logit
    int tokens, experts, k, method;
    int n_group, topk_group, renormalize, mask_neg_inf;
    float scale, pad0;
};

// Best (value, index) over the untaken entries: larger value wins, ties go to the lower index.
// Taken entries hold NaN.
__device__ __forceinline__ void warp_argmax(const float* c, int n, int lane, float& best_v, int& best_i) {
    best_v = -INFINITY;
    best_i = 0x7fffffff;
    for (int i = lane; i < n; i += 32) {
        float v = c[i];
        if (v != v) continue;
        if (v > best_v || (v == best_v && i < best_i)) {
            best_v = v;
            best_i = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
        int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ov > best_v || (ov == best_v && oi < best_i)) {
            best_v = ov;
            best_i = oi;
        }
    }
}

__device__ void warp_softmax(float* v, int n, int lane) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, v[i]);
    m = warp_max(m);
    float s = 0.f;
    for (int i = lane; i < n; i += 32) {
        float e = expf(v[i] - m);
        v[i] = e;
        s += e;
    }
    s = warp_sum(s);
    __syncwarp();
    for (int i = lane; i < n; i += 32) v[i] /= s;
    __syncwarp();
}

// Keeps the `keep` best groups (scores in gs[0..ng]) and masks the others' entries in c with `mask`.
__device__ void mask_groups(float* c, float* gs, int ng, int keep, int group_size, float mask, int lane) {
    // Pick the kept groups on lane 0 (ng is small); gs[g] becomes NaN for kept groups.
    if (lane == 0) {
        for (int r = 0; r < keep; ++r) {
            int bi = -1;
            float bv = -INFINITY;
            for (int g = 0; g < ng; ++g) {
                float v = gs[g];
                if (v != v) continue;
                if (bi < 0 || v > bv) {
                    bv = v;
                    bi = g;
                }
            }
            gs[bi] = __int_as_float(0x7fc00000);
        }
    }
    __syncwarp();
    for (int i = lane; i < ng * group_size; i += 32) {
        float g = gs[i / group_size];
        if (g == g) c[i] = mask;
    }
    __syncwarp();
}

extern "C" __global__ void moe_route(RouteParams p) {
    extern __shared__ float route_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= p.tokens) return;
    const int E = p.experts, k = p.k;
    float* s = route_smem + warp * (2 * E + ROUTE_MAX_GROUPS);  // scores the weights come from
    float* c = s + E;                                           // selection scores
    float* gs = c + E;                                          // group scores
    const float* l = (const float*)p.logits + (size_t)t * E;
    bool bad = false;
    for (int i = lane; i < E; i += 32) {
        float v = l[i];
        bad |= !isfinite(v);
        s[i] = v;
    }
    if (__any_sync(0xffffffffu, bad) && lane == 0) atomicCAS((int*)p.err, 0, t + 1);
    __syncwarp();
    const int m = p.method;
    if (m == ROUTE_SOFTMAX_TOPK || m == ROUTE_DEEPSEEK_V2) warp_softmax(s, E, lane);
    if (m == ROUTE_DEEPSEEK_V3) {
        for (int i = lane; i < E; i += 32) s[i] = sigmoid_f(s[i]);
        __syncwarp();
    }
    for (int i = lane; i < E; i += 32) c[i] = s[i] + ((m == ROUTE_DEEPSEEK_V3 && p.bias) ? ((const float*)p.bias)[i] : 0.f);
    __syncwarp();
    if (m == ROUTE_DEEPSEEK_V3 || (m == ROUTE_DEEPSEEK_V2 && p.n_group > 0)) {
        const int ng = p.n_group, gsz = E / ng;
        for (int g = lane; g < ng; g += 32) {
            float a = -INFINITY, b = -INFINITY;  // top-2 (V3) or max (V2)
            for (int i = 0; i < gsz; ++i) {
                float v = c[g * gsz + i];
                if (v > a) {
                    b = a;
                    a = v;
                } else if (v > b) {
                    b = v;
                }
            }
            gs[g] = m == ROUTE_DEEPSEEK_V3 ? a + b : a;
        }
        __syncwarp();
        float mask = (m == ROUTE_DEEPSEEK_V3 && p.mask_neg_inf) ? -INFINITY : 0.f;
        mask_groups(c, gs, ng, p.topk_group, gsz, mask, lane);
    }
    int* ids = (int*)p.ids + (size_t)t * k;
    float* w = (float*)p.weights + (size_t)t * k;
    float wsum = 0.f, wmax = -INFINITY;
    for (int r = 0; r < k; ++r) {
        float bv;
        int bi;
        warp_argmax(c, E, lane, bv, bi);
        if (bi >= E) bi = 0;  // only reachable with non-finite logits, which raise the error flag
        float wv;
        if (m == ROUTE_GPT_OSS) wv = s[bi];
        else if (m == ROUTE_LLAMA4) wv = sigmoid_f(s[bi]);
        else wv = s[bi];
        if (lane == 0) {
            ids[r] = bi;
            w[r] = wv;
            c[bi] = __int_as_float(0x7fc00000);
        }
        wsum += wv;
        wmax = fmaxf(wmax, wv);
        __syncwarp();
    }
    if (lane != 0) return;
    if (m == ROUTE_GPT_OSS) {
        float z = 0.f;
        for (int r = 0; r < k; ++r) {
            w[r] = expf(w[r] - wmax);
            z += w[r];
        }
        for (int r = 0; r < k; ++r) w[r] /= z;
    } else if (m == ROUTE_SOFTMAX_TOPK) {
        if (p.renormalize)
            for (int r = 0; r < k; ++r) w[r] /= wsum;
    } else if (m == ROUTE_DEEPSEEK_V3) {
        float d = p.renormalize ? wsum + 1e-20f : 1.f;
        for (int r = 0; r < k; ++r) w[r] = w[r] / d * p.scale;
    } else if (m == ROUTE_DEEPSEEK_V2) {
        if (k > 1 && p.renormalize)
            for (int r = 0; r < k; ++r) w[r] /= (wsum + 1e-20f);
        else
            for (int r = 0; r < k; ++r) w[r] *= p.scale;
    }
}
