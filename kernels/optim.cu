// Fused optimizer updates over flat buffers: every parameter of a model packed in one contiguous
// float32 array, its gradients and optimizer state in arrays of the same length and layout.
//
// Layout: param, grad, exp_avg, exp_avg_sq, momentum_buffer (count) float32; step (1) int32;
// lr (1) float64. The step count and the learning rate live on the device, so a captured CUDA graph
// that replays optim_advance_step and an update reads the current step and lr at every replay;
// the other hyperparameters are launch arguments, fixed for a run.
//
// The update rules are gpucnn/optim.py's (PyTorch's), with t the step count after the increment:
//   Adam   g += wd*p (decoupled == 0) or p *= 1 - lr*wd (decoupled != 0, AdamW) ;
//          m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g*g ;
//          p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   SGD    g += wd*p ; b = g (t == 1) or b = mu*b + g ; g = g + mu*b (nesterov) or b ; p -= lr*g
// Scalars are formed as the NumPy reference forms them: in double, then rounded once to float; the
// element-wise float arithmetic uses __fmul_rn / __fadd_rn so no multiply-add is fused and each
// result is rounded where the reference rounds it.
//
// Kernels and what they write:
//   optim_advance_step  step[0] += 1 (one thread). Launched before each update.
//   adam_update         param, exp_avg, exp_avg_sq: a grid-stride loop, one element at a time.
//   sgd_update          param and, when momentum != 0, momentum_buffer: a grid-stride loop.
// Each element is updated by one thread from its own values only: results are bitwise reproducible.
// The grid-stride index is 64-bit, so i + stride cannot wrap for counts near 2**31.

extern "C" __global__ void optim_advance_step(int* step)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) step[0] += 1;
}

extern "C" __global__ void adam_update(
    float* param, const float* grad, float* exp_avg, float* exp_avg_sq, const int* step, const double* lr,
    double beta1, double beta2, double eps, double weight_decay, int decoupled, int count)
{
    const double t = (double)step[0];
    const double lr_now = lr[0];
    const float step_size = (float)(lr_now / (1.0 - pow(beta1, t)));
    const float bias_correction2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
    const float b1 = (float)beta1;
    const float one_minus_b1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2;
    const float one_minus_b2 = (float)(1.0 - beta2);
    const float eps_f = (float)eps;
    const bool decay = weight_decay != 0.0;
    const float l2 = (float)weight_decay;
    const float shrink = (float)(1.0 - lr_now * weight_decay);

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        float p = param[i];
        float g = grad[i];
        if (decay) {
            if (decoupled) p = __fmul_rn(p, shrink);
            else g = __fadd_rn(g, __fmul_rn(l2, p));
        }
        const float m = __fadd_rn(__fmul_rn(exp_avg[i], b1), __fmul_rn(one_minus_b1, g));
        const float v = __fadd_rn(__fmul_rn(exp_avg_sq[i], b2), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
        const float denom = __fadd_rn(sqrtf(v) / bias_correction2_sqrt, eps_f);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = __fadd_rn(p, -(__fmul_rn(step_size, m) / denom));
    }
}

extern "C" __global__ void sgd_update(
    float* param, const float* grad, float* momentum_buffer, const int* step, const double* lr,
    double momentum, int nesterov, double weight_decay, int count)
{
    const bool first = step[0] == 1;
    const float lr_f = (float)lr[0];
    const float mu = (float)momentum;
    const bool use_momentum = momentum != 0.0;
    const bool decay = weight_decay != 0.0;
    const float l2 = (float)weight_decay;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float p = param[i];
        float g = grad[i];
        if (decay) g = __fadd_rn(g, __fmul_rn(l2, p));
        if (use_momentum) {
            const float b = first ? g : __fadd_rn(__fmul_rn(momentum_buffer[i], mu), g);
            momentum_buffer[i] = b;
            g = nesterov ? __fadd_rn(g, __fmul_rn(mu, b)) : b;
        }
        param[i] = __fadd_rn(p, -__fmul_rn(lr_f, g));
    }
}
