// Store this step's K/V into the paged cache through slot_mapping (slot -1: skip, a padded token).
// key, value: (T, KVH, D) rows of row_stride elements (the heads of a row contiguous);
// cache: (2, num_blocks, block_size, KVH, D), V half at cache + kv_stride; slot_mapping (T,) int64.
// Grid T; threads over the KVH * D elements of one token.
#include "common.cuh"

template <typename T>
__device__ void write_kv(T* __restrict__ cache, const T* __restrict__ key, const T* __restrict__ value,
                         const i64* __restrict__ slot_mapping, i64 kv_stride, i64 key_row_stride,
                         i64 value_row_stride, int width) {
  const int t = blockIdx.x;
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  T* k_dst = cache + slot * width;  // 64-bit: slot * width passes 2^31 in large caches
  T* v_dst = cache + kv_stride + slot * width;
  const T* k_src = key + (i64)t * key_row_stride;
  const T* v_src = value + (i64)t * value_row_stride;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

#define INSTANTIATE(T, NAME)                                                                   \
  extern "C" __global__ void write_kv_##NAME(T* cache, const T* key, const T* value,           \
                                             const i64* slot_mapping, i64 kv_stride,           \
                                             i64 key_row_stride, i64 value_row_stride, int width) { \
    write_kv<T>(cache, key, value, slot_mapping, kv_stride, key_row_stride, value_row_stride, width); \
  }

INSTANTIATE(float, float32)
INSTANTIATE(Half, float16)
INSTANTIATE(BF16, bfloat16)
