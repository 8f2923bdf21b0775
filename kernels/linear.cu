// Fully connected layers: a tiled fp32 matrix product with a fused bias (+ ReLU), and column sums.
//
// Layout: every array is C-contiguous float32, row-major.
//   c (rows, cols) = op(a) (rows, depth) @ op(b) (depth, cols) [+ bias (cols)] [then max(0, .)]
//   op(a) = a, stored (rows, depth), or a^T with a stored (depth, rows) when trans_a != 0; likewise
//   op(b) = b stored (depth, cols), or b^T with b stored (cols, depth) when trans_b != 0.
// (The usual GEMM names M, N, K for rows, cols and depth survive only in the tile sizes TILE_M,
// TILE_N, TILE_K and in "split-k"; everywhere else in gpucnn N is the batch and K is not used.)
// The linear layer's three products (gpucnn/cuda/linear.py):
//   y      (N, OUT) = x (N, IN) @ weight^T        a = x,      b = weight (trans_b)
//   grad_x (N, IN)  = grad_y (N, OUT) @ weight    a = grad_y, b = weight
//   grad_w (OUT, IN) = grad_y^T @ x               a = grad_y (trans_a), b = x
// The launchers refuse sizes whose element counts overflow int32, so int indexing is safe here.
//
// Kernels and what they write:
//   linear_matmul_tiled    c, or one slice of partial sums. A block of 16 x 16 threads owns a
//                          TILE_M x TILE_N tile of c; thread (tx, ty) computes the 4 x 4 elements at
//                          rows ty + 16*i and columns tx + 16*j. The depth axis is walked TILE_K at a
//                          time through two shared tiles, stored depth-major so the inner loop reads
//                          rows of each. Split-k: block z sums only depth in [z*depth_slice,
//                          (z+1)*depth_slice) and writes slice z of c, shaped (gridDim.z, rows, cols);
//                          with gridDim.z == 1 that is c itself. has_bias / relu apply the epilogue
//                          here (the launcher sets them only when there is one slice).
//   linear_reduce_slices   c (rows, cols): the slices of partial summed in slice order, then bias and
//                          ReLU. One thread per element of c.
//   linear_column_sums     out (cols): the sum of each column of g (rows, cols), the bias gradient.
//                          A block of 32 x COLSUM_ROWS threads owns 32 columns; thread (tx, ty) sums
//                          rows ty, ty + COLSUM_ROWS, ... of its column, then thread (tx, 0) adds the
//                          COLSUM_ROWS partial sums in order.
// Every sum runs in an order fixed by the sizes and the launch shape, never by scheduling (no
// atomics), so results are bitwise reproducible.

#define TILE_M 64       // rows of c per block
#define TILE_N 64       // columns of c per block (= TILE_M: load_tile serves both operands)
#define TILE_K 16       // depths per step of the depth loop
#define COLSUM_ROWS 8  // blockDim.y of linear_column_sums; gpucnn/cuda/linear.py agrees

// Loads one shared tile, tile[dd][o] = op(src)[o0 + o][d0 + dd] for TILE_K depths and TILE_M (= TILE_N)
// entries o of the other axis: op(a)'s rows or op(b)^T's columns, `outer` of them. The operand stores
// element (o, d) at src[d * outer + o] when depth_major, else at src[o * depth + d]; entries past outer
// or d_end are 0. 1024 elements per tile, 4 per thread; consecutive threads read consecutive addresses.
__device__ __forceinline__ void load_tile(
    const float* src, float tile[TILE_K][TILE_M + 1], int tid, int o0, int d0, int outer, int depth, int d_end,
    int depth_major)
{
    #pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int idx = tid + r * 256;
        int o, dd;
        if (depth_major) { o = idx % TILE_M; dd = idx / TILE_M; }
        else             { dd = idx % TILE_K; o = idx / TILE_K; }
        const int go = o0 + o;
        const int gd = d0 + dd;
        float v = 0.0f;
        if (go < outer && gd < d_end) v = depth_major ? src[gd * outer + go] : src[go * depth + gd];
        tile[dd][o] = v;
    }
}

extern "C" __global__ void linear_matmul_tiled(
    const float* a, const float* b, const float* bias, float* c,
    int rows, int cols, int depth, int trans_a, int trans_b, int depth_slice, int has_bias, int relu)
{
    // One padding column keeps the depth-major stores of non-transposed tiles free of bank conflicts.
    __shared__ float a_tile[TILE_K][TILE_M + 1];
    __shared__ float b_tile[TILE_K][TILE_N + 1];

    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * 16 + tx;
    const int row0 = (int)blockIdx.y * TILE_M;
    const int col0 = (int)blockIdx.x * TILE_N;
    const int d_begin = (int)blockIdx.z * depth_slice;
    const int d_end = min(d_begin + depth_slice, depth);

    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }

    // The loop bounds depend only on blockIdx, so every thread of the block reaches each barrier.
    for (int d0 = d_begin; d0 < d_end; d0 += TILE_K) {
        load_tile(a, a_tile, tid, row0, d0, rows, depth, d_end, trans_a);
        load_tile(b, b_tile, tid, col0, d0, cols, depth, d_end, !trans_b);
        __syncthreads();
        #pragma unroll
        for (int dd = 0; dd < TILE_K; ++dd) {
            float a_frag[4];
            float b_frag[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) a_frag[i] = a_tile[dd][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) b_frag[j] = b_tile[dd][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a_frag[i] * b_frag[j];
            }
        }
        // The next step overwrites the tiles: wait until every thread has read them.
        __syncthreads();
    }

    float* c_slice = c + (int)blockIdx.z * rows * cols;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gi = row0 + ty + 16 * i;
        if (gi >= rows) continue;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int gj = col0 + tx + 16 * j;
            if (gj >= cols) continue;
            float r = acc[i][j];
            if (has_bias) r += bias[gj];
            if (relu && r < 0.0f) r = 0.0f;
            c_slice[gi * cols + gj] = r;
        }
    }
}

extern "C" __global__ void linear_reduce_slices(
    const float* partial, const float* bias, float* c, int rows, int cols, int slices, int has_bias, int relu)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * cols) return;
    float r = 0.0f;
    for (int s = 0; s < slices; ++s) r += partial[s * rows * cols + idx];
    if (has_bias) r += bias[idx % cols];
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
