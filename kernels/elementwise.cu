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

// The activations of LeNet-5's classic variant, dropout's mask product and the two helpers a
// training step needs on the device (gradient accumulation, zeroing), all with 64-bit
// grid-stride loops:
//   tanh_forward      y = tanh(x)
//   tanh_backward     grad_x = grad_y * (1 - y*y) from the saved output y
//   sigmoid_forward   y = 1 / (1 + exp(-x)), without overflow for large |x|
//   sigmoid_backward  grad_x = grad_y * y * (1 - y) from the saved output y
//   multiply          out = a * b (dropout: the input times its mask)
//   add_into          out += x (a gradient added into a parameter's .grad)
//   fill              out = value

extern "C" __global__ void tanh_forward(const float* x, float* y, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = tanhf(x[i]);
    }
}

extern "C" __global__ void tanh_backward(const float* grad_y, const float* y, float* grad_x, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        grad_x[i] = grad_y[i] * (1.0f - y[i] * y[i]);
    }
}

extern "C" __global__ void sigmoid_forward(const float* x, float* y, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float small = expf(-fabsf(v));  // in (0, 1]: never overflows
        y[i] = v >= 0.0f ? 1.0f / (1.0f + small) : small / (1.0f + small);
    }
}

extern "C" __global__ void sigmoid_backward(const float* grad_y, const float* y, float* grad_x, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        grad_x[i] = grad_y[i] * y[i] * (1.0f - y[i]);
    }
}

extern "C" __global__ void multiply(const float* a, const float* b, float* out, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = a[i] * b[i];
    }
}

extern "C" __global__ void add_into(float* out, const float* x, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] += x[i];
    }
}

extern "C" __global__ void fill(float* out, float value, long long count)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = value;
    }
}
