// Probe: how fast can a decode-sized packed-weight kernel pull its bytes, by access pattern alone?
// No dequantization and no MMAs: each warp loads exactly the bytes qdecode2_gate_up loads for
// MXFP4 gpt-oss-20b at T = 1 (4 experts x 5760 rows x 1440 bytes = 33.2 MB) and XORs them into
// a sink. The experts rotate through 32 copies (265 MB, over L2) between launches.
//
//   nvcc -O3 -arch=sm_90a -o stream_patterns crates/moe-cuda/probes/stream_patterns.cu
//   ./stream_patterns                       # table: pattern, blocks an SM, depth, us, GB/s
//
// Patterns:
//   rows     the current one: lane (g, t) reads 16-byte chunk 4 b + t of rows g and g + 8 of its
//            warp's 16-row group (64-byte pieces of 16 rows an instruction), k split over 2 warps,
//            grid (90, 4) of 8-warp blocks.
//   tiles    the same grid and work split, but the warp's bytes are one contiguous run (a repacked
//            layout): each instruction reads 512 contiguous bytes.
//   persist  contiguous units, handed out round-robin to every warp of a grid sized to the GPU.
//   stream   a plain grid-stride read of the same 33.2 MB: the ceiling.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));         \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

constexpr int I = 2880, ROWS = 2 * I, ROW_BYTES = 1440, CHUNKS = ROW_BYTES / 16;  // 90 chunks a row
constexpr int EXPERTS = 32, ACTIVE = 4;
constexpr size_t EXPERT_BYTES = (size_t)ROWS * ROW_BYTES;
constexpr int UNIT_CHUNKS = 16 * CHUNKS / 2;  // 16 rows x half the row = 720 chunks (11.5 KB)
constexpr int UNITS_PER_EXPERT = ROWS / 16 * 2;  // 720

__device__ __forceinline__ uint4 ldg(const uint4* p) { return __ldg(p); }
__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// rows: the qdecode2 gate_up pattern.
template <int U>
__global__ void __launch_bounds__(256) k_rows(const uint4* w, int first, unsigned* sink) {
    extern __shared__ unsigned pad[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int grp = warp % 4, part = warp / 4;
    const int e = (first + blockIdx.y) % EXPERTS;
    const int c0 = (blockIdx.x * 4 + grp) * 8;
    const uint4* wa = w + (size_t)e * EXPERT_BYTES / 16 + (size_t)(c0 + g) * CHUNKS;
    const uint4* wb = w + (size_t)e * EXPERT_BYTES / 16 + (size_t)(I + c0 + g) * CHUNKS;
    const int blocks = (CHUNKS + 3) / 4, per = (blocks + 1) / 2;
    const int kb0 = part * per, kb1 = min(blocks, (part + 1) * per);
    uint4 qa[U], qb[U];
    auto load = [&](int u, int b) {
        const int c = 4 * b + t;
        const bool ok = b < kb1 && c < CHUNKS;
        qa[u] = ok ? ldg(wa + c) : make_uint4(0, 0, 0, 0);
        qb[u] = ok ? ldg(wb + c) : make_uint4(0, 0, 0, 0);
    };
    unsigned acc = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) load(u, kb0 + u);
    for (int b0 = kb0; b0 < kb1; b0 += U) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (b0 + u >= kb1) break;
            const uint4 a = qa[u], b = qb[u];
            load(u, b0 + u + U);
            acc ^= fold(a) * 3u + fold(b);
        }
    }
    if (acc == 0x12345678u) sink[0] = acc + pad[0];
}

// One warp's contiguous unit (11.5 KB) at p, 2 x 512 bytes an instruction, U steps in flight.
template <int U>
__device__ __forceinline__ unsigned stream_unit(const uint4* p, int lane) {
    constexpr int STEPS = (UNIT_CHUNKS + 63) / 64;  // 12 (the last one partial)
    uint4 qa[U], qb[U];
    auto load = [&](int u, int s) {
        const int c = s * 64 + lane;
        qa[u] = s < STEPS && c < UNIT_CHUNKS ? ldg(p + c) : make_uint4(0, 0, 0, 0);
        qb[u] = s < STEPS && c + 32 < UNIT_CHUNKS ? ldg(p + c + 32) : make_uint4(0, 0, 0, 0);
    };
    unsigned acc = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) load(u, u);
    for (int s0 = 0; s0 < STEPS; s0 += U) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (s0 + u >= STEPS) break;
            const uint4 a = qa[u], b = qb[u];
            load(u, s0 + u + U);
            acc ^= fold(a) * 3u + fold(b);
        }
    }
    return acc;
}

// tiles: the same split as rows, each warp's bytes one contiguous unit.
template <int U>
__global__ void __launch_bounds__(256) k_tiles(const uint4* w, int first, unsigned* sink) {
    extern __shared__ unsigned pad[];
    const int e = (first + blockIdx.y) % EXPERTS;
    const int unit = blockIdx.x * 8 + (threadIdx.x >> 5);  // 90 x 8 = 720 units an expert
    const unsigned acc = stream_unit<U>(w + (size_t)e * EXPERT_BYTES / 16 + (size_t)unit * UNIT_CHUNKS, threadIdx.x & 31);
    if (acc == 0x12345678u) sink[0] = acc + pad[0];
}

// persist: contiguous units round-robin over every warp of the grid.
template <int U>
__global__ void __launch_bounds__(256) k_persist(const uint4* w, int first, unsigned* sink) {
    extern __shared__ unsigned pad[];
    const int gw = blockIdx.x * 8 + (threadIdx.x >> 5), nw = gridDim.x * 8;
    unsigned acc = 0;
    for (int u_all = gw; u_all < ACTIVE * UNITS_PER_EXPERT; u_all += nw) {
        const int e = (first + u_all / UNITS_PER_EXPERT) % EXPERTS, unit = u_all % UNITS_PER_EXPERT;
        acc ^= stream_unit<U>(w + (size_t)e * EXPERT_BYTES / 16 + (size_t)unit * UNIT_CHUNKS, threadIdx.x & 31);
    }
    if (acc == 0x12345678u) sink[0] = acc + pad[0];
}

// stream: grid-stride over the 4 active experts' bytes, 4 loads in flight a lane.
__global__ void __launch_bounds__(256) k_stream(const uint4* w, int first, unsigned* sink) {
    extern __shared__ unsigned pad[];
    const size_t n = EXPERT_BYTES / 16;
    unsigned acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (int x = 0; x < ACTIVE; ++x) {
        const uint4* p = w + (size_t)((first + x) % EXPERTS) * n;
        size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
        for (; i + 3 * stride < n; i += 4 * stride) {
            const uint4 a = ldg(p + i), b = ldg(p + i + stride), c = ldg(p + i + 2 * stride), d = ldg(p + i + 3 * stride);
            acc ^= fold(a) + fold(b) * 3u + fold(c) * 5u + fold(d) * 7u;
        }
        for (; i < n; i += stride) acc ^= fold(ldg(p + i));
    }
    if (acc == 0x12345678u) sink[0] = acc + pad[0];
}

typedef void (*Kern)(const uint4*, int, unsigned*);

static double time_kernel(Kern k, dim3 grid, int smem, const uint4* w, unsigned* sink) {
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    int first = 0;
    for (int i = 0; i < 20; ++i, first += ACTIVE) k<<<grid, 256, smem>>>(w, first, sink);
    CK(cudaGetLastError());
    std::vector<float> ts;
    for (int i = 0; i < 200; ++i, first += ACTIVE) {
        CK(cudaEventRecord(a));
        k<<<grid, 256, smem>>>(w, first, sink);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return ts[ts.size() / 2] * 1e3;
}

int main() {
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    uint4* w;
    unsigned* sink;
    CK(cudaMalloc(&w, EXPERTS * EXPERT_BYTES));
    CK(cudaMalloc(&sink, 64));
    CK(cudaMemset(w, 0x5a, EXPERTS * EXPERT_BYTES));
    const double bytes = (double)ACTIVE * EXPERT_BYTES;
    // Shared memory that caps the blocks an SM at nb (228 KiB an SM, 1 KiB reserved a block).
    auto smem_for = [](int nb) { return nb >= 8 ? 0 : (228 * 1024) / nb - 1024 - 64; };
    printf("%-8s %4s %3s %9s %8s\n", "pattern", "nb", "U", "us", "GB/s");
    auto row = [&](const char* name, int nb, int u, double us) {
        printf("%-8s %4d %3d %9.2f %8.0f\n", name, nb, u, us, bytes / us * 1e-3);
        fflush(stdout);
    };
    row("stream", 8, 4, time_kernel(k_stream, dim3(sms * 8), 0, w, sink));
    for (int nb : {2, 3, 4, 8}) {
        const int smem = smem_for(nb);
        row("rows", nb, 1, time_kernel(k_rows<1>, dim3(90, ACTIVE), smem, w, sink));
        row("rows", nb, 3, time_kernel(k_rows<3>, dim3(90, ACTIVE), smem, w, sink));
        row("rows", nb, 6, time_kernel(k_rows<6>, dim3(90, ACTIVE), smem, w, sink));
        row("tiles", nb, 1, time_kernel(k_tiles<1>, dim3(90, ACTIVE), smem, w, sink));
        row("tiles", nb, 3, time_kernel(k_tiles<3>, dim3(90, ACTIVE), smem, w, sink));
        row("tiles", nb, 6, time_kernel(k_tiles<6>, dim3(90, ACTIVE), smem, w, sink));
        row("persist", nb, 3, time_kernel(k_persist<3>, dim3(sms * nb), smem, w, sink));
        row("persist", nb, 6, time_kernel(k_persist<6>, dim3(sms * nb), smem, w, sink));
    }
    CK(cudaFree(w));
    CK(cudaFree(sink));
    return 0;
}
