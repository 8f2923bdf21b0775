// 2-D convolution, forward, for few output channels.
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
//
// This is the small-problem kernel: the launcher (gpucnn/cuda/conv.py) takes it for few output
// channels (LeNet-5's convolutions), where a 64-row GEMM tile would be mostly empty. Every other
// convolution pass, forward and both gradients, is an implicit GEMM in kernels/gemm.cu.

#define OCB 8  // output channels per thread in conv2d_forward_tiled; gpucnn/cuda/conv.py agrees

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

// The weight (and bias) gradient when its output, OC x (C*KH*KW [+1]), is small: at most SMALL_TILES
// thread tiles of 8 x 8. The implicit GEMM would run it in one mostly empty 64 x 64 tile per depth
// slice; here the block's 256 threads split each slice's positions instead.
//   Block z sums output positions [z*depth_slice, min((z+1)*depth_slice, N*OH*OW)). Thread tid
//   owns thread tile t = tid % tiles (rows (t / col_tiles)*8 + 0..7, columns (t % col_tiles)*8 + 0..7)
//   and position group g = tid / tiles of groups = SMALL_THREADS / tiles; group g sums the g-th of
//   `groups` consecutive chunks of the slice, positions in increasing order, from running (b, oy, ox)
//   counters. Column C*KH*KW, when has_bias, is a column of ones: the bias gradient.
//   The groups' tiles are then added in group order 0, 1, ... through shared memory (half the block
//   at a time) and written: to grad_weight / grad_bias with one slice, else to slice z of
//   grad_weight's place, partial (gridDim.z, OC, cols), which gemm_reduce_slices adds in slice order.
#define SMALL_TILES 64     // gpucnn/cuda/conv.py agrees
#define SMALL_THREADS 256

// totals[t*64 + i*8 + j] = the sum over groups g = 0, 1, ... (in that order) of acc[i][j] of thread
// g*tiles + t. The block's threads write their tiles to parts half a block at a time (the lower half,
// holding the lower groups, first). Called by every thread of the block (it has barriers).
__device__ __forceinline__ void add_group_tiles(const float acc[8][8], float parts[SMALL_THREADS / 2][64],
                                                float* totals, int tiles, int groups)
{
    const int tid = (int)threadIdx.x;
    for (int half = 0; half < 2; ++half) {
        const int first = half * (SMALL_THREADS / 2);
        if (tid >= first && tid < first + SMALL_THREADS / 2) {
            #pragma unroll
            for (int i = 0; i < 8; ++i) {
                #pragma unroll
                for (int j = 0; j < 8; ++j) parts[tid - first][i * 8 + j] = acc[i][j];
            }
        }
        __syncthreads();
        for (int e = tid; e < tiles * 64; e += SMALL_THREADS) {
            const int et = e / 64, ij = e - et * 64;
            float s = half == 0 ? 0.0f : totals[e];
            for (int gg = 0; gg < groups; ++gg) {
                const int owner = gg * tiles + et;
                if (owner >= first && owner < first + SMALL_THREADS / 2) s += parts[owner - first][ij];
            }
            totals[e] = s;
        }
        __syncthreads();
    }
}

// Writes totals (tiles of 8 x 8, row tile-major): to grad_weight (oc, filter) and grad_bias (column
// `filter`) with one slice, else to slice blockIdx.z of the partial sums (gridDim.z, oc, cols).
__device__ __forceinline__ void store_small_tiles(const float* totals, float* grad_weight, float* grad_bias,
                                                  int tiles, int col_tiles, int oc, int filter, int cols)
{
    const int split = gridDim.z > 1;
    for (int e = (int)threadIdx.x; e < tiles * 64; e += SMALL_THREADS) {
        const int et = e / 64, ij = e - et * 64;
        const int row = (et / col_tiles) * 8 + ij / 8, col = (et % col_tiles) * 8 + ij % 8;
        if (row >= oc || col >= cols) continue;
        if (split) grad_weight[((size_t)blockIdx.z * oc + row) * cols + col] = totals[e];
        else if (col < filter) grad_weight[row * filter + col] = totals[e];
        else grad_bias[row] = totals[e];
    }
}

extern "C" __global__ void conv2d_small_backward_weight(
    const float* grad_y, const float* x, float* grad_weight, float* grad_bias,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int depth_slice, int has_bias)
{
    __shared__ float parts[SMALL_THREADS / 2][64];
    __shared__ float totals[SMALL_TILES * 64];
    const int tid = (int)threadIdx.x;
    const int filter = c * kh * kw;
    const int cols = filter + (has_bias ? 1 : 0);
    const int col_tiles = (cols + 7) / 8;
    const int tiles = ((oc + 7) / 8) * col_tiles;
    const int groups = SMALL_THREADS / tiles;
    const int t = tid % tiles, g = tid / tiles;
    const int row0 = (t / col_tiles) * 8, col0 = (t % col_tiles) * 8;
    const int plane = oh * ow;

    // The thread's 8 columns: input-plane offset and window offsets of each tap, or the ones column.
    int x_off[8], y_off[8], x_shift[8], kind[8];   // kind: 0 none, 1 tap, 2 ones
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int col = col0 + j;
        const int ci = col / (kh * kw), r = col - ci * (kh * kw);
        const int ky = r / kw, kx = r - ky * kw;
        kind[j] = col < filter ? 1 : (col < cols ? 2 : 0);
        x_off[j] = ci * h * w;
        y_off[j] = ky * dh - ph;
        x_shift[j] = kx * dw - pw;
    }
    float acc[8][8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    }

    const int d_begin = (int)blockIdx.z * depth_slice;
    const int d_end = min(d_begin + depth_slice, n * plane);
    const int chunk = (d_end - d_begin + groups - 1) / groups;
    const int p_begin = g < groups ? d_begin + g * chunk : d_end;
    const int p_end = min(p_begin + chunk, d_end);
    int b = p_begin / plane, q = p_begin - b * plane;
    int oy = q / ow, ox = q - oy * ow;
    for (int p = p_begin; p < p_end; ++p) {
        const float* gy = grad_y + (b * oc + row0) * plane + oy * ow + ox;
        const float* xb = x + b * c * h * w;
        float a[8], v[8];
        #pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = row0 + i < oc ? gy[i * plane] : 0.0f;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int iy = oy * sh + y_off[j], ix = ox * sw + x_shift[j];
            float val = kind[j] == 2 ? 1.0f : 0.0f;
            if (kind[j] == 1 && iy >= 0 && iy < h && ix >= 0 && ix < w) val = xb[x_off[j] + iy * w + ix];
            v[j] = val;
        }
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * v[j];
        }
        if (++ox == ow) { ox = 0; if (++oy == oh) { oy = 0; ++b; } }
    }

    add_group_tiles(acc, parts, totals, tiles, groups);
    store_small_tiles(totals, grad_weight, grad_bias, tiles, col_tiles, oc, filter, cols);
}

// grad_x for few input channels (C < 32, where the implicit GEMM's 64-row tile would be mostly empty
// rows), as a gather: thread (blockIdx.x, threadIdx.x) owns one input position (b, iy, ix) and block
// z the channels 8z .. 8z+7. The group's filters are staged in shared memory as w_s[o][tap][8], so
// each grad_y value loaded feeds 8 multiply-adds from two 128-bit shared loads. Sum order: ky, kx,
// then o; a tap that no output reads is skipped. input_relu != 0: x is a ReLU's output, and grad_x
// is zeroed where x is not > 0 (that ReLU's backward). The launcher checks oc*kh*kw*8 floats fit.
extern "C" __global__ void conv2d_small_backward_data(
    const float* grad_y, const float* weight, float* grad_x,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, const float* x, int input_relu)
{
    extern __shared__ float smem[];
    const int taps = kh * kw;
    const int c0 = (int)blockIdx.z * 8;
    for (int i = (int)threadIdx.x; i < oc * taps * 8; i += (int)blockDim.x) {
        const int j = i % 8, o_tap = i / 8;
        const int o = o_tap / taps, tap = o_tap - o * taps;
        smem[i] = c0 + j < c ? weight[(o * c + c0 + j) * taps + tap] : 0.0f;
    }
    __syncthreads();
    const int p = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (p >= n * h * w) return;   // after the only barrier
    const int b = p / (h * w), q = p - b * (h * w);
    const int iy = q / w, ix = q - iy * w;
    const int unit_stride = sh == 1 && sw == 1;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int ky = 0; ky < kh; ++ky) {
        int oy = iy + ph - ky * dh;
        if (oy < 0 || (!unit_stride && oy % sh != 0)) continue;
        oy = unit_stride ? oy : oy / sh;
        if (oy >= oh) continue;
        for (int kx = 0; kx < kw; ++kx) {
            int ox = ix + pw - kx * dw;
            if (ox < 0 || (!unit_stride && ox % sw != 0)) continue;
            ox = unit_stride ? ox : ox / sw;
            if (ox >= ow) continue;
            const float* gy = grad_y + (b * oc * oh + oy) * ow + ox;
            const float* ws = smem + (ky * kw + kx) * 8;
            for (int o = 0; o < oc; ++o) {
                const float v = gy[o * oh * ow];
                const float4 lo = *reinterpret_cast<const float4*>(ws + o * taps * 8);
                const float4 hi = *reinterpret_cast<const float4*>(ws + o * taps * 8 + 4);
                acc[0] += v * lo.x; acc[1] += v * lo.y; acc[2] += v * lo.z; acc[3] += v * lo.w;
                acc[4] += v * hi.x; acc[5] += v * hi.y; acc[6] += v * hi.z; acc[7] += v * hi.w;
            }
        }
    }
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (c0 + j >= c) continue;
        const int at = ((b * c + c0 + j) * h + iy) * w + ix;
        grad_x[at] = (input_relu && !(x[at] > 0.0f)) ? 0.0f : acc[j];
    }
}
