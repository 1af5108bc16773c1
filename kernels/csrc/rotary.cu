// Rotate-half (GPT-NeoX / Hugging Face Llama) RoPE in place on q and k, as reference.rotary:
// cos and sin are rounded to T first, and each product and sum is rounded to T like torch does.
// q: (T, H, D) with row stride q_stride; k: (T, KVH, D) with row stride k_stride (heads of a row
// contiguous, so views of a fused qkv projection work); positions (T,) int64;
// cos_sin (max_positions, D) fp32, cos in the first half. Grid T; threads over (H + KVH) * D/2.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rotate(T* x, int i, int half, float c, float s) {
  const float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
  x[i] = from_f<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
  x[i + half] = from_f<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
}

template <typename T>
__device__ void rotary(T* __restrict__ q, T* __restrict__ k, const i64* __restrict__ positions,
                       const float* __restrict__ cos_sin, i64 q_stride, i64 k_stride, int num_heads,
                       int num_kv_heads, int head_dim) {
  const int t = blockIdx.x, half = head_dim / 2;
  const float* cs = cos_sin + positions[t] * head_dim;
  const int total = (num_heads + num_kv_heads) * half;
  for (int j = threadIdx.x; j < total; j += blockDim.x) {
    const int h = j / half, i = j % half;
    const float c = round_to<T>(cs[i]), s = round_to<T>(cs[half + i]);
    if (h < num_heads) rotate<T>(q + t * q_stride + (i64)h * head_dim, i, half, c, s);
    else rotate<T>(k + t * k_stride + (i64)(h - num_heads) * head_dim, i, half, c, s);
  }
}

#define INSTANTIATE(T, NAME)                                                                     \
  extern "C" __global__ void rotary_##NAME(T* q, T* k, const i64* positions, const float* cos_sin, \
                                           i64 q_stride, i64 k_stride, int num_heads,            \
                                           int num_kv_heads, int head_dim) {                      \
    rotary<T>(q, k, positions, cos_sin, q_stride, k_stride, num_heads, num_kv_heads, head_dim);  \
  }

INSTANTIATE(float, float32)
INSTANTIATE(Half, float16)
INSTANTIATE(BF16, bfloat16)
