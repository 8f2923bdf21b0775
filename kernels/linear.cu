// Fully connected layers: a tiled fp32 matrix product with a fused bias (+ ReLU), and column sums.
//
// Layout: every array is C-contiguous float32, row-major.
//   c (m, n) = op(a) (m, k) @ op(b) (k, n) [+ bias (n)] [then max(0, .)]
//   op(a) = a, stored (m, k), or a^T with a stored (k, m) when trans_a != 0; likewise op(b) = b stored
//   (k, n), or b^T with b stored (n, k) when trans_b != 0.
// The linear layer's three products (gpucnn/cuda/linear.py):
//   y      (N, OUT) = x (N, IN) @ weight^T        a = x,      b = weight (trans_b)
//   grad_x (N, IN)  = grad_y (N, OUT) @ weight    a = grad_y, b = weight
//   grad_w (OUT, IN) = grad_y^T @ x               a = grad_y (trans_a), b = x
// The launchers refuse sizes whose element counts overflow int32, so int indexing is safe here.
//
// Kernels and what they write:
//   linear_matmul_tiled    c, or one slice of partial sums. A block of 16 x 16 threads owns a
//                          TILE_M x TILE_N tile of c; thread (tx, ty) computes the 4 x 4 elements at
//                          rows ty + 16*i and columns tx + 16*j. The k axis is walked TILE_K at a time
//                          through two shared tiles, stored k-major so the inner loop reads rows of
//                          each. Split-k: block z sums only k in [z*k_slice, (z+1)*k_slice) and writes
//                          slice z of c, shaped (gridDim.z, m, n); with gridDim.z == 1 that is c itself.
//                          has_bias / relu apply the epilogue here (the launcher sets them only when
//                          there is one slice).
//   linear_reduce_slices   c (m, n): the slices of partial summed in slice order, then bias and ReLU.
//                          One thread per element of c.
//   linear_column_sums     out (cols): the sum of each column of g (rows, cols), the bias gradient.
//                          A block of 32 x COLSUM_ROWS threads owns 32 columns; thread (tx, ty) sums
//                          rows ty, ty + COLSUM_ROWS, ... of its column, then thread (tx, 0) adds the
//                          COLSUM_ROWS partial sums in order.
// Every sum runs in an order fixed by the sizes and the launch shape, never by scheduling (no
// atomics), so results are bitwise reproducible.

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define COLSUM_ROWS 8  // blockDim.y of linear_column_sums; gpucnn/cuda/linear.py agrees

extern "C" __global__ void linear_matmul_tiled(
    const float* a, const float* b, const float* bias, float* c,
    int m, int n, int k, int trans_a, int trans_b, int k_slice, int has_bias, int relu)
{
    // One padding column keeps the k-major stores of non-transposed tiles free of bank conflicts.
    __shared__ float a_tile[TILE_K][TILE_M + 1];
    __shared__ float b_tile[TILE_K][TILE_N + 1];

    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * 16 + tx;
    const int row0 = (int)blockIdx.y * TILE_M;
    const int col0 = (int)blockIdx.x * TILE_N;
    const int k_begin = (int)blockIdx.z * k_slice;
    const int k_end = min(k_begin + k_slice, k);

    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }

    // The loop bounds depend only on blockIdx, so every thread of the block reaches each barrier.
    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        // 1024 elements per tile, 4 per thread; consecutive threads read consecutive addresses.
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int idx = tid + r * 256;
            int i, kk;
            if (trans_a) { i = idx % TILE_M; kk = idx / TILE_M; }
            else         { kk = idx % TILE_K; i = idx / TILE_K; }
            const int gi = row0 + i;
            const int gk = k0 + kk;
            float v = 0.0f;
            if (gi < m && gk < k_end) v = trans_a ? a[gk * m + gi] : a[gi * k + gk];
            a_tile[kk][i] = v;
        }
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int idx = tid + r * 256;
            int j, kk;
            if (trans_b) { kk = idx % TILE_K; j = idx / TILE_K; }
            else         { j = idx % TILE_N; kk = idx / TILE_N; }
            const int gj = col0 + j;
            const int gk = k0 + kk;
            float v = 0.0f;
            if (gj < n && gk < k_end) v = trans_b ? b[gj * k + gk] : b[gk * n + gj];
            b_tile[kk][j] = v;
        }
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a_frag[4];
            float b_frag[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a_frag[i] = a_tile[kk][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) b_frag[j] = b_tile[kk][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a_frag[i] * b_frag[j];
            }
        }
        // The next step overwrites the tiles: wait until every thread has read them.
        __syncthreads();
    }

    float* c_slice = c + (int)blockIdx.z * m * n;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gi = row0 + ty + 16 * i;
        if (gi >= m) continue;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gj = col0 + tx + 16 * j;
            if (gj >= n) continue;
            float r = acc[i][j];
            if (has_bias) r += bias[gj];
            if (relu && r < 0.0f) r = 0.0f;
            c_slice[gi * n + gj] = r;
        }
    }
}

extern "C" __global__ void linear_reduce_slices(
    const float* partial, const float* bias, float* c, int m, int n, int slices, int has_bias, int relu)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= m * n) return;
    float r = 0.0f;
    for (int s = 0; s < slices; ++s) r += partial[s * m * n + idx];
    if (has_bias) r += bias[idx % n];
    if (relu && r < 0.0f) r = 0.0f;
    c[idx] = r;
}

extern "C" __global__ void linear_column_sums(const float* g, float* out, int rows, int cols)
{
    __shared__ float partial[COLSUM_ROWS][32];
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int col = (int)blockIdx.x * 32 + tx;

    float acc = 0.0f;
    if (col < cols) {
        for (int r = ty; r < rows; r += COLSUM_ROWS) acc += g[r * cols + col];
    }
    partial[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < cols) {
        float total = 0.0f;
        for (int s = 0; s < COLSUM_ROWS; ++s) total += partial[s][tx];
        out[col] = total;
    }
}
