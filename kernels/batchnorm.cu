// Batch normalisation: training forward (batch statistics, running statistics moved in place),
// evaluation forward, and the backward of the training forward; ReLU fused on request.
//
// Layout: x, y, grad_y, grad_x C-contiguous float32, seen as (n, c, l): l = H*W for (N, C, H, W), L for
// (N, C, L), 1 for (N, C). Plane p = img * c + ch holds the l values x[p * l .. p * l + l). Per-channel
// arrays are (c). m = n * l values per channel. The same formulas as gpucnn/ops/norm.py:
//   mean = sum(x) / m, var = sum((x - mean)^2) / m (biased), invstd = 1 / sqrt(var + eps)
//   y = (x - mean) * (invstd * weight) + bias, then max(y, 0) when relu (a NaN stays NaN)
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)
//   backward, g = grad_y (0 where the fused ReLU's output y <= 0), xhat = (x - mean) * invstd:
//   grad_bias = sum(g), grad_weight = sum(g * xhat),
//   grad_x = (m * g - grad_bias - xhat * grad_weight) * (weight * invstd / m)
//
// Block shape (every kernel but the two finalize ones): BN_THREADS threads as (tx, ty), tx the smallest
// power of two >= l (at most BN_THREADS): threadIdx.x walks the l values of a plane, so a warp reads
// consecutive addresses, and threadIdx.y picks one of ty planes (or images) at a time. The launcher
// (gpucnn/cuda/norm.py) picks it and keeps n*c and l within int32; indexes, offsets and loop counters
// are 64-bit (plane * l may pass 2**31, and a counter plus its grid stride may too).
//
// Kernels and what they write:
//   batch_norm_stats_partial    partial (c, slices, 2): grid (c, slices). Block (ch, slice) sums, over
//                               images slice*ty + threadIdx.y, + slices*ty, ..., d = x - shift and d*d,
//                               shift = the channel's first value (so the variance keeps its digits when
//                               |mean| >> std); then a fixed tree over the block.
//   batch_norm_stats_finalize   mean, invstd (c), running_mean and running_var in place: one thread per
//                               channel adds its slices in order, in double precision.
//   batch_norm_forward_train    y from mean and invstd (grid: x covers a plane's values, y loops over planes).
//   batch_norm_forward_eval     y from running_mean and running_var (same grid).
//   batch_norm_backward_partial partial (c, slices, 2): sums of g and g * (x - mean), as the stats.
//   batch_norm_backward_finalize grad_bias, grad_weight (c): one thread per channel, slices in order.
//   batch_norm_backward_data    grad_x (same grid as the forward).
// No atomics; every sum runs in an order fixed by the shapes, so results are bitwise reproducible.

#define BN_THREADS 256   // threads per block of every kernel; gpucnn/cuda/norm.py agrees
#define BN_WARPS (BN_THREADS / 32)
#define FULL_WARP 0xffffffffu

// Sums *a and *b over the block's BN_THREADS threads in a fixed order (butterfly within each warp, then
// the warps' sums in warp order); the totals reach thread 0. Every thread of the block must call it.
__device__ __forceinline__ void block_sum2(float* a, float* b, float* warp_a, float* warp_b)
{
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int lane = tid & 31;
    const int warp = tid >> 5;
    float va = *a, vb = *b;
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        va += __shfl_xor_sync(FULL_WARP, va, offset);
        vb += __shfl_xor_sync(FULL_WARP, vb, offset);
    }
    if (lane == 0) {
        warp_a[warp] = va;
        warp_b[warp] = vb;
    }
    __syncthreads();
    if (tid == 0) {
        va = 0.0f;
        vb = 0.0f;
        for (int w = 0; w < BN_WARPS; ++w) {
            va += warp_a[w];
            vb += warp_b[w];
        }
    }
    *a = va;
    *b = vb;
}

// g, masked by a fused ReLU's output: 0 where y <= 0 (relu_backward's rule), else g itself.
__device__ __forceinline__ float relu_masked(float g, const float* y, long long i, int relu)
{
    return (relu && !(y[i] > 0.0f)) ? 0.0f : g;
}

extern "C" __global__ void batch_norm_stats_partial(const float* x, float* partial, int n, int c, int l, int slices)
{
    __shared__ float warp_a[BN_WARPS];
    __shared__ float warp_b[BN_WARPS];
    const int ch = (int)blockIdx.x;
    const int slice = (int)blockIdx.y;
    const float shift = x[(long long)ch * l];
    float sum = 0.0f, squares = 0.0f;
    for (long long img = (long long)slice * blockDim.y + threadIdx.y; img < n;
         img += (long long)slices * blockDim.y) {
        const float* row = x + (img * c + ch) * l;
        for (int s = (int)threadIdx.x; s < l; s += (int)blockDim.x) {
            const float d = row[s] - shift;
            sum += d;
            squares += d * d;
        }
    }
    block_sum2(&sum, &squares, warp_a, warp_b);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        float* out = partial + ((long long)ch * slices + slice) * 2;
        out[0] = sum;
        out[1] = squares;
    }
}

extern "C" __global__ void batch_norm_stats_finalize(
    const float* x, const float* partial, float* mean, float* invstd, float* running_mean, float* running_var,
    int n, int c, int l, int slices, float momentum, float eps)
{
    const int ch = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (ch >= c) return;
    const float* part = partial + (long long)ch * slices * 2;
    double sum = 0.0, squares = 0.0;
    for (int s = 0; s < slices; ++s) {
        sum += (double)part[2 * s];
        squares += (double)part[2 * s + 1];
    }
    const double m = (double)n * (double)l;
    const double shifted_mean = sum / m;
    double var = squares / m - shifted_mean * shifted_mean;
    var = var > 0.0 ? var : 0.0;
    const float batch_mean = (float)((double)x[(long long)ch * l] + shifted_mean);
    mean[ch] = batch_mean;
    invstd[ch] = (float)(1.0 / sqrt(var + (double)eps));
    const float keep = 1.0f - momentum;
    running_mean[ch] = keep * running_mean[ch] + momentum * batch_mean;
    running_var[ch] = keep * running_var[ch] + momentum * (float)(var * (m / (m - 1.0)));
}

// y at value s of every plane this thread visits: (x - mean) * scale + bias of the plane's channel, then
// the ReLU. scale = invstd * weight, with invstd from invstd[], or (invstd null) 1 / sqrt(var + eps).
// The grid's x covers a plane (no loop over values); its y loops over planes, and the channel follows
// the plane by adding the stride's remainder instead of dividing again.
__device__ __forceinline__ void normalize_planes(
    const float* x, const float* mean, const float* invstd, const float* var, const float* weight,
    const float* bias, float* y, int n, int c, int l, float eps, int relu)
{
    const long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (s >= l) return;
    const long long planes = (long long)n * c;
    const long long stride = (long long)gridDim.y * blockDim.y;
    const int channel_step = (int)(stride % c);
    long long plane = blockIdx.y * (long long)blockDim.y + threadIdx.y;
    int ch = (int)(plane % c);
    for (; plane < planes; plane += stride) {
        const float inv = invstd != 0 ? invstd[ch] : 1.0f / sqrtf(var[ch] + eps);
        const long long i = plane * l + s;
        const float v = (x[i] - mean[ch]) * (inv * weight[ch]) + bias[ch];
        y[i] = (relu && !(v > 0.0f) && !isnan(v)) ? 0.0f : v;
        ch += channel_step;
        if (ch >= c) ch -= c;
    }
}

extern "C" __global__ void batch_norm_forward_train(
    const float* x, const float* mean, const float* invstd, const float* weight, const float* bias, float* y,
    int n, int c, int l, int relu)
{
    normalize_planes(x, mean, invstd, 0, weight, bias, y, n, c, l, 0.0f, relu);
}

extern "C" __global__ void batch_norm_forward_eval(
    const float* x, const float* running_mean, const float* running_var, const float* weight, const float* bias,
    float* y, int n, int c, int l, float eps, int relu)
{
    normalize_planes(x, running_mean, 0, running_var, weight, bias, y, n, c, l, eps, relu);
}

extern "C" __global__ void batch_norm_backward_partial(
    const float* grad_y, const float* x, const float* y, const float* mean, float* partial,
    int n, int c, int l, int slices, int relu)
{
    __shared__ float warp_a[BN_WARPS];
    __shared__ float warp_b[BN_WARPS];
    const int ch = (int)blockIdx.x;
    const int slice = (int)blockIdx.y;
    const float center = mean[ch];
    float sum = 0.0f, dot = 0.0f;
    for (long long img = (long long)slice * blockDim.y + threadIdx.y; img < n;
         img += (long long)slices * blockDim.y) {
        const long long base = (img * c + ch) * l;
        for (int s = (int)threadIdx.x; s < l; s += (int)blockDim.x) {
            const float g = relu_masked(grad_y[base + s], y, base + s, relu);
            sum += g;
            dot += g * (x[base + s] - center);
        }
    }
    block_sum2(&sum, &dot, warp_a, warp_b);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        float* out = partial + ((long long)ch * slices + slice) * 2;
        out[0] = sum;
        out[1] = dot;
    }
}

extern "C" __global__ void batch_norm_backward_finalize(
    const float* partial, const float* invstd, float* grad_weight, float* grad_bias, int c, int slices)
{
    const int ch = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (ch >= c) return;
    const float* part = partial + (long long)ch * slices * 2;
    double sum = 0.0, dot = 0.0;
    for (int s = 0; s < slices; ++s) {
        sum += (double)part[2 * s];
        dot += (double)part[2 * s + 1];
    }
    grad_bias[ch] = (float)sum;
    grad_weight[ch] = (float)(dot * (double)invstd[ch]);
}

extern "C" __global__ void batch_norm_backward_data(
    const float* grad_y, const float* x, const float* y, const float* mean, const float* invstd,
    const float* weight, const float* grad_weight, const float* grad_bias, float* grad_x,
    int n, int c, int l, int relu)
{
    const long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (s >= l) return;
    const float m = (float)n * (float)l;
    const long long planes = (long long)n * c;
    const long long stride = (long long)gridDim.y * blockDim.y;
    const int channel_step = (int)(stride % c);
    long long plane = blockIdx.y * (long long)blockDim.y + threadIdx.y;
    int ch = (int)(plane % c);
    for (; plane < planes; plane += stride) {
        const long long i = plane * l + s;
        const float g = relu_masked(grad_y[i], y, i, relu);
        const float inv = invstd[ch];
        const float xhat = (x[i] - mean[ch]) * inv;
        grad_x[i] = (m * g - grad_bias[ch] - xhat * grad_weight[ch]) * (weight[ch] * inv * (1.0f / m));
        ch += channel_step;
        if (ch >= c) ch -= c;
    }
}
