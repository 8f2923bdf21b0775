// Correct kernels for tests/test_emulator.py: each must give the NumPy answer in every thread order.
//
// Layout: plain C-contiguous arrays; one thread per output element unless a kernel says otherwise.

#define TILE 16

// c[i] = a[i] + b[i] for i < n; the grid may overshoot n.
extern "C" __global__ void vector_add(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ c, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

// c (m, n) = a (m, k) @ b (k, n), TILE x TILE blocks, tiles staged in static shared memory.
extern "C" __global__ void matmul_tiled(const float* a, const float* b, float* c, int m, int n, int k)
{
    __shared__ float a_tile[TILE][TILE];
    __shared__ float b_tile[TILE][TILE];
    const int row = blockIdx.y * TILE + threadIdx.y;
    const int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        a_tile[threadIdx.y][threadIdx.x] = (row < m && k0 + threadIdx.x < k) ? a[row * k + k0 + threadIdx.x] : 0.0f;
        b_tile[threadIdx.y][threadIdx.x] = (col < n && k0 + threadIdx.y < k) ? b[(k0 + threadIdx.y) * n + col] : 0.0f;
        __syncthreads();
        for (int j = 0; j < TILE; ++j) acc += a_tile[threadIdx.y][j] * b_tile[j][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = acc;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// partial[blockIdx.x] = sum of x over a grid-stride loop; blockDim.x a multiple of 32, at most 1024.
extern "C" __global__ void block_reduce_sum(const float* x, float* partial, int n)
{
    __shared__ float warp_sums[32];
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    const int lane = threadIdx.x % warpSize;
    const int warp = threadIdx.x / warpSize;
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / warpSize;
        v = lane < warps ? warp_sums[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) partial[blockIdx.x] = v;
    }
}

// y = x with every block-sized chunk reversed, through dynamic shared memory of blockDim.x floats.
extern "C" __global__ void reverse_chunks(const float* x, float* y, int n)
{
    extern __shared__ float chunk[];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    chunk[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    const int src = blockDim.x - 1 - threadIdx.x;
    const int out = blockIdx.x * blockDim.x + src;
    if (out < n) y[out] = chunk[threadIdx.x];
}

__constant__ float poly_coeffs[4] = {1.0f, -2.0f, 0.5f, 3.0f};

// y = c0 + c1 x + c2 x^2 + c3 x^3 with the coefficients in constant memory.
extern "C" __global__ void poly_eval(const float* x, float* y, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    y[i] = poly_coeffs[0] + v * (poly_coeffs[1] + v * (poly_coeffs[2] + v * poly_coeffs[3]));
}

// bins[values[i]] += 1 (int atomics); total += x[i] (float atomics); biggest = max(values) (atomicMax).
extern "C" __global__ void atomics(const int* values, const float* x, int* bins, float* total, int* biggest,
                                   int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(&bins[values[i]], 1);
    atomicAdd(total, x[i]);
    atomicMax(biggest, values[i]);
}

// Per warp w of 32 threads: ballots[w] = bits of x > 0, any[w], all[w]; scan = inclusive warp prefix sums
// (__shfl_up_sync); total = warp sums by butterfly (__shfl_xor_sync); count = __syncthreads_count(x > 0).
extern "C" __global__ void warp_ops(const int* x, unsigned int* ballots, int* any, int* all, int* scan,
                                    int* total, int* count)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const int v = x[i];
    const unsigned int ballot = __ballot_sync(0xffffffffu, v > 0);
    const int a = __any_sync(0xffffffffu, v > 0);
    const int b = __all_sync(0xffffffffu, v > 0);
    int s = v;
    for (int d = 1; d < 32; d *= 2) {
        const int up = __shfl_up_sync(0xffffffffu, s, d);
        if (lane >= d) s += up;
    }
    int t = v;
    for (int m = 16; m > 0; m /= 2) t += __shfl_xor_sync(0xffffffffu, t, m);
    const int positives = __syncthreads_count(v > 0);
    scan[i] = s;
    total[i] = t;
    if (lane == 0) {
        ballots[i / 32] = ballot;
        any[i / 32] = a;
        all[i / 32] = b;
    }
    if (threadIdx.x == 0) count[blockIdx.x] = positives;
}

// y[i] = x[i] broadcast from lane src of each 8-lane segment (width 8), for every thread of a 32-thread block.
extern "C" __global__ void shuffle_segments(const float* x, float* y, int src)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = __shfl_sync(0xffffffffu, x[i], src, 8);
}

// out[(block_linear * threads + thread_linear) * 6 + k] = blockIdx.{x,y,z}, threadIdx.{x,y,z} for a 3-D launch.
extern "C" __global__ void coordinates(int* out)
{
    const int block_linear = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int thread_linear = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int* o = out + (block_linear * (blockDim.x * blockDim.y * blockDim.z) + thread_linear) * 6;
    o[0] = blockIdx.x;
    o[1] = blockIdx.y;
    o[2] = blockIdx.z;
    o[3] = threadIdx.x;
    o[4] = threadIdx.y;
    o[5] = threadIdx.z;
}
