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

extern "C" __global__ void max_pool2d_forward(
    const float* x, float* y, int* argmax,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * oh * ow) return;
    const int ox = idx % ow;
    const int oy = (idx / ow) % oh;
    const int plane = idx / (ow * oh);
    const float* x_plane = x + plane * h * w;
    const int iy0 = oy * sh - ph;
    const int ix0 = ox * sw - pw;

    float best = 0.0f;
    int best_k = -1;
    for (int ky = 0; ky < kh; ++ky) {
        const int iy = iy0 + ky;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < kw; ++kx) {
            const int ix = ix0 + kx;
            if (ix < 0 || ix >= w) continue;
            const float v = x_plane[iy * w + ix];
            if (best_k < 0 || (!isnan(best) && (v > best || isnan(v)))) {
                best = v;
                best_k = ky * kw + kx;
            }
        }
    }
    y[idx] = best;
    argmax[idx] = best_k;
}

extern "C" __global__ void max_pool2d_backward(
    const float* grad_y, const int* argmax, float* grad_x,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * h * w) return;
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
            if (argmax[o] == ky * kw + kx) acc += grad_y[o];
        }
    }
    grad_x[idx] = acc;
}

extern "C" __global__ void avg_pool2d_forward(
    const float* x, float* y,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * oh * ow) return;
    const int ox = idx % ow;
    const int oy = (idx / ow) % oh;
    const int plane = idx / (ow * oh);
    const float* x_plane = x + plane * h * w;
    const int iy0 = oy * sh - ph;
    const int ix0 = ox * sw - pw;

    float acc = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
        const int iy = iy0 + ky;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < kw; ++kx) {
            const int ix = ix0 + kx;
            if (ix < 0 || ix >= w) continue;
            acc += x_plane[iy * w + ix];
        }
    }
    y[idx] = acc / (float)(kh * kw);
}

extern "C" __global__ void avg_pool2d_backward(
    const float* grad_y, float* grad_x,
    int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * h * w) return;
    const int ix = idx % w;
    const int iy = (idx / w) % h;
    const int plane = idx / (w * h);

    int oy_begin, oy_end, ox_begin, ox_end;
    windows_containing(iy, kh, sh, ph, oh, &oy_begin, &oy_end);
    windows_containing(ix, kw, sw, pw, ow, &ox_begin, &ox_end);
    float acc = 0.0f;
    for (int oy = oy_begin; oy < oy_end; ++oy) {
        for (int ox = ox_begin; ox < ox_end; ++ox) {
            acc += grad_y[(plane * oh + oy) * ow + ox];
        }
    }
    grad_x[idx] = acc / (float)(kh * kw);
}
