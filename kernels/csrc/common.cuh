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

// Tensor-core helpers (sm_80+) for 16-bit T (Half or BF16): registers hold two 16-bit values
// (low half first). mma_16816 / mma_1688: D = A * B + D with fp32 accumulation, the row.col
// layouts of the PTX ISA (A 16 x K row-major, B K x 8 column-major, C/D 16 x 8; lane = 4 *
// groupID + threadID_in_group). ldmatrix_x4: four 8 x 8 16-bit matrices; lane l gives the row
// address of row l % 8 of matrix l / 8; with `trans` each matrix arrives transposed.
template <typename T> struct MmaName;
template <> struct MmaName<Half> { static constexpr bool bf16 = false; };
template <> struct MmaName<BF16> { static constexpr bool bf16 = true; };

template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
  return (unsigned)from_f<T>(lo).x | ((unsigned)from_f<T>(hi).x << 16);
}
template <typename T> __device__ __forceinline__ unsigned pack2_bits(T lo, T hi) {
  return (unsigned)lo.x | ((unsigned)hi.x << 16);
}

#ifndef MESHGATE_EMULATE
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
template <typename T> __device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
  if (MmaName<T>::bf16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <typename T> __device__ __forceinline__ void mma_1688(float* c, const unsigned* a, unsigned b) {
  if (MmaName<T>::bf16)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(b));
  else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(b));
}
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
}
#else
template <typename T> __device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
  emu_mma(c, a, 4, b, 2, 16, MmaName<T>::bf16);
}
template <typename T> __device__ __forceinline__ void mma_1688(float* c, const unsigned* a, unsigned b) {
  emu_mma(c, a, 2, &b, 1, 8, MmaName<T>::bf16);
}
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
  emu_ldmatrix_x4(r, row, TRANS);
}
#endif

#endif  // MESHGATE_COMMON_CUH
