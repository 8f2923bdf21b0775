// One register-tiled GEMM core, and the products built on it: the linear layer's matrix products and
// the three convolution passes as implicit GEMMs.
//
// Layout: every array is C-contiguous float32 (row-major matrices, NCHW tensors).
//   The core computes c (rows, cols) = op_a (rows, depth) @ op_b (depth, cols) for one block tile.
//   Convolutions (x (n, c, h, w), weight (oc, c, kh, kw), y (n, oc, oh, ow); oh, ow as in conv2d.cu):
//     forward   y  (OC rows, N*OH*OW cols) = weight (OC, C*KH*KW) @ im2col(x) (C*KH*KW, N*OH*OW)
//     data grad dx (C rows, N*H*W cols)   = weight^T (C, OC*KH*KW) @ gathered grad_y (OC*KH*KW, N*H*W):
//               element ((o, ky, kx), (b, iy, ix)) is grad_y[b, o, oy, ox] when the output (oy, ox)
//               reads input (iy, ix) through tap (ky, kx), else 0 (so any stride, padding, dilation)
//     weight grad dW (OC rows, C*KH*KW [+1] cols) = grad_y (OC, N*OH*OW) @ im2col(x)^T; the extra
//               column, present when the bias gradient is asked for, is a column of ones: it sums
//               grad_y over positions, the bias gradient, in the same pass.
//   The im2col matrices are never built: the loaders gather each element while filling a shared
//   tile, from a running (channel, ky, kx) or (image, oy, ox) counter per thread: the divisions
//   happen once per thread per depth step, never per multiply-add.
//
// The core (gemm_tile): a block of T/8 x T/8 threads owns a T x T tile of c (T = 8 * blockDim.x:
// 64 with 64 threads, or 128 with 256 threads; the launcher picks). Thread (tx, ty) keeps 8 x 8
// sums in registers: rows ty*4 + {0..3} and T/2 + ty*4 + {0..3}, columns likewise with tx. The depth
// is walked BK = T/8 at a time; each thread loads 8 consecutive depths of one row of op_a and of one
// column of op_b (global -> registers), so the next step's loads are in flight while the current
// step's shared tiles are multiplied (double buffering through registers: cp.async would need inline
// PTX or a CUDA header, which the kernels may not use and the emulator cannot run). Shared tiles are
// stored depth-major, tile[k][m], so each thread reads its 4 + 4 rows and columns as two float4 loads
// per depth: 4 128-bit shared loads per 64 FMAs.
//
// Summation order (bitwise reproducible: no atomics): each output is summed over depth in increasing
// depth order by one thread. Split-k (gridDim.z > 1): block z sums depth [z*depth_slice,
// (z+1)*depth_slice) into slice z of a partial buffer (gridDim.z, rows, cols); gemm_reduce_slices
// then adds the slices in slice order 0, 1, ..., and only then the bias and ReLU.
//
// The launchers (gpucnn/cuda/gemm.py) refuse element counts past int32, so int indexing is safe.

#define THREAD_TILE 8   // outputs per thread along rows and along columns
#define LOADS 8         // consecutive depths each thread loads per operand per depth step

// What a thread's loader reads, by kind; m is the row of op_a or the column of op_b it loads.
#define LOAD_DENSE_K 0       // element (m, k) at src[m * ld + k]
#define LOAD_DENSE_M 1       // element (m, k) at src[k * ld + m]
#define LOAD_IM2COL 2        // forward op_b: m = output position (b, oy, ox), k = (ci, ky, kx); src = x
#define LOAD_WEIGHT_T 3      // data-grad op_a: m = input channel ci, k = (o, ky, kx); src = weight
#define LOAD_GRAD_Y_TAPS 4   // data-grad op_b: m = input position (b, iy, ix), k = (o, ky, kx); src = grad_y
#define LOAD_GRAD_Y_ROWS 5   // weight-grad op_a: m = output channel o, k = output position (b, oy, ox)
#define LOAD_IM2COL_T 6      // weight-grad op_b: m = (ci, ky, kx) or the ones column, k = (b, oy, ox); src = x

struct Geometry {
    int n, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

// One thread's loader for one operand: fixed for the thread's m, walked over depth.
struct Loader {
    const float* src;
    int kind;
    int ok;      // m lies inside the operand
    int ones;    // m is the column of ones (bias sums)
    int base;    // offset of m's row, column or image in src
    int ld;      // dense kinds: the leading dimension
    int p0, p1;  // per kind: the window's top-left input (iy0, ix0), or (iy + ph, ix + pw), or (ky*dh - ph, kx*dw - pw)
};

__device__ __forceinline__ Geometry make_geometry(
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow)
{
    Geometry g;
    g.n = n; g.c = c; g.h = h; g.w = w; g.oc = oc; g.kh = kh; g.kw = kw;
    g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw; g.oh = oh; g.ow = ow;
    return g;
}

// The loader of row/column m (of m_count; ones_at: the index of a column of ones, or -1).
__device__ __forceinline__ Loader make_loader(const float* src, int kind, int m, int m_count, int ones_at, int ld,
                                              const Geometry& g)
{
    Loader L;
    L.src = src; L.kind = kind; L.ld = ld;
    L.ok = m < m_count;
    L.ones = m == ones_at;
    L.base = 0; L.p0 = 0; L.p1 = 0;
    if (!L.ok || L.ones) return L;
    if (kind == LOAD_DENSE_K) {
        L.base = m * ld;
    } else if (kind == LOAD_DENSE_M) {
        L.base = m;
    } else if (kind == LOAD_IM2COL) {                 // m = (b, oy, ox)
        const int plane = g.oh * g.ow;
        const int b = m / plane, q = m - b * plane;
        const int oy = q / g.ow, ox = q - oy * g.ow;
        L.base = b * g.c * g.h * g.w;
        L.p0 = oy * g.sh - g.ph;
        L.p1 = ox * g.sw - g.pw;
    } else if (kind == LOAD_WEIGHT_T) {               // m = ci
        L.base = m * g.kh * g.kw;
    } else if (kind == LOAD_GRAD_Y_TAPS) {            // m = (b, iy, ix)
        const int plane = g.h * g.w;
        const int b = m / plane, q = m - b * plane;
        const int iy = q / g.w, ix = q - iy * g.w;
        L.base = b * g.oc * g.oh * g.ow;
        L.p0 = iy + g.ph;
        L.p1 = ix + g.pw;
    } else if (kind == LOAD_GRAD_Y_ROWS) {            // m = o
        L.base = m * g.oh * g.ow;
    } else if (kind == LOAD_IM2COL_T) {               // m = (ci, ky, kx)
        const int taps = g.kh * g.kw;
        const int ci = m / taps, r = m - ci * taps;
        const int ky = r / g.kw, kx = r - ky * g.kw;
        L.base = ci * g.h * g.w;
        L.p0 = ky * g.dh - g.ph;
        L.p1 = kx * g.dw - g.pw;
    }
    return L;
}

// The loaders below: v[i] = element (m, k_first + i) of the operand, 0 past k_end, past the operand's
// edge or in padding. Each splits the depth index into its coordinates once; the LOADS elements then
// step a counter.

__device__ __forceinline__ void load_dense(const Loader& L, int k_first, int k_end, float v[LOADS])
{
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        const int k = k_first + i;
        float x = 0.0f;
        if (k < k_end && L.ok) {
            if (L.ones) x = 1.0f;
            else x = L.kind == LOAD_DENSE_K ? L.src[L.base + k] : L.src[k * L.ld + L.base];
        }
        v[i] = x;
    }
}

// LOAD_IM2COL and LOAD_GRAD_Y_TAPS: k = (channel, ky, kx), the channel of x or of grad_y.
__device__ __forceinline__ void load_taps(const Loader& L, const Geometry& g, int k_first, int k_end, float v[LOADS])
{
    const int taps = g.kh * g.kw;
    int ch = k_first / taps;
    int r = k_first - ch * taps;
    int ky = r / g.kw;
    int kx = r - ky * g.kw;
    const int unit_stride = g.sh == 1 && g.sw == 1;
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        float x = 0.0f;
        if (k_first + i < k_end && L.ok) {
            if (L.kind == LOAD_IM2COL) {
                const int iy = L.p0 + ky * g.dh, ix = L.p1 + kx * g.dw;
                if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) x = L.src[L.base + (ch * g.h + iy) * g.w + ix];
            } else {
                // Output (oy, ox) reads input (iy, ix) through tap (ky, kx) when oy*sh = iy + ph - ky*dh.
                int ty = L.p0 - ky * g.dh, tx = L.p1 - kx * g.dw;
                bool hit = ty >= 0 && tx >= 0;
                if (hit && !unit_stride) {
                    hit = ty % g.sh == 0 && tx % g.sw == 0;
                    ty /= g.sh;
                    tx /= g.sw;
                }
                if (hit && ty < g.oh && tx < g.ow) x = L.src[L.base + (ch * g.oh + ty) * g.ow + tx];
            }
        }
        v[i] = x;
        if (++kx == g.kw) { kx = 0; if (++ky == g.kh) { ky = 0; ++ch; } }
    }
}

// LOAD_WEIGHT_T: k = (o, tap), element (ci, k) = weight[o, ci, tap].
__device__ __forceinline__ void load_weight_t(const Loader& L, const Geometry& g, int k_first, int k_end,
                                              float v[LOADS])
{
    const int taps = g.kh * g.kw;
    const int filter = g.c * taps;
    int o = k_first / taps;
    int r = k_first - o * taps;
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        v[i] = (k_first + i < k_end && L.ok) ? L.src[o * filter + L.base + r] : 0.0f;
        if (++r == taps) { r = 0; ++o; }
    }
}

// LOAD_GRAD_Y_ROWS and LOAD_IM2COL_T: k = output position (b, oy, ox).
__device__ __forceinline__ void load_positions(const Loader& L, const Geometry& g, int k_first, int k_end,
                                               float v[LOADS])
{
    const int plane = g.oh * g.ow;
    int b = k_first / plane;
    int q = k_first - b * plane;
    int oy = q / g.ow;
    int ox = q - oy * g.ow;
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        float x = 0.0f;
        if (k_first + i < k_end && L.ok) {
            if (L.kind == LOAD_GRAD_Y_ROWS) {
                x = L.src[b * g.oc * plane + L.base + oy * g.ow + ox];
            } else if (L.ones) {
                x = 1.0f;
            } else {
                const int iy = oy * g.sh + L.p0, ix = ox * g.sw + L.p1;
                if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) x = L.src[(b * g.c * g.h + iy) * g.w + ix + L.base];
            }
        }
        v[i] = x;
        if (++ox == g.ow) { ox = 0; if (++oy == g.oh) { oy = 0; ++b; } }
    }
}

// The LOADS consecutive depths from k_first of the thread's row or column, by the loader's kind.
__device__ __forceinline__ void load_depths(const Loader& L, const Geometry& g, int k_first, int k_end, float v[LOADS])
{
    if (L.kind == LOAD_DENSE_K || L.kind == LOAD_DENSE_M) load_dense(L, k_first, k_end, v);
    else if (L.kind == LOAD_IM2COL || L.kind == LOAD_GRAD_Y_TAPS) load_taps(L, g, k_first, k_end, v);
    else if (L.kind == LOAD_WEIGHT_T) load_weight_t(L, g, k_first, k_end, v);
    else load_positions(L, g, k_first, k_end, v);
}

// acc += the block's tile product over depth [d_begin, d_end). smem holds 2 stages of
// a_tile[BK][T] then 2 stages of b_tile[BK][T]. Every thread of the block calls it with the same bounds.
__device__ __forceinline__ void gemm_tile(const Loader& a, const Loader& b, const Geometry& g,
                                          int d_begin, int d_end, float acc[THREAD_TILE][THREAD_TILE], float* smem)
{
    const int tile = (int)blockDim.x * THREAD_TILE;
    const int depth_step = tile / THREAD_TILE;
    const int half = tile / 2;
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    const int tid = ty * (int)blockDim.x + tx;
    const int m = tid % tile;                       // the row of a / column of b this thread loads
    const int k_seg = (tid / tile) * LOADS;         // its first depth within a step
    float* a_tiles = smem;
    float* b_tiles = smem + 2 * depth_step * tile;

    float va[LOADS], vb[LOADS];
    load_depths(a, g, d_begin + k_seg, d_end, va);
    load_depths(b, g, d_begin + k_seg, d_end, vb);
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        a_tiles[(k_seg + i) * tile + m] = va[i];
        b_tiles[(k_seg + i) * tile + m] = vb[i];
    }
    __syncthreads();

    int stage = 0;
    for (int d0 = d_begin; d0 < d_end; d0 += depth_step) {
        const bool more = d0 + depth_step < d_end;   // the same for every thread of the block
        if (more) {                                  // the next step's loads, in flight during the FMAs
            load_depths(a, g, d0 + depth_step + k_seg, d_end, va);
            load_depths(b, g, d0 + depth_step + k_seg, d_end, vb);
        }
        const float* at = a_tiles + stage * depth_step * tile;
        const float* bt = b_tiles + stage * depth_step * tile;
        for (int k8 = 0; k8 < depth_step; k8 += 8) {
            #pragma unroll
            for (int kk = k8; kk < k8 + 8; ++kk) {
                const float4 a_lo = *reinterpret_cast<const float4*>(at + kk * tile + ty * 4);
                const float4 a_hi = *reinterpret_cast<const float4*>(at + kk * tile + half + ty * 4);
                const float4 b_lo = *reinterpret_cast<const float4*>(bt + kk * tile + tx * 4);
                const float4 b_hi = *reinterpret_cast<const float4*>(bt + kk * tile + half + tx * 4);
                const float ar[THREAD_TILE] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
                const float br[THREAD_TILE] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
                #pragma unroll
                for (int i = 0; i < THREAD_TILE; ++i) {
                    #pragma unroll
                    for (int j = 0; j < THREAD_TILE; ++j) acc[i][j] += ar[i] * br[j];
                }
            }
        }
        if (more) {
            // The other stage was last read before the previous barrier: safe to overwrite now.
            float* an = a_tiles + (stage ^ 1) * depth_step * tile;
            float* bn = b_tiles + (stage ^ 1) * depth_step * tile;
            #pragma unroll
            for (int i = 0; i < LOADS; ++i) {
                an[(k_seg + i) * tile + m] = va[i];
                bn[(k_seg + i) * tile + m] = vb[i];
            }
        }
        __syncthreads();
        stage ^= 1;
    }
}

__device__ __forceinline__ int tile_offset(int i)  // the i-th (of 8) row or column of a thread within the tile
{
    return i < 4 ? i : (int)blockDim.x * THREAD_TILE / 2 + i - 4;
}

// Writes the thread's sums: element (row, col) of c goes to out[(col / plane) * rows * plane +
// row * plane + col % plane] (plane = out_cols: a row-major matrix; plane = OH*OW: NCHW), except column
// out_cols, the column of ones, which goes to extra[row]. bias_mode 1 adds bias[row], 2 bias[col]; then ReLU.
// A mask (laid out like out, or null) zeroes the outputs whose mask element is not > 0: a ReLU's
// backward fused into the gradient of its output (mask = that output, NaN counting as not > 0).
__device__ __forceinline__ void store_tile(const float acc[THREAD_TILE][THREAD_TILE], int row0, int col0,
                                           int rows, int cols, float* out, int plane, int out_cols, float* extra,
                                           const float* bias, int bias_mode, int relu, const float* mask)
{
    const int r_first = row0 + (int)threadIdx.y * 4;
    const int c_first = col0 + (int)threadIdx.x * 4;
    #pragma unroll
    for (int j = 0; j < THREAD_TILE; ++j) {
        const int col = c_first + tile_offset(j);
        if (col >= cols) continue;
        const int image = col / plane;
        const int within = col - image * plane;
        #pragma unroll
        for (int i = 0; i < THREAD_TILE; ++i) {
            const int row = r_first + tile_offset(i);
            if (row >= rows) continue;
            float v = acc[i][j];
            if (col == out_cols) {
                extra[row] = v;
                continue;
            }
            if (bias_mode == 1) v += bias[row];
            else if (bias_mode == 2) v += bias[col];
            if (relu && v < 0.0f) v = 0.0f;
            const int at = (image * rows + row) * plane + within;
            if (mask != 0 && !(mask[at] > 0.0f)) v = 0.0f;
            out[at] = v;
        }
    }
}

extern __shared__ __align__(16) float gemm_smem[];

__device__ __forceinline__ void zero_tile(float acc[THREAD_TILE][THREAD_TILE])
{
    #pragma unroll
    for (int i = 0; i < THREAD_TILE; ++i) {
        #pragma unroll
        for (int j = 0; j < THREAD_TILE; ++j) acc[i][j] = 0.0f;
    }
}

// c = op(a) @ op(b) [+ bias (cols)] [then ReLU], or slice z of split-k partial sums. op(a) is a stored
// (rows, depth), or a^T with a stored (depth, rows) when trans_a; op(b) is b stored (depth, cols), or b^T
// with b stored (cols, depth) when trans_b (gpucnn/cuda/linear.py: the linear layer's three products). ones_column != 0 appends a column of ones to op(b): its
// product (the row sums of op(a)) goes to extra (rows), or to column `cols` of the partial slice.
extern "C" __global__ void gemm_matmul(
    const float* a, const float* b, const float* bias, float* c, float* extra,
    int rows, int cols, int depth, int trans_a, int trans_b, int depth_slice, int has_bias, int relu,
    int ones_column, const float* mask, int has_mask)
{
    const Geometry g = make_geometry(0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0);
    const int tile = (int)blockDim.x * THREAD_TILE;
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int row0 = (int)blockIdx.y * tile, col0 = (int)blockIdx.x * tile;
    const int b_cols = cols + (ones_column ? 1 : 0);
    const Loader la = make_loader(a, trans_a ? LOAD_DENSE_M : LOAD_DENSE_K, row0 + tid % tile, rows, -1,
                                  trans_a ? rows : depth, g);
    const Loader lb = make_loader(b, trans_b ? LOAD_DENSE_K : LOAD_DENSE_M, col0 + tid % tile, b_cols,
                                  ones_column ? cols : -1, trans_b ? depth : cols, g);
    const int d_begin = (int)blockIdx.z * depth_slice;
    const int d_end = min(d_begin + depth_slice, depth);
    float acc[THREAD_TILE][THREAD_TILE];
    zero_tile(acc);
    gemm_tile(la, lb, g, d_begin, d_end, acc, gemm_smem);
    if (gridDim.z > 1) {
        store_tile(acc, row0, col0, rows, b_cols, c + (size_t)blockIdx.z * rows * b_cols, b_cols, b_cols, extra,
                   bias, 0, 0, 0);
    } else {
        store_tile(acc, row0, col0, rows, b_cols, c, cols, cols, extra, bias, has_bias ? 2 : 0, relu,
                   has_mask ? mask : 0);
    }
}

// y = conv2d(x, weight) + bias [then ReLU] as an implicit GEMM: rows OC, columns N*OH*OW, depth C*KH*KW.
extern "C" __global__ void conv2d_gemm_forward(
    const float* x, const float* weight, const float* bias, float* y,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int has_bias, int relu)
{
    const Geometry g = make_geometry(n, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow);
    const int tile = (int)blockDim.x * THREAD_TILE;
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int row0 = (int)blockIdx.y * tile, col0 = (int)blockIdx.x * tile;
    const int depth = c * kh * kw, cols = n * oh * ow;
    const Loader la = make_loader(weight, LOAD_DENSE_K, row0 + tid % tile, oc, -1, depth, g);
    const Loader lb = make_loader(x, LOAD_IM2COL, col0 + tid % tile, cols, -1, 0, g);
    float acc[THREAD_TILE][THREAD_TILE];
    zero_tile(acc);
    gemm_tile(la, lb, g, 0, depth, acc, gemm_smem);
    store_tile(acc, row0, col0, oc, cols, y, oh * ow, cols, y, bias, has_bias ? 1 : 0, relu, 0);
}

// grad_x as an implicit GEMM: rows C, columns N*H*W, depth OC*KH*KW (taps no output reads add 0).
// input_relu != 0: x is a ReLU's output, and grad_x is zeroed where x is not > 0 (that ReLU's backward).
extern "C" __global__ void conv2d_gemm_backward_data(
    const float* grad_y, const float* weight, float* grad_x,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, const float* x, int input_relu)
{
    const Geometry g = make_geometry(n, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow);
    const int tile = (int)blockDim.x * THREAD_TILE;
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int row0 = (int)blockIdx.y * tile, col0 = (int)blockIdx.x * tile;
    const int depth = oc * kh * kw, cols = n * h * w;
    const Loader la = make_loader(weight, LOAD_WEIGHT_T, row0 + tid % tile, c, -1, 0, g);
    const Loader lb = make_loader(grad_y, LOAD_GRAD_Y_TAPS, col0 + tid % tile, cols, -1, 0, g);
    float acc[THREAD_TILE][THREAD_TILE];
    zero_tile(acc);
    gemm_tile(la, lb, g, 0, depth, acc, gemm_smem);
    store_tile(acc, row0, col0, c, cols, grad_x, h * w, cols, grad_x, grad_x, 0, 0, input_relu ? x : 0);
}

// grad_weight (OC, C*KH*KW) and, with has_bias, grad_bias (OC) as one implicit GEMM: rows OC, columns
// C*KH*KW plus the column of ones, depth N*OH*OW. One depth slice (gridDim.z == 1): written to
// grad_weight and grad_bias; several: slice z of partial (gridDim.z, OC, cols) in grad_weight's place.
extern "C" __global__ void conv2d_gemm_backward_weight(
    const float* grad_y, const float* x, float* grad_weight, float* grad_bias,
    int n, int c, int h, int w, int oc, int kh, int kw,
    int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow, int depth_slice, int has_bias)
{
    const Geometry g = make_geometry(n, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow);
    const int tile = (int)blockDim.x * THREAD_TILE;
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    const int row0 = (int)blockIdx.y * tile, col0 = (int)blockIdx.x * tile;
    const int filter = c * kh * kw;
    const int cols = filter + (has_bias ? 1 : 0);
    const int depth = n * oh * ow;
    const Loader la = make_loader(grad_y, LOAD_GRAD_Y_ROWS, row0 + tid % tile, oc, -1, 0, g);
    const Loader lb = make_loader(x, LOAD_IM2COL_T, col0 + tid % tile, cols, has_bias ? filter : -1, 0, g);
    const int d_begin = (int)blockIdx.z * depth_slice;
    const int d_end = min(d_begin + depth_slice, depth);
    float acc[THREAD_TILE][THREAD_TILE];
    zero_tile(acc);
    gemm_tile(la, lb, g, d_begin, d_end, acc, gemm_smem);
    if (gridDim.z > 1) {
        store_tile(acc, row0, col0, oc, cols, grad_weight + (size_t)blockIdx.z * oc * cols, cols, cols, grad_bias,
                   grad_bias, 0, 0, 0);
    } else {
        store_tile(acc, row0, col0, oc, cols, grad_weight, filter, filter, grad_bias, grad_bias, 0, 0, 0);
    }
}

// out (rows, out_cols) [and extra (rows) from column out_cols] = the slices of partial (slices, rows,
// cols) summed in slice order, then bias (out_cols) and ReLU on out. One thread per element of partial's slice.
extern "C" __global__ void gemm_reduce_slices(
    const float* partial, const float* bias, float* out, float* extra,
    int rows, int cols, int out_cols, int slices, int has_bias, int relu)
{
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= rows * cols) return;
    const int row = i / cols, col = i - row * cols;
    float acc = 0.0f;
    for (int s = 0; s < slices; ++s) acc += partial[(size_t)s * rows * cols + i];
    if (col == out_cols) {
        extra[row] = acc;
        return;
    }
    if (has_bias) acc += bias[col];
    if (relu && acc < 0.0f) acc = 0.0f;
    out[row * out_cols + col] = acc;
}
