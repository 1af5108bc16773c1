// RMSNorm as kernels/reference.py defines it: normalise in fp32, round to T, then weight * that
// (rounded to T). The fused variant first does residual = round_T(x + residual) in place.
// x, residual, out: (N, hidden) contiguous; weight (hidden,). Grid N; up to 1024 threads.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void normalise(T* __restrict__ out, const T* __restrict__ src,
                                          const T* __restrict__ weight, float sum_sq, int hidden,
                                          float eps, float* scratch) {
  const float r = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[i] = from_f<T>(to_f(weight[i]) * round_to<T>(to_f(src[i]) * r));
}

template <typename T>
__device__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                         int hidden, float eps) {
  __shared__ float scratch[32];
  const i64 row = (i64)blockIdx.x * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_f(x[row + i]);
    ss += v * v;
  }
  normalise<T>(out + row, x + row, weight, ss, hidden, eps, scratch);
}

template <typename T>
__device__ void fused_add_rms_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                   const T* __restrict__ weight, int hidden, float eps) {
  __shared__ float scratch[32];
  const i64 row = (i64)blockIdx.x * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = round_to<T>(to_f(x[row + i]) + to_f(residual[row + i]));
    residual[row + i] = from_f<T>(v);  // read back below by this same thread
    ss += v * v;
  }
  normalise<T>(out + row, residual + row, weight, ss, hidden, eps, scratch);
}

#define INSTANTIATE(T, NAME)                                                                      \
  extern "C" __global__ void rms_norm_##NAME(T* out, const T* x, const T* weight, int hidden,     \
                                             float eps) {                                         \
    rms_norm<T>(out, x, weight, hidden, eps);                                                     \
  }                                                                                               \
  extern "C" __global__ void fused_add_rms_norm_##NAME(T* out, T* residual, const T* x,           \
                                                       const T* weight, int hidden, float eps) {  \
    fused_add_rms_norm<T>(out, residual, x, weight, hidden, eps);                                 \
  }

INSTANTIATE(float, float32)
INSTANTIATE(Half, float16)
INSTANTIATE(BF16, bfloat16)
