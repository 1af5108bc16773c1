// Paged attention over the block table (vLLM layout): decode (one query per sequence) and
// chunked prefill (several causal queries per sequence) share one kernel, one "row" = one query
// token. Online softmax keeps shared memory independent of the context length.
//
// q:      (R, H, D) rows (R = B for decode, T for prefill), heads of a row contiguous
// cache:  (2, num_blocks, block_size, KVH, D); K at cache, V at cache + kv_stride
// block_table (B, max_blocks) int32, seq_lens (B,) int32, query_start_loc (B+1,) int32 or null
// Scalars are passed one by one (no struct) so any launcher can marshal them.
// Grid (H / G, R, num_partitions): a block takes G heads that share a KV head (G in 1, 2, 4, 8);
// NUM_WARPS warps on the CUDA cores (attn_row), MMA_WARPS on the tensor cores (attn_row_mma).
// With num_partitions > 1 each block writes an unnormalised partial (acc, max, sum) to tmp_* and
// paged_attention_reduce combines them (split-context for long sequences).
#include "common.cuh"

#ifndef NUM_WARPS  // the CUDA-core path's warps (benchmarks/gpu_check.py times other values of these)
#define NUM_WARPS 4
#endif
#ifndef UNROLL  // tokens per lane group per tile
#define UNROLL 4
#endif
#ifndef STAGES  // tiles in the shared-memory ring (STAGES - 1 in flight while one is computed)
#define STAGES 2
#endif
#ifndef MMA_WARPS  // the tensor-core path's warps (kernels/launcher.py's MMA_WARPS)
#define MMA_WARPS 2
#endif
#ifndef MMA_STAGES  // its ring of tiles
#define MMA_STAGES 2
#endif
#ifndef USE_MMA  // 16-bit types with G > 1 on the tensor cores (0: everything on the CUDA cores)
#define USE_MMA 1
#endif

// N consecutive elements copied as one 16-byte vector: the cache is 16-byte aligned and every
// offset is a multiple of N elements.
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

struct AttnParams {
  i64 kv_stride;       // elements between K and V halves of the cache
  i64 q_stride;        // elements between query rows (views of a fused qkv projection)
  int num_heads, num_kv_heads, block_size, max_blocks;
  int num_seqs;        // B
  int partition_size;  // tokens per partition (multiple of NUM_WARPS not required)
  float scale;
};

// Which sequence a row belongs to and how many keys it sees (causal).
__device__ __forceinline__ void row_extent(const int* seq_lens, const int* qsl, int row, int num_seqs,
                                           int* seq, int* ctx) {
  if (qsl == nullptr) {  // decode: row == sequence, sees the whole context
    *seq = row;
    *ctx = seq_lens[row];
    return;
  }
  int lo = 0, hi = num_seqs - 1;  // last b with qsl[b] <= row
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (qsl[mid] <= row) lo = mid; else hi = mid - 1;
  }
  const int q_len = qsl[lo + 1] - qsl[lo];
  *seq = lo;
  *ctx = seq_lens[lo] - q_len + (row - qsl[lo]) + 1;  // query j sits at seq_len - q_len + j
}

// Sum over the TPG lanes of an aligned lane group (xor offsets below TPG stay inside it).
template <int TPG>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The end of a block: SLOTS partial softmaxes of G heads merged. sh holds m [SLOTS][G], then
// l [SLOTS][G], then acc [SLOTS][G][D]: SLOTS * G * (D + 2) floats.
// Thread j owns output elements j, j + blockDim.x, ... of the G x D tile; with one partition it
// writes the row's output, else the partition's (acc, max, sum) for paged_attention_reduce.
template <typename T, int D, int G, int SLOTS>
__device__ __forceinline__ void merge_slots(const float* sh, T* __restrict__ out, float* __restrict__ tmp_out,
                                            float* __restrict__ tmp_ml, int row, int h0, int num_heads) {
  const float* sh_m = sh;
  const float* sh_l = sh + SLOTS * G;
  const float* sh_acc = sh + 2 * SLOTS * G;
  const int part = blockIdx.z, num_parts = gridDim.z;
  for (int j = threadIdx.x; j < G * D; j += blockDim.x) {
    const int g = j / D, d = j % D;
    float gm = NEG_INF;
#pragma unroll
    for (int w = 0; w < SLOTS; ++w) gm = fmaxf(gm, sh_m[w * G + g]);
    float a = 0.f, gl = 0.f;
#pragma unroll
    for (int w = 0; w < SLOTS; ++w) {
      const float mw = sh_m[w * G + g];
      const float f = mw == NEG_INF ? 0.f : expf(mw - gm);
      a += sh_acc[(w * G + g) * D + d] * f;
      gl += sh_l[w * G + g] * f;
    }
    const i64 out_row = (i64)row * num_heads + h0 + g;
    if (num_parts == 1) {
      out[out_row * D + d] = from_f<T>(gl > 0.f ? a / gl : 0.f);  // ctx 0 (a padded row): zeros
    } else {
      const i64 pi = out_row * num_parts + part;
      tmp_out[pi * D + d] = a;
      if (d == 0) { tmp_ml[pi * 2] = gm; tmp_ml[pi * 2 + 1] = gl; }
    }
  }
}

// One block computes G query heads of one row that share a KV head (GQA): each K/V row is read
// once for all G heads, not once per head. G = 1 is one head per block.
//
// K/V stream through shared memory: tiles of TILE tokens, copied with cp.async STAGES - 1 tiles
// ahead of the one being computed, so the loads of later tiles are in flight while this one is
// computed (the kernel is bandwidth-bound; without this a warp waits for each load it issues).
// A K or V row of D elements is read from shared memory by a group of TPG lanes, EPL elements
// (16 bytes) each, so a warp reads TPW = 32 / TPG tokens per instruction. Each lane group
// ("slot") runs its own online softmax over tokens slot, slot + SLOTS, ...; the block merges the
// slots at the end.
template <typename T, int D, int G>
__device__ void attn_row(T* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ tmp_ml,
                         const T* __restrict__ q, const T* __restrict__ cache,
                         const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                         const int* __restrict__ qsl, AttnParams p) {
  constexpr int EPL = 16 / sizeof(T);  // elements per lane: one 16-byte load
  constexpr int TPG = D / EPL;         // lanes per token
  constexpr int TPW = 32 / TPG;        // tokens per warp instruction
  constexpr int SLOTS = NUM_WARPS * TPW;
  constexpr int TILE = SLOTS * UNROLL;  // tokens per tile: UNROLL per slot
  constexpr int CHUNKS = TILE * TPG;    // 16-byte pieces of a tile's K (and as many of its V)
  static_assert(TPG <= 32 && 32 % TPG == 0, "head size and element size give a lane group of 1-32 lanes");
  static_assert(CHUNKS % (NUM_WARPS * 32) == 0, "every thread copies the same number of chunks");
  // The ring of tiles, then (reused once the loop is done) the slots' (m, l, acc) for the merge.
  constexpr int RING = STAGES * 2 * CHUNKS;              // in 16-byte units
  constexpr int MERGE = (SLOTS * G * (D + 2) + 3) / 4;  // merge_slots' floats, in 16-byte units
  __shared__ Vec<float, 4> smem[RING > MERGE ? RING : MERGE];
  Vec<T, EPL>* ring = reinterpret_cast<Vec<T, EPL>*>(smem);  // [stage][K or V][token][TPG]

  const int h0 = blockIdx.x * G, row = blockIdx.y, part = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = warp * TPW + lane / TPG, sub = lane % TPG;
  int seq, ctx;
  row_extent(seq_lens, qsl, row, p.num_seqs, &seq, &ctx);
  const int kvh = h0 / (p.num_heads / p.num_kv_heads);
  const int t0 = part * p.partition_size;
  const int t1 = min(ctx, t0 + p.partition_size);
  const int num_tiles = t1 > t0 ? (t1 - t0 + TILE - 1) / TILE : 0;

  float qv[G][EPL], acc[G][EPL], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qrow = q + (i64)row * p.q_stride + (h0 + g) * D + sub * EPL;
#pragma unroll
    for (int i = 0; i < EPL; ++i) { qv[g][i] = to_f(qrow[i]) * p.scale; acc[g][i] = 0.f; }
    m[g] = NEG_INF;
    l[g] = 0.f;
  }

  const int* bt = block_table + (i64)seq * p.max_blocks;
  const i64 tok_stride = (i64)p.num_kv_heads * D;
  // Tile `tile` into its stage: chunk c = (token, piece); tokens past t1 are zero-filled.
  auto load_tile = [&](int tile) {
    Vec<T, EPL>* dst = ring + (tile % STAGES) * 2 * CHUNKS;
#pragma unroll
    for (int c = threadIdx.x; c < CHUNKS; c += NUM_WARPS * 32) {
      const int tt = t0 + tile * TILE + c / TPG;
      const bool valid = tt < t1;
      const i64 block = valid ? bt[tt / p.block_size] : 0;
      const i64 off = (block * p.block_size + tt % p.block_size) * tok_stride + (i64)kvh * D + (c % TPG) * EPL;
      cp_async16(dst + c, cache + off, valid);
      cp_async16(dst + CHUNKS + c, cache + p.kv_stride + off, valid);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();  // (an empty group past the end keeps the wait count below uniform)
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1);  // the stage freed last iteration
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // this thread's copies of `tile` have landed...
    __syncthreads();              // ...and everyone's
    const Vec<T, EPL>* kt = ring + (tile % STAGES) * 2 * CHUNKS;
    const int tbase = t0 + tile * TILE;
    Vec<T, EPL> kv[UNROLL], vv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int tok = slot + u * SLOTS;
      kv[u] = kt[tok * TPG + sub];
      vv[u] = kt[CHUNKS + tok * TPG + sub];
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s[UNROLL];
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) dot += qv[g][i] * to_f(kv[u].v[i]);
        s[u] = group_sum<TPG>(dot);  // every lane takes part (the shuffle needs the whole warp)
        if (tbase + slot + u * SLOTS < t1) m_new = fmaxf(m_new, s[u]);
      }
      // 0 at the first token (m = -inf); 1 while a slot has seen no token (both -inf)
      const float corr = m_new == NEG_INF ? 1.f : expf(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < EPL; ++i) acc[g][i] *= corr;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (tbase + slot + u * SLOTS < t1) {
          const float e = expf(s[u] - m_new);
          l[g] += e;
#pragma unroll
          for (int i = 0; i < EPL; ++i) acc[g][i] += e * to_f(vv[u].v[i]);
        }
      }
      m[g] = m_new;
    }
    __syncthreads();  // the stage is read: the next iteration may copy into it
  }
  cp_async_wait<0>();  // (only empty groups can be left; the ring memory is reused below)
  __syncthreads();

  float* sh = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (sub == 0) { sh[slot * G + g] = m[g]; sh[(SLOTS + slot) * G + g] = l[g]; }
#pragma unroll
    for (int i = 0; i < EPL; ++i) sh[2 * SLOTS * G + (slot * G + g) * D + sub * EPL + i] = acc[g][i];
  }
  __syncthreads();
  merge_slots<T, D, G, SLOTS>(sh, out, tmp_out, tmp_ml, row, h0, p.num_heads);
}

// The tensor-core path for 16-bit T (fp16, bf16): the same block (G heads of one row over one
// partition) with S = Q K^T and O += P V as mma.sync (fp32 accumulation). Q's G heads are the
// rows of A (rows G..15 are zero); each warp takes 8 tokens of every TILE-token tile (one n-tile
// of S, one k-step of P V). K/V tiles stream through shared memory with cp.async, MMA_STAGES - 1
// ahead; rows are padded by 16 bytes so ldmatrix's 8 row addresses fall in distinct banks. P is
// rounded to T for the P V product (as flash attention does).
template <typename T, int D, int G>
__device__ void attn_row_mma(T* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ tmp_ml,
                             const T* __restrict__ q, const T* __restrict__ cache,
                             const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                             const int* __restrict__ qsl, AttnParams p) {
  static_assert(G <= 8 && D % 32 == 0, "heads are the 8 rows a lane group holds; D in 32-column steps");
  constexpr int EPL = 16 / sizeof(T);
  constexpr int TOK = 8;                       // tokens per warp per tile
  constexpr int TILE = MMA_WARPS * TOK;
  constexpr int PITCH = D + EPL;               // elements per shared row (16 bytes of padding)
  constexpr int ROW_CHUNKS = D / EPL;          // 16-byte pieces of a row
  constexpr int STAGE = 2 * TILE * PITCH;      // elements: K rows, then V rows
  constexpr int RING = MMA_STAGES * STAGE * sizeof(T) / 16;  // in 16-byte units
  constexpr int MERGE = (MMA_WARPS * G * (D + 2) + 3) / 4;
  __shared__ Vec<float, 4> smem[RING > MERGE ? RING : MERGE];
  T* ring = reinterpret_cast<T*>(smem);

  const int h0 = blockIdx.x * G, row = blockIdx.y, part = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;  // mma fragment row (= head gid) and column pair
  int seq, ctx;
  row_extent(seq_lens, qsl, row, p.num_seqs, &seq, &ctx);
  const int kvh = h0 / (p.num_heads / p.num_kv_heads);
  const int t0 = part * p.partition_size;
  const int t1 = min(ctx, t0 + p.partition_size);
  const int num_tiles = t1 > t0 ? (t1 - t0 + TILE - 1) / TILE : 0;

  // A fragments of Q (m16n8k16): this lane's registers 0 and 2 (row gid, columns 2 tig (+8));
  // registers 1 and 3 are rows 8-15: zero. The bits are copied: q is not rounded again.
  unsigned qa[D / 16][2];
  const T* qrow = q + (i64)row * p.q_stride + (i64)(h0 + min(gid, G - 1)) * D;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int d = ks * 16 + tig * 2;
    qa[ks][0] = gid < G ? pack2_bits(qrow[d], qrow[d + 1]) : 0u;
    qa[ks][1] = gid < G ? pack2_bits(qrow[d + 8], qrow[d + 9]) : 0u;
  }
  float o[D / 8][4];  // C fragments of O: row gid (head), columns 8 n + 2 tig (+1); rows 8-15 unused
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = NEG_INF, l = 0.f;  // head gid's running max, and this lane's share of the sum

  const int* bt = block_table + (i64)seq * p.max_blocks;
  const i64 tok_stride = (i64)p.num_kv_heads * D;
  auto load_tile = [&](int tile) {
    T* dst = ring + (tile % MMA_STAGES) * STAGE;
#pragma unroll
    for (int c = threadIdx.x; c < TILE * ROW_CHUNKS; c += MMA_WARPS * 32) {
      const int tok = c / ROW_CHUNKS, piece = c % ROW_CHUNKS;
      const int tt = t0 + tile * TILE + tok;
      const bool valid = tt < t1;
      const i64 block = valid ? bt[tt / p.block_size] : 0;
      const i64 off = (block * p.block_size + tt % p.block_size) * tok_stride + (i64)kvh * D + piece * EPL;
      cp_async16(dst + tok * PITCH + piece * EPL, cache + off, valid);
      cp_async16(dst + (TILE + tok) * PITCH + piece * EPL, cache + p.kv_stride + off, valid);
    }
  };
#pragma unroll
  for (int s = 0; s < MMA_STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + MMA_STAGES - 1 < num_tiles) load_tile(tile + MMA_STAGES - 1);
    cp_async_commit();
    cp_async_wait<MMA_STAGES - 1>();
    __syncthreads();
    const T* ks_ = ring + (tile % MMA_STAGES) * STAGE + warp * TOK * PITCH;  // this warp's 8 K rows
    const T* vs_ = ks_ + TILE * PITCH;                                     // and V rows
    // S (8 heads x 8 tokens) = Q K^T over D: ldmatrix.x4 gives B fragments for two k-steps.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      unsigned b[4];
      ldmatrix_x4<false>(b, ks_ + (lane % 8) * PITCH + kk * 32 + (lane / 8) * 8);
      const unsigned a0[4] = {qa[2 * kk][0], 0u, qa[2 * kk][1], 0u};
      const unsigned a1[4] = {qa[2 * kk + 1][0], 0u, qa[2 * kk + 1][1], 0u};
      mma_16816<T>(sc, a0, b);
      mma_16816<T>(sc, a1, b + 2);
    }
    // Online softmax of head gid over this lane's two tokens; the quad (4 lanes) shares the head.
    const int tt = t0 + tile * TILE + warp * TOK + tig * 2;
    const float s0 = tt < t1 ? sc[0] * p.scale : NEG_INF;
    const float s1 = tt + 1 < t1 ? sc[1] * p.scale : NEG_INF;
    float mx = fmaxf(s0, s1);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float corr = m_new == NEG_INF ? 1.f : expf(m - m_new);  // 0 at the first token
    const float p0 = s0 == NEG_INF ? 0.f : expf(s0 - m_new);
    const float p1 = s1 == NEG_INF ? 0.f : expf(s1 - m_new);
    l = l * corr + p0 + p1;
    m = m_new;
    // O = O * corr + P V: P (8 heads x 8 tokens) is the A fragment of m16n8k8 as it stands in sc.
    const unsigned pa[2] = {pack2<T>(p0, p1), 0u};
#pragma unroll
    for (int nb = 0; nb < D / 32; ++nb) {
      unsigned b[4];
      ldmatrix_x4<true>(b, vs_ + (lane % 8) * PITCH + nb * 32 + (lane / 8) * 8);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float* c = o[nb * 4 + j];
        c[0] *= corr;
        c[1] *= corr;
        mma_1688<T>(c, pa, b[j]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  float* sh = reinterpret_cast<float*>(smem);
  if (gid < G) {
    if (tig == 0) { sh[warp * G + gid] = m; sh[(MMA_WARPS + warp) * G + gid] = l; }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float* a = sh + 2 * MMA_WARPS * G + (warp * G + gid) * D + n * 8 + tig * 2;
      a[0] = o[n][0];
      a[1] = o[n][1];
    }
  }
  __syncthreads();
  merge_slots<T, D, G, MMA_WARPS>(sh, out, tmp_out, tmp_ml, row, h0, p.num_heads);
}

// Grid (H, R); D threads. tmp_out (R, H, P, D) fp32, tmp_ml (R, H, P, 2) fp32 -> out (R, H, D).
template <typename T, int D>
__device__ void attn_reduce(T* __restrict__ out, const float* __restrict__ tmp_out,
                            const float* __restrict__ tmp_ml, int num_heads, int num_parts) {
  const i64 out_row = (i64)blockIdx.y * num_heads + blockIdx.x;
  const float* ml = tmp_ml + out_row * num_parts * 2;
  float gm = NEG_INF;
  for (int i = 0; i < num_parts; ++i) gm = fmaxf(gm, ml[2 * i]);
  const int d = threadIdx.x;
  float a = 0.f, gl = 0.f;
  for (int i = 0; i < num_parts; ++i) {
    const float mi = ml[2 * i];
    const float f = mi == NEG_INF ? 0.f : expf(mi - gm);
    a += tmp_out[(out_row * num_parts + i) * D + d] * f;
    gl += ml[2 * i + 1] * f;
  }
  out[out_row * D + d] = from_f<T>(gl > 0.f ? a / gl : 0.f);
}

// 16-bit types with several heads a block on the tensor cores (one head would use 1 row of 16);
// fp32 and single heads on the CUDA cores. kernels/launcher.py's attention_threads mirrors this.
template <typename T, int D, int G>
__device__ __forceinline__ void attn_dispatch(T* out, float* tmp_out, float* tmp_ml, const T* q, const T* cache,
                                              const int* block_table, const int* seq_lens, const int* qsl,
                                              AttnParams p) {
  if constexpr (sizeof(T) == 2 && USE_MMA && G > 1)
    attn_row_mma<T, D, G>(out, tmp_out, tmp_ml, q, cache, block_table, seq_lens, qsl, p);
  else
    attn_row<T, D, G>(out, tmp_out, tmp_ml, q, cache, block_table, seq_lens, qsl, p);
}

#define INSTANTIATE_G(T, NAME, D, G)                                                                \
  extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32, 2)                                   \
      paged_attention_##NAME##_d##D##_g##G(T* out, float* tmp_out, float* tmp_ml, const T* q,      \
                                    const T* cache, const int* block_table, const int* seq_lens,   \
                                    const int* qsl, i64 kv_stride, i64 q_stride, int num_heads, int num_kv_heads, \
                                    int block_size, int max_blocks, int num_seqs,                  \
                                    int partition_size, float scale) {                             \
    const AttnParams p = {kv_stride, q_stride, num_heads, num_kv_heads, block_size, max_blocks,    \
                          num_seqs, partition_size, scale};                                         \
    attn_dispatch<T, D, G>(out, tmp_out, tmp_ml, q, cache, block_table, seq_lens, qsl, p);         \
  }

#define INSTANTIATE(T, NAME, D)                                                                     \
  INSTANTIATE_G(T, NAME, D, 1)                                                                      \
  INSTANTIATE_G(T, NAME, D, 2)                                                                      \
  INSTANTIATE_G(T, NAME, D, 4)                                                                      \
  INSTANTIATE_G(T, NAME, D, 8)                                                                      \
  extern "C" __global__ void __launch_bounds__(D) paged_attention_reduce_##NAME##_d##D(            \
      T* out, const float* tmp_out, const float* tmp_ml, int num_heads, int num_parts) {           \
    attn_reduce<T, D>(out, tmp_out, tmp_ml, num_heads, num_parts);                                 \
  }

INSTANTIATE(float, float32, 64)
INSTANTIATE(float, float32, 128)
INSTANTIATE(Half, float16, 64)
INSTANTIATE(Half, float16, 128)
INSTANTIATE(BF16, bfloat16, 64)
INSTANTIATE(BF16, bfloat16, 128)
