// Element-wise activations for the layers between the fused kernels: ReLU forward and backward.
//
// Layout: any shape, C-contiguous float32, seen as a flat array of count elements.
// Both kernels walk the array with a grid-stride loop (element i, i + gridDim.x * blockDim.x, ...),
// so the launcher may cap the grid. The index is 64-bit: i + gridDim.x * blockDim.x must not wrap
// for counts within one stride of 2**31, which the int count allows.
//
// Kernels and what they write:
//   relu_forward   y = max(x, 0); a NaN stays NaN (like numpy.maximum in gpucnn/ops/activation.py).
//   relu_backward  grad_x = grad_y where the saved output y > 0, else 0 (the kink at 0 gets 0).

extern "C" __global__ void relu_forward(const float* x, float* y, int count)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = (v > 0.0f || isnan(v)) ? v : 0.0f;
    }
}

extern "C" __global__ void relu_backward(const float* grad_y, const float* y, float* grad_x, int count)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        grad_x[i] = y[i] > 0.0f ? grad_y[i] : 0.0f;
    }
}
