// 2-D max and average pooling, forward and backward.
//
// Layout: every array is C-contiguous in NCHW order; values float32, argmax int32.
//   x (n, c, h, w)   y, argmax (n, c, oh, ow)   oh = (h + 2*ph - kh) / sh + 1, and likewise ow.
// The launchers (gpucnn/cuda/pool.py) require ph <= kh/2 and pw <= kw/2, so every window holds at
// least one input element and never reaches past the padded input; they also refuse shapes whose
// element counts overflow int32.
//
// Kernels and what they write (one thread per element of the array written, 1-D grid):
//   max_pool2d_forward   y and argmax. argmax is the window-local index ky*kw + kx of the first
//                        maximum; a NaN wins and, once found, is kept. Padding never wins, as -inf
//                        would not (a window whose input values are all -inf picks its first one).
//                        relu != 0 applies a ReLU after the maximum (max(0, .), NaN kept).
//   max_pool2d_backward  grad_x, as a gather: each input element loops over the output windows that
//                        contain it and adds grad_y where argmax points at it. Correct for
//                        overlapping windows and padding; no atomics.
//   avg_pool2d_forward   y: window sum over input elements / (kh*kw); zero padding counts in the
//                        divisor, like PyTorch's count_include_pad=True.
//   avg_pool2d_backward  grad_x, as a gather: the sum of grad_y / (kh*kw) over the windows that
//                        contain the element.

// Output windows along one axis that contain input index i: [*begin, *end). Window o covers
// input indexes o*s - p .. o*s - p + k - 1.
__device__ __forceinline__ void windows_containing(int i, int k, int s, int p, int o, int* begin, int* end)
{
    const int t = i + p - k + 1;
    *begin = t <= 0 ? 0 : (t + s - 1) / s;
    *end = min((i + p) / s + 1, o);
}

// Over the window of output element idx of (n, c, oh, ow): the first maximum of x, its window-local
// index ky*kw + kx going to *best_k (max pooling), or with best_k null the sum of x (average pooling).
// Both walk the window in the same order (ky, then kx), skipping padding.
__device__ __forceinline__ float reduce_window(
    const float* x, int idx, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow,
    int* best_k)
{
    const int ox = idx % ow;
    const int oy = (idx / ow) % oh;
    const int plane = idx / (ow * oh);
    const float* x_plane = x + plane * h * w;
    const int iy0 = oy * sh - ph;
    const int ix0 = ox * sw - pw;

    float acc = 0.0f;  // the maximum so far, or the sum
    int found = -1;
    for (int ky = 0; ky < kh; ++ky) {
        const int iy = iy0 + ky;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < kw; ++kx) {
            const int ix = ix0 + kx;
            if (ix < 0 || ix >= w) continue;
            const float v = x_plane[iy * w + ix];
            if (best_k == 0) {
                acc += v;
            } else if (found < 0 || (!isnan(acc) && (v > acc || isnan(v)))) {
                acc = v;
                found = ky * kw + kx;
            }
        }
    }
    if (best_k != 0) *best_k = found;
    return acc;
}

// Over the output windows that contain input element idx of (n, c, h, w): the sum of grad_y, of every
// such window (average pooling, argmax null) or only of those whose argmax points at this element.
__device__ __forceinline__ float gather_windows(
    const float* grad_y, const int* argmax, int idx, int h, int w, int kh, int kw, int sh, int sw,
    int ph, int pw, int oh, int ow)
{
    const int ix = idx % w;
    const int iy = (idx / w) % h;
    const int plane = idx / (w * h);

    int oy_begin, oy_end, ox_begin, ox_end;
    windows_containing(iy, kh, sh, ph, oh, &oy_begin, &oy_end);
    windows_containing(ix, kw, sw, pw, ow, &ox_begin, &ox_end);
    float acc = 0.0f;
    for (int oy = oy_begin; oy < oy_end; ++oy) {
        const int ky = iy + ph - oy * sh;
        for (int ox = ox_begin; ox < ox_end; ++ox) {
            const int kx = ix + pw - ox * sw;
            const int o = (plane * oh + oy) * ow + ox;
            if (argmax == 0 || argmax[o] == ky * kw + kx) acc += grad_y[o];
        }
    }
    return acc;
}

extern "C" __global__ void max_pool2d_forward(
    const float* x, float* y, int* argmax,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow, int relu)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * oh * ow) return;
    int best_k;
    const float v = reduce_window(x, idx, h, w, kh, kw, sh, sw, ph, pw, oh, ow, &best_k);
    // A fused ReLU keeps NaN, like relu_forward (elementwise.cu).
    y[idx] = (relu && !(v > 0.0f || isnan(v))) ? 0.0f : v;
    argmax[idx] = best_k;
}

extern "C" __global__ void max_pool2d_backward(
    const float* grad_y, const int* argmax, float* grad_x,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * h * w) return;
    grad_x[idx] = gather_windows(grad_y, argmax, idx, h, w, kh, kw, sh, sw, ph, pw, oh, ow);
}

extern "C" __global__ void avg_pool2d_forward(
    const float* x, float* y,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * oh * ow) return;
    y[idx] = reduce_window(x, idx, h, w, kh, kw, sh, sw, ph, pw, oh, ow, 0) / (float)(kh * kw);
}

extern "C" __global__ void avg_pool2d_backward(
    const float* grad_y, float* grad_x,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * h * w) return;
    grad_x[idx] = gather_windows(grad_y, 0, idx, h, w, kh, kw, sh, sw, ph, pw, oh, ow) / (float)(kh * kw);
}
