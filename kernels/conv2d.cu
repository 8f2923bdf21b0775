// 2-D convolution, forward and backward.
//
// Layout: every array is C-contiguous float32 in NCHW order.
//   x (n, c, h, w)   weight (oc, c, kh, kw)   bias (oc)   y (n, oc, oh, ow)
//   oh = (h + 2*ph - dh*(kh-1) - 1) / sh + 1, and likewise ow.
// Zero padding (ph, pw), stride (sh, sw) and dilation (dh, dw) apply to every kernel.
// The Python launchers (gpucnn/cuda/conv.py) refuse shapes whose element counts overflow int32,
// so int indexing is safe here.
//
// Kernels and what they write:
//   conv2d_forward_tiled    y. A block owns a tile of blockDim.y x blockDim.x output positions of
//                           one image and a group of OCB output channels (blockIdx.z walks over
//                           image x channel group). Thread (ty, tx) computes the OCB outputs at one
//                           position. For each input channel the block loads the input tile with
//                           its halo and the group's filters into dynamic shared memory; each
//                           input value read from shared memory is reused from a register across
//                           all OCB channels. Bias is fused, ReLU too when relu != 0.
//   conv2d_forward_direct   y. One thread per output element, no shared memory; the fallback when
//                           the tile and filters would not fit in shared memory.
//   conv2d_backward_data    grad_x, as a gather: one thread per input element sums, in a fixed
//                           order, over the output positions whose windows read it.
//   conv2d_backward_weight_partial / conv2d_backward_bias_partial
//                           partial (slices, count): the N*OH*OW output positions are cut into
//                           slices of slice_len; block row blockIdx.y sums one slice, one thread
//                           per weight (or bias) element.
//   conv2d_reduce_partials  out (count): sums the slices of partial in slice order. The two passes
//                           replace float atomics, so the gradients are bitwise reproducible.

#define OCB 8  // output channels per thread in conv2d_forward_tiled; gpucnn/cuda/conv.py agrees

// The coordinates (image b, channel ch, row y, column x) of element idx of a C-contiguous
// (n, channels, height, width) array.
__device__ __forceinline__ void unravel_nchw(int idx, int channels, int height, int width,
                                             int* b, int* ch, int* y, int* x)
{
    *x = idx % width;
    *y = (idx / width) % height;
    *ch = (idx / (width * height)) % channels;
    *b = idx / (width * height * channels);
}

extern "C" __global__ void conv2d_forward_tiled(
    const float* x, const float* weight, const float* bias, float* y,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int relu)
{
    // Layout: x_tile (tile_h, tile_w) then w_tile (OCB, kh, kw); the launcher sizes it.
    extern __shared__ float smem[];
    const int tile_h = ((int)blockDim.y - 1) * sh + (kh - 1) * dh + 1;
    const int tile_w = ((int)blockDim.x - 1) * sw + (kw - 1) * dw + 1;
    const int tile_size = tile_h * tile_w;
    const int filter_size = kh * kw;
    float* x_tile = smem;
    float* w_tile = smem + tile_size;

    const int ox = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int oy = (int)(blockIdx.y * blockDim.y + threadIdx.y);
    // Threads past the output edge still load and reach every barrier; they only skip the math.
    const bool active = ox < ow && oy < oh;
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int nthreads = (int)(blockDim.x * blockDim.y);
    const int iy0 = (int)(blockIdx.y * blockDim.y) * sh - ph;
    const int ix0 = (int)(blockIdx.x * blockDim.x) * sw - pw;
    const int groups = (oc + OCB - 1) / OCB;

    // The loop bound depends only on blockIdx, so every thread of a block runs the same trips.
    // z is 64-bit so that z + gridDim.z cannot wrap when n * groups is within a grid of 2**31.
    for (long long z = blockIdx.z; z < (long long)n * groups; z += gridDim.z) {
        const int b = (int)(z / groups);
        const int oc0 = (int)(z % groups) * OCB;
        float acc[OCB];
        #pragma unroll
        for (int j = 0; j < OCB; ++j) acc[j] = 0.0f;

        for (int ci = 0; ci < c; ++ci) {
            const float* x_plane = x + (b * c + ci) * h * w;
            for (int i = tid; i < tile_size; i += nthreads) {
                const int iy = iy0 + i / tile_w;
                const int ix = ix0 + i % tile_w;
                x_tile[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x_plane[iy * w + ix] : 0.0f;
            }
            for (int i = tid; i < OCB * filter_size; i += nthreads) {
                const int j = i / filter_size;
                w_tile[i] = (oc0 + j < oc) ? weight[((oc0 + j) * c + ci) * filter_size + i % filter_size] : 0.0f;
            }
            __syncthreads();
            if (active) {
                for (int ky = 0; ky < kh; ++ky) {
                    const float* x_row = x_tile + ((int)threadIdx.y * sh + ky * dh) * tile_w + (int)threadIdx.x * sw;
                    for (int kx = 0; kx < kw; ++kx) {
                        const float v = x_row[kx * dw];
                        #pragma unroll
                        for (int j = 0; j < OCB; ++j) acc[j] += v * w_tile[j * filter_size + ky * kw + kx];
                    }
                }
            }
            // The next channel overwrites the tiles: wait until every thread has read them.
            __syncthreads();
        }

        if (active) {
            #pragma unroll
            for (int j = 0; j < OCB; ++j) {
                if (oc0 + j < oc) {
                    float r = acc[j] + bias[oc0 + j];
                    if (relu && r < 0.0f) r = 0.0f;
                    y[((b * oc + oc0 + j) * oh + oy) * ow + ox] = r;
                }
            }
        }
    }
}

extern "C" __global__ void conv2d_forward_direct(
    const float* x, const float* weight, const float* bias, float* y,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int relu)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * oc * oh * ow) return;
    int b, o, oy, ox;
    unravel_nchw(idx, oc, oh, ow, &b, &o, &oy, &ox);

    float acc = 0.0f;
    for (int ci = 0; ci < c; ++ci) {
        const float* x_plane = x + (b * c + ci) * h * w;
        const float* w_plane = weight + (o * c + ci) * kh * kw;
        for (int ky = 0; ky < kh; ++ky) {
            const int iy = oy * sh - ph + ky * dh;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < kw; ++kx) {
                const int ix = ox * sw - pw + kx * dw;
                if (ix < 0 || ix >= w) continue;
                acc += x_plane[iy * w + ix] * w_plane[ky * kw + kx];
            }
        }
    }
    float r = acc + bias[o];
    if (relu && r < 0.0f) r = 0.0f;
    y[idx] = r;
}

extern "C" __global__ void conv2d_backward_data(
    const float* grad_y, const float* weight, float* grad_x,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * c * h * w) return;
    int b, ci, iy, ix;
    unravel_nchw(idx, c, h, w, &b, &ci, &iy, &ix);

    // Input row iy is read by output row oy through kernel row ky when oy*sh - ph + ky*dh == iy.
    float acc = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
        const int ty = iy + ph - ky * dh;
        if (ty < 0 || ty % sh != 0 || ty / sh >= oh) continue;
        const int oy = ty / sh;
        for (int kx = 0; kx < kw; ++kx) {
            const int tx = ix + pw - kx * dw;
            if (tx < 0 || tx % sw != 0 || tx / sw >= ow) continue;
            const int ox = tx / sw;
            for (int o = 0; o < oc; ++o) {
                acc += grad_y[((b * oc + o) * oh + oy) * ow + ox]
                     * weight[((o * c + ci) * kh + ky) * kw + kx];
            }
        }
    }
    grad_x[idx] = acc;
}

extern "C" __global__ void conv2d_backward_weight_partial(
    const float* grad_y, const float* x, float* partial,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int slice_len)
{
    const int count = oc * c * kh * kw;
    const int widx = blockIdx.x * blockDim.x + threadIdx.x;
    if (widx >= count) return;
    const int kx = widx % kw;
    const int ky = (widx / kw) % kh;
    const int ci = (widx / (kw * kh)) % c;
    const int o = widx / (kw * kh * c);

    const int positions = n * oh * ow;
    const int p_begin = blockIdx.y * slice_len;
    const int p_end = min(p_begin + slice_len, positions);
    float acc = 0.0f;
    for (int p = p_begin; p < p_end; ++p) {
        const int ox = p % ow;
        const int oy = (p / ow) % oh;
        const int b = p / (ow * oh);
        const int iy = oy * sh - ph + ky * dh;
        const int ix = ox * sw - pw + kx * dw;
        if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
        acc += grad_y[((b * oc + o) * oh + oy) * ow + ox] * x[((b * c + ci) * h + iy) * w + ix];
    }
    partial[blockIdx.y * count + widx] = acc;
}

extern "C" __global__ void conv2d_backward_bias_partial(
    const float* grad_y, float* partial, int n, int oc, int oh, int ow, int slice_len)
{
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= oc) return;
    const int plane = oh * ow;
    const int p_begin = blockIdx.y * slice_len;
    const int p_end = min(p_begin + slice_len, n * plane);
    float acc = 0.0f;
    for (int p = p_begin; p < p_end; ++p) {
        acc += grad_y[((p / plane) * oc + o) * plane + p % plane];
    }
    partial[blockIdx.y * oc + o] = acc;
}

extern "C" __global__ void conv2d_reduce_partials(
    const float* partial, float* out, int count, int slices)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float acc = 0.0f;
    for (int s = 0; s < slices; ++s) acc += partial[s * count + i];
    out[i] = acc;
}
