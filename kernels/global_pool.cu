// Global average pooling (nn.AdaptiveAvgPool2d(1)), forward and backward.
//
// Layout: x and grad_x C-contiguous float32 (n, c, h, w), seen as planes = n * c planes of l = h * w values
// (plane p at x[p * l .. p * l + l)); y and grad_y (n, c, 1, 1), one value per plane. The same formulas as
// gpucnn/ops/pool.py: y = sum(plane) * (1 / l), grad_x = grad_y * (1 / l) at every value of the plane.
//
// Block shape: GAP_THREADS threads as (tx, ty), tx the smallest power of two >= l (at most GAP_THREADS):
// threadIdx.x walks a plane's values (a warp reads consecutive addresses), threadIdx.y picks one of ty
// planes. gpucnn/cuda/pool.py picks it and keeps planes and l within int32; offsets and loop counters
// are 64-bit (plane * l may pass 2**31, and a counter plus its grid stride may too).
//
// Kernels and what they write:
//   global_avg_pool2d_forward   y: 1-D grid over groups of ty planes (looping past the grid). Each row of
//                               tx threads sums its plane, thread s adding values s, s + tx, ..., then a
//                               fixed tree in shared memory; no atomics, so y is bitwise reproducible.
//   global_avg_pool2d_backward  grad_x: grid x covers a plane's values, y loops over groups of planes.

#define GAP_THREADS 256  // threads per block; gpucnn/cuda/pool.py agrees

extern "C" __global__ void global_avg_pool2d_forward(const float* x, float* y, int planes, int l)
{
    __shared__ float sums[GAP_THREADS];
    const int t = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const float scale = 1.0f / (float)l;
    // The loop bound depends only on blockIdx, so every thread of the block reaches every barrier.
    for (long long first = blockIdx.x * (long long)blockDim.y; first < planes;
         first += (long long)gridDim.x * blockDim.y) {
        const long long plane = first + threadIdx.y;
        float acc = 0.0f;
        if (plane < planes) {
            const float* row = x + plane * l;
            for (int s = (int)threadIdx.x; s < l; s += (int)blockDim.x) acc += row[s];
        }
        sums[t] = acc;
        __syncthreads();
        for (int stride = (int)blockDim.x / 2; stride > 0; stride >>= 1) {
            if ((int)threadIdx.x < stride) sums[t] += sums[t + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0 && plane < planes) y[plane] = sums[t] * scale;
        __syncthreads();  // the next group overwrites sums
    }
}

extern "C" __global__ void global_avg_pool2d_backward(const float* grad_y, float* grad_x, int planes, int l)
{
    const long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (s >= l) return;
    const float scale = 1.0f / (float)l;
    for (long long plane = blockIdx.y * (long long)blockDim.y + threadIdx.y; plane < planes;
         plane += (long long)gridDim.y * blockDim.y) {
        grad_x[plane * l + s] = grad_y[plane] * scale;
    }
}
