// Runs kernels/csrc/*.cu on the CPU for tests (g++ -include emulate.h -DMESHGATE_EMULATE):
// blocks one after another, the threads of a block as std::threads, __syncthreads and warp
// shuffles through barriers, __shared__ as function statics (one block at a time). Slow, and only
// for small launches; it checks indexing and arithmetic, not performance or memory ordering.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct emu_uint3 { unsigned x, y, z; };
struct emu_warp_t {
  float vals[32];
  const void* ptrs[32];     // ldmatrix row addresses
  unsigned regs[32][6];     // mma fragments: A (up to 4 registers), then B (up to 2)
  std::barrier<> bar{32};
};
inline thread_local emu_uint3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local std::barrier<>* emu_block_barrier;
inline thread_local emu_warp_t* emu_warp;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const unsigned lane = threadIdx.x & 31;
  emu_warp->vals[lane] = v;
  emu_warp->bar.arrive_and_wait();
  const float r = emu_warp->vals[lane ^ offset];
  emu_warp->bar.arrive_and_wait();
  return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::min;  // expf, fmaxf: the C library's

inline float emu_half_to_float(unsigned short x) { _Float16 h; std::memcpy(&h, &x, 2); return (float)h; }
inline unsigned short emu_float_to_half(float v) {
  _Float16 h = (_Float16)v;  // round to nearest even, as cvt.rn.f16.f32
  unsigned short x; std::memcpy(&x, &h, 2); return x;
}
inline unsigned short emu_float_to_bf16(float v) {
  unsigned u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (unsigned short)(u >> 16);
}

inline float emu_16_to_float(unsigned bits, bool bf16) {
  if (bf16) return __uint_as_float(bits << 16);
  return emu_half_to_float((unsigned short)bits);
}
inline unsigned emu_half16(unsigned reg, int which) { return (reg >> (16 * which)) & 0xffffu; }

// mma.sync m16n8kK (K = 16: A in 4 registers, B in 2; K = 8: A in 2, B in 1), fp32 accumulate:
// the whole warp publishes its fragments, then each lane computes its four C elements.
inline void emu_mma(float* c, const unsigned* a, int na, const unsigned* b, int nb, int K, bool bf16) {
  const unsigned lane = threadIdx.x & 31;
  for (int i = 0; i < na; ++i) emu_warp->regs[lane][i] = a[i];
  for (int i = 0; i < nb; ++i) emu_warp->regs[lane][4 + i] = b[i];
  emu_warp->bar.arrive_and_wait();
  const int gid = lane / 4, tig = lane % 4;
  float out[4];
  for (int idx = 0; idx < 4; ++idx) {
    const int row = gid + (idx >= 2 ? 8 : 0), col = tig * 2 + idx % 2;
    float sum = c[idx];
    for (int k = 0; k < K; ++k) {
      // A: lane (row % 8) * 4 + (k % 8) / 2; register (row >= 8) + 2 * (k >= 8); half k % 2
      const unsigned ar = emu_warp->regs[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      // B: lane col * 4 + (k % 8) / 2; register k >= 8; half k % 2
      const unsigned br = emu_warp->regs[col * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
      sum += emu_16_to_float(emu_half16(ar, k % 2), bf16) * emu_16_to_float(emu_half16(br, k % 2), bf16);
    }
    out[idx] = sum;
  }
  emu_warp->bar.arrive_and_wait();
  for (int idx = 0; idx < 4; ++idx) c[idx] = out[idx];
}

// ldmatrix.sync m8n8.x4 (.trans): matrix j's rows come from lanes 8j..8j+7.
inline void emu_ldmatrix_x4(unsigned* r, const void* row, bool trans) {
  const unsigned lane = threadIdx.x & 31;
  emu_warp->ptrs[lane] = row;
  emu_warp->bar.arrive_and_wait();
  const int gid = lane / 4, tig = lane % 4;
  for (int j = 0; j < 4; ++j) {
    unsigned short v[2];
    for (int h = 0; h < 2; ++h) {
      const int rr = trans ? tig * 2 + h : gid, cc = trans ? gid : tig * 2 + h;
      v[h] = static_cast<const unsigned short*>(emu_warp->ptrs[j * 8 + rr])[cc];
    }
    r[j] = v[0] | ((unsigned)v[1] << 16);
  }
  emu_warp->bar.arrive_and_wait();
}

template <typename... A, std::size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<A*>(args[I])...);
}

// grid[3], block threads (a multiple of 32), args[i] points at the i-th argument's value.
template <typename... A>
void emu_launch(void (*k)(A...), const int* grid, int block, void** args) {
  for (int z = 0; z < grid[2]; ++z)
    for (int y = 0; y < grid[1]; ++y)
      for (int x = 0; x < grid[0]; ++x) {
        std::barrier<> bar(block);
        std::vector<emu_warp_t> warps((block + 31) / 32);
        std::vector<std::thread> threads;
        for (int t = 0; t < block; ++t)
          threads.emplace_back([&, t] {
            threadIdx = {(unsigned)t, 0, 0};
            blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
            blockDim = {(unsigned)block, 1, 1};
            gridDim = {(unsigned)grid[0], (unsigned)grid[1], (unsigned)grid[2]};
            emu_block_barrier = &bar;
            emu_warp = &warps[t / 32];
            emu_call(k, args, std::index_sequence_for<A...>{});
          });
        for (auto& th : threads) th.join();
      }
}
