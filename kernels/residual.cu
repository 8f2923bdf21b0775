// The residual connection's sum, with the ReLU that follows it in a basic block fused on request.
//
// Layout: any shape, C-contiguous float32, seen as a flat array of count elements; a 64-bit
// grid-stride loop (element i, i + gridDim.x * blockDim.x, ...), so the launcher may cap the grid
// and count may pass 2**31.
//
// Kernels and what they write:
//   add_forward   y = a + b, then max(y, 0) when relu != 0 (a NaN stays NaN, like relu_forward).
// The gradient needs no kernel of its own: grad_y for both inputs without the ReLU, and
// relu_backward(grad_y, y) (kernels/elementwise.cu) for both with it.

extern "C" __global__ void add_forward(const float* a, const float* b, float* y, long long count, int relu)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = a[i] + b[i];
        y[i] = (relu && !(v > 0.0f) && !isnan(v)) ? 0.0f : v;
    }
}
