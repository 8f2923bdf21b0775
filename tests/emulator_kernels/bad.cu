// Deliberately broken kernels: tests/test_emulator.py checks that the emulator catches each bug.
// (matmul_missing_second_sync is good.cu's matmul_tiled less its second barrier: tests/test_emulator.py
// appends it to a copy of this file.)

#define TILE 16

// BUG: threads past n return before the barrier the others wait at.
extern "C" __global__ void early_return_before_barrier(const float* x, float* y, int n)
{
    __shared__ float s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    s[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = s[threadIdx.x] * 2.0f;
}

// BUG: pre-Volta warp-synchronous tail of a shared-memory reduction (no __syncwarp / *_sync).
// out[blockIdx.x] = sum of the block's 64 inputs; launched with 64 threads per block.
extern "C" __global__ void legacy_warp_reduce(const float* x, float* out)
{
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * 64 + t];
    __syncthreads();
    if (t < 32) {
        volatile float* v = s;
        v[t] += v[t + 32];
        v[t] += v[t + 16];
        v[t] += v[t + 8];
        v[t] += v[t + 4];
        v[t] += v[t + 2];
        v[t] += v[t + 1];
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// BUG: every thread reads its right neighbour's slot, but slot blockDim.x is never written.
extern "C" __global__ void read_unwritten_shared(const float* x, float* y)
{
    __shared__ float s[65];
    const int t = threadIdx.x;
    s[t] = x[t];
    __syncthreads();
    y[t] = s[t] + s[t + 1];
}

// BUG: a full-mask shuffle that only half the warp executes; the other half has returned.
extern "C" __global__ void divergent_full_shuffle(const float* x, float* y)
{
    const int lane = threadIdx.x & 31;
    if (lane >= 16) return;
    y[lane] = __shfl_down_sync(0xffffffffu, x[lane], 8);
}

// BUG: half the warp shuffles with a full mask while the other half waits at __syncthreads.
extern "C" __global__ void shuffle_against_barrier(const float* x, float* y)
{
    const int lane = threadIdx.x & 31;
    float v = x[lane];
    if (lane < 16) v = __shfl_down_sync(0xffffffffu, v, 8);
    __syncthreads();
    y[lane] = v;
}

// BUG: the mask names only lane 0, yet every lane calls the shuffle.
extern "C" __global__ void mask_excludes_caller(const float* x, float* y)
{
    y[threadIdx.x] = __shfl_sync(0x1u, x[threadIdx.x], 0);
}

// BUG: missing __syncthreads between the write and the read of the left neighbour's slot. In forward
// order every lower thread has already written its slot, so the bug only shows in another order.
extern "C" __global__ void neighbour_race(const float* x, float* y)
{
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[t];
    y[t] = s[t > 0 ? t - 1 : 0];
}

// BUG: reads dynamic shared memory that no thread wrote.
extern "C" __global__ void read_unwritten_dynamic_shared(float* y)
{
    extern __shared__ float scratch[];
    y[threadIdx.x] = scratch[threadIdx.x];
}
