// Softmax cross-entropy (mean over the batch): forward and backward.
//
// Layout: C-contiguous, row-major. logits and probs (n, classes) float32, labels (n) int32, row_loss (n)
// float32, loss (1) float32, grad_logits (n, classes) float32.
// The same formulas as gpucnn/ops/loss.py:
//   shifted = logits - max_j logits ; lse = log(sum_j exp(shifted))
//   probs = exp(shifted - lse) ; row_loss = lse - shifted[label] ; loss = sum(row_loss) / n
//   grad_logits = (probs - onehot(label)) / n
// Labels are not checked on the host (that would wait for the device); a label outside [0, classes) makes
// its row's loss, and so the mean, NaN, and its row of grad_logits NaN.
//
// Kernels and what they write:
//   softmax_xent_forward   probs and row_loss. One warp per row (block 32 x XENT_ROWS threads, row
//                          blockIdx.x * XENT_ROWS + threadIdx.y); lane l handles columns l, l + 32, ...
//                          and the warp combines its lanes with butterfly shuffles, which leave the
//                          same value in every lane. A warp whose row is past n skips everything, so
//                          every shuffle has all 32 lanes of its warp present.
//   softmax_xent_mean      loss[0]: one block of MEAN_THREADS threads; thread t sums rows t,
//                          t + MEAN_THREADS, ..., then a fixed tree in shared memory adds the threads.
//   softmax_xent_backward  grad_logits: one thread per element.
//   softmax_xent_accumulate totals[0] += the sum of row_loss, totals[1] += the number of rows whose
//                          first maximal logit (a NaN counts as the maximum) is the label: the epoch
//                          sums of a training step, kept on the device. One block of MEAN_THREADS
//                          threads, the same fixed tree as softmax_xent_mean, in double precision.
// No atomics, and every sum runs in an order fixed by n and classes: results are bitwise reproducible.

#define XENT_ROWS 8       // rows (warps) per block of softmax_xent_forward; gpucnn/cuda/loss.py agrees
#define MEAN_THREADS 256  // blockDim.x of softmax_xent_mean; gpucnn/cuda/loss.py agrees
#define FULL_WARP 0xffffffffu

extern "C" __global__ void softmax_xent_forward(
    const float* logits, const int* labels, float* probs, float* row_loss, int n, int classes)
{
    const int lane = (int)threadIdx.x;
    const int row = (int)blockIdx.x * XENT_ROWS + (int)threadIdx.y;
    if (row >= n) return;  // the whole warp leaves together
    const float* x = logits + row * classes;

    // Row maximum; a NaN wins, so a NaN logit makes the row NaN as in the reference.
    float row_max = __int_as_float(0xff800000);  // -inf: lanes past classes contribute nothing
    for (int j = lane; j < classes; j += 32) {
        const float v = x[j];
        if (v > row_max || isnan(v)) row_max = v;
    }
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(FULL_WARP, row_max, offset);
        if (other > row_max || isnan(other)) row_max = other;
    }

    float sum = 0.0f;
    for (int j = lane; j < classes; j += 32) sum += expf(x[j] - row_max);
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(FULL_WARP, sum, offset);
    const float lse = logf(sum);

    for (int j = lane; j < classes; j += 32) probs[row * classes + j] = expf((x[j] - row_max) - lse);
    if (lane == 0) {
        const int label = labels[row];
        row_loss[row] = (label >= 0 && label < classes) ? lse - (x[label] - row_max) : __int_as_float(0x7fc00000);
    }
}

extern "C" __global__ void softmax_xent_mean(const float* row_loss, float* loss, int n)
{
    __shared__ float partial[MEAN_THREADS];
    const int t = (int)threadIdx.x;
    float acc = 0.0f;
    for (int r = t; r < n; r += MEAN_THREADS) acc += row_loss[r];
    partial[t] = acc;
    __syncthreads();
    for (int stride = MEAN_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) loss[0] = partial[0] / (float)n;
}

extern "C" __global__ void softmax_xent_backward(
    const float* probs, const int* labels, float* grad_logits, int n, int classes)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * classes) return;
    const int row = idx / classes;
    const int label = labels[row];
    float g = probs[idx];
    if (label < 0 || label >= classes) {
        g = __int_as_float(0x7fc00000);
    } else if (idx - row * classes == label) {
        g -= 1.0f;
    }
    grad_logits[idx] = g / (float)n;
}

extern "C" __global__ void softmax_xent_accumulate(
    const float* logits, const int* labels, const float* row_loss, double* totals, int n, int classes)
{
    __shared__ double loss_part[MEAN_THREADS];
    __shared__ double correct_part[MEAN_THREADS];
    const int t = (int)threadIdx.x;
    double loss = 0.0, correct = 0.0;
    for (int r = t; r < n; r += MEAN_THREADS) {
        const float* x = logits + (long long)r * classes;
        int best = 0;
        for (int j = 1; j < classes; ++j) {
            if (x[j] > x[best] || (isnan(x[j]) && !isnan(x[best]))) best = j;
        }
        loss += (double)row_loss[r];
        correct += best == labels[r] ? 1.0 : 0.0;
    }
    loss_part[t] = loss;
    correct_part[t] = correct;
    __syncthreads();
    for (int stride = MEAN_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            loss_part[t] += loss_part[t + stride];
            correct_part[t] += correct_part[t + stride];
        }
        __syncthreads();
    }
    if (t == 0) {
        totals[0] += loss_part[0];
        totals[1] += correct_part[0];
    }
}
