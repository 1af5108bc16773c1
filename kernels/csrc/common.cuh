// Shared device helpers for the meshgate kernels. No CUDA or C++ headers: NVRTC compiles these
// sources as they are, so half and bfloat16 are 16-bit storage types converted with PTX.
#ifndef MESHGATE_COMMON_CUH
#define MESHGATE_COMMON_CUH

typedef unsigned short u16;
typedef long long i64;

struct Half { u16 x; };  // IEEE fp16 bits
struct BF16 { u16 x; };  // bfloat16 bits

__device__ __forceinline__ float to_f(float v) { return v; }
#ifndef MESHGATE_EMULATE  // (tests/kernels/emulate.h runs these sources on the CPU)
__device__ __forceinline__ float to_f(Half v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}
#else
__device__ __forceinline__ float to_f(Half v) { return emu_half_to_float(v.x); }
#endif
__device__ __forceinline__ float to_f(BF16 v) { return __uint_as_float(((unsigned)v.x) << 16); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
#ifndef MESHGATE_EMULATE
template <> __device__ __forceinline__ Half from_f<Half>(float v) {
  Half h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(v));
  return h;
}
template <> __device__ __forceinline__ BF16 from_f<BF16>(float v) {
  BF16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.x) : "f"(v));
  return b;
}
#else
template <> __device__ __forceinline__ Half from_f<Half>(float v) { return Half{emu_float_to_half(v)}; }
template <> __device__ __forceinline__ BF16 from_f<BF16>(float v) { return BF16{emu_float_to_bf16(v)}; }
#endif

// Round through T: mirrors torch ops that compute in T's precision.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of up to 1024 threads; `scratch` holds 32 floats. Every thread gets the sum.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + 31) >> 5;
  v = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

#define NEG_INF __int_as_float(0xff800000)

// Asynchronous 16-byte global -> shared copies (sm_80+): zero-filled when !valid. A thread's
// copies form a group at cp_async_commit; cp_async_wait<N> waits until at most N of its groups
// are still in flight (then __syncthreads makes everyone's copies visible).
#ifndef MESHGATE_EMULATE
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  unsigned dst;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(dst) : "l"(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N> __device__ __forceinline__ void cp_async_wait() {}
#endif

#endif  // MESHGATE_COMMON_CUH
