// Per-token scales on the GPU, spec v2's scale_n = float32(alpha / sqrt(L d)): L counts the real
// (attention_mask != 0) tokens of the token's sub-sequence, which starts at its row's start, where
// position_ids is 0 and at each cu_seqlens entry; 0 where a token gets no noise. Included by
// noisy_embedding.cu (launches) and tests/support/cuda_emulator.cpp (which runs each block's
// threads concurrently, so that __syncthreads and shared memory mean what they mean on a GPU).
//
// A block takes a tile of kScaleTile tokens of one row, kScaleTokens consecutive tokens per thread.
// Per thread a Span summarises its tokens; block scans of Spans give each thread the real tokens
// before and after it up to the nearest starts. A sub-sequence that crosses the tile's edge adds
// what the neighbouring tiles' summaries (tile_summary_kernel, a launch before) count, read a
// block's width of tiles at a time: a long packed row is spread over many blocks, none serialised.
#pragma once

#include <cstdint>

#include "../scale.h"            // scale_of, NEFT_HD
#include "dependent_launch.cuh"  // allow_dependents, wait_for_prerequisites
#include "noisy_embedding.h"     // SideView, ScaleArgs

namespace neft::cuda {

using neft::ScaleArgs;
using neft::SideView;

#ifndef NEFT_SCALE_THREADS  // the emulated tests build with fewer, so that short rows cross tiles and windows
#define NEFT_SCALE_THREADS 256
#endif
constexpr int kScaleThreads = NEFT_SCALE_THREADS;
// Consecutive tokens per thread (fewer than 32: 32-bit masks built by 1u << n): a tile of 4096 tokens, so
// that rows of up to 4096 need no summary launch.
constexpr int kScaleTokens = 16;
static_assert(kScaleTokens < 32, "per-thread token masks are 32-bit words built by 1u << n");
constexpr int64_t kScaleTile = kScaleThreads * kScaleTokens;  // tokens of a row per block

// fn(T{}) with T the signed integer type of a side input's element size: only == 0 / != 0 matters,
// and cu_seqlens' int32 or int64 values, which the size alone decides.
template <typename Fn>
__device__ inline auto with_side_type(const SideView& v, Fn&& fn) {
  switch (v.bytes) {
    case 1:
      return fn(int8_t{});
    case 2:
      return fn(int16_t{});
    case 4:
      return fn(int32_t{});
    default:
      return fn(int64_t{});
  }
}

// A side input's element i.
__device__ inline int64_t side_at(const SideView& v, int64_t i) {
  return with_side_type(v, [&](auto zero) -> int64_t { return static_cast<const decltype(zero)*>(v.data)[i]; });
}

// Real tokens of a span of a row: head = before its first sub-sequence start (all of them where
// none starts in it), tail = from its last start on. join is associative, with {0, 0, false} as
// identity: scans and reductions over spans in token order.
struct Span {
  int64_t head = 0, tail = 0;
  bool has_start = false;
};

__device__ inline Span join(const Span& a, const Span& b) {
  Span s;
  s.head = a.has_start ? a.head : a.head + b.head;
  s.tail = b.has_start ? b.tail : (a.has_start ? a.tail + b.head : 0);
  s.has_start = a.has_start || b.has_start;
  return s;
}

// Tile summaries in global memory: (head, tail), tail = -1 where no sub-sequence starts in the tile.
__device__ inline Span load_span(const int64_t* p) { return {p[0], p[1] < 0 ? 0 : p[1], p[1] >= 0}; }

// Whether each token starts a sub-sequence at a cu_seqlens entry, asked in ascending column order
// from first_col on.
struct CuStarts {
  const ScaleArgs& a;
  int64_t row, k = 0;  // k: first cu_seqlens entry not below the last flat index asked
  __device__ CuStarts(const ScaleArgs& args, int64_t r, int64_t first_col) : a(args), row(r) {
    const int64_t flat = r * a.width + first_col;
    int64_t lo = 0, hi = a.n_cu;  // entries ascend: binary search
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (side_at(a.cu_seqlens, mid * a.cu_seqlens.s1) < flat)
        lo = mid + 1;
      else
        hi = mid;
    }
    k = lo;
  }
  __device__ bool operator()(int64_t c) {
    const int64_t flat = row * a.width + c;
    while (k < a.n_cu && side_at(a.cu_seqlens, k * a.cu_seqlens.s1) < flat) ++k;
    return k < a.n_cu && side_at(a.cu_seqlens, k * a.cu_seqlens.s1) == flat;
  }
};

// This thread's tokens of the block's tile: [c0, c1) of row r (empty past the row's end).
struct ThreadTokens {
  int64_t r, tile, c0, c1;
};

__device__ inline ThreadTokens thread_tokens(const ScaleArgs& a, int64_t tiles_per_row) {
  ThreadTokens t;
  t.r = blockIdx.x / tiles_per_row;
  t.tile = blockIdx.x - t.r * tiles_per_row;
  t.c0 = t.tile * kScaleTile + static_cast<int64_t>(threadIdx.x) * kScaleTokens;
  t.c1 = t.c0 + kScaleTokens < a.width ? t.c0 + kScaleTokens : a.width;
  if (t.c0 > t.c1) t.c0 = t.c1;
  return t;
}

// Bit j set where element (r, c0 + j) of a side input is nonzero, for j < n. The element type is
// chosen once and all n loads issue before any is tested: one memory latency per thread, not n.
__device__ inline uint32_t nonzero_bits(const SideView& v, int64_t r, int64_t c0, int n) {
  return with_side_type(v, [&](auto zero) {
    using T = decltype(zero);
    const T* p = static_cast<const T*>(v.data) + r * v.s0 + c0 * v.s1;
    T x[kScaleTokens];
#pragma unroll
    for (int j = 0; j < kScaleTokens; ++j) x[j] = j < n ? p[j * v.s1] : T(0);
    uint32_t b = 0;
#pragma unroll
    for (int j = 0; j < kScaleTokens; ++j) b |= static_cast<uint32_t>(x[j] != 0) << j;
    return b;
  });
}

// This thread's tokens, read once: bit j of start / real / noised for token c0 + j (bits, not
// arrays: registers, not local memory). noised: the noise mask's bits (real ones still count
// towards L).
struct TokenFlags {
  uint32_t start = 0, real = 0, noised = 0;
  int n = 0;
};

__device__ inline TokenFlags token_flags(const ScaleArgs& a, const ThreadTokens& t) {
  TokenFlags f;
  f.n = static_cast<int>(t.c1 - t.c0);
  if (f.n == 0) return f;
  const uint32_t all = (1u << f.n) - 1u;  // f.n <= kScaleTokens < 32
  f.real = a.mask.data ? nonzero_bits(a.mask, t.r, t.c0, f.n) : all;
  f.noised = a.noise_mask.data ? nonzero_bits(a.noise_mask, t.r, t.c0, f.n) : all;
  f.start = t.c0 == 0 ? 1u : 0u;
  if (a.positions.data) f.start |= ~nonzero_bits(a.positions, t.r, t.c0, f.n) & all;  // position 0 starts one
  if (a.cu_seqlens.data) {
    CuStarts starts(a, t.r, t.c0);
    for (int j = 0; j < f.n; ++j) f.start |= static_cast<uint32_t>(starts(t.c0 + j)) << j;
  }
  return f;
}

__device__ inline Span span_of(const TokenFlags& f) {
  Span s;
  for (int j = 0; j < f.n; ++j) {
    if (f.start >> j & 1u) {
      s.has_start = true;
      s.tail = 0;
    }
    const int64_t real = f.real >> j & 1u;
    if (s.has_start)
      s.tail += real;
    else
      s.head += real;
  }
  return s;
}

// Scans over the block, one barrier a step: fwd[0][t] becomes the join of fwd[0][0..t] and, where
// bwd is given, bwd[0][t] the join of bwd[0][t..]. Each ping-pongs with its [1] buffer, so that a
// step reads one buffer while it writes the other.
__device__ inline void block_scan(Span* const fwd[2], Span* const bwd[2] = nullptr) {
  const int t = threadIdx.x;
  int in = 0;
#pragma unroll  // constant buffer indices: the pointer pairs stay in registers, not on the stack
  for (int step = 1; step < kScaleThreads; step *= 2, in ^= 1) {
    fwd[in ^ 1][t] = t >= step ? join(fwd[in][t - step], fwd[in][t]) : fwd[in][t];
    if (bwd) bwd[in ^ 1][t] = t + step < kScaleThreads ? join(bwd[in][t], bwd[in][t + step]) : bwd[in][t];
    __syncthreads();
  }
  if (in) {  // an odd number of steps left the result in [1]
    fwd[0][t] = fwd[1][t];
    if (bwd) bwd[0][t] = bwd[1][t];
    __syncthreads();
  }
}

// Launch 1 of 2, for rows longer than a tile: one block per (row, tile), tiles[row, tile] = the tile's Span.
// (Shared Spans are not initialised on a GPU, whatever Span's member initialisers say: every slot
// is written before it is read.)
__global__ void tile_summary_kernel(ScaleArgs a, int64_t tiles_per_row, int64_t* tiles) {
  allow_dependents();  // the scales kernel reads the summaries only after its wait
  __shared__ Span spans[2][kScaleThreads];
  Span* const scan[2] = {spans[0], spans[1]};
  const ThreadTokens t = thread_tokens(a, tiles_per_row);
  spans[0][threadIdx.x] = span_of(token_flags(a, t));
  __syncthreads();
  block_scan(scan);
  if (threadIdx.x == kScaleThreads - 1) {
    const Span& s = spans[0][threadIdx.x];
    int64_t* out = tiles + 2 * static_cast<int64_t>(blockIdx.x);
    out[0] = s.head;
    out[1] = s.has_start ? s.tail : -1;
  }
}

// The join of tiles [lo, hi) of a row, in token order, a block's width of tiles per step. Block-uniform.
__device__ inline Span join_tiles(const int64_t* row_tiles, int64_t lo, int64_t hi, Span* const scratch[2]) {
  const int64_t i = lo + threadIdx.x;
  scratch[0][threadIdx.x] = i < hi ? load_span(row_tiles + 2 * i) : Span{};
  __syncthreads();
  block_scan(scratch);
  const Span s = scratch[0][kScaleThreads - 1];
  __syncthreads();  // scratch is reused
  return s;
}

// One block per (row, tile): out[n] = the scale of each token. tiles: launch 1's summaries, or
// nullptr where a row fits in one tile.
__global__ void token_scales_kernel(ScaleArgs a, int64_t tiles_per_row, const int64_t* tiles, float* out) {
  // before[0] / after[0]: the forward / backward scans' results; [1] their ping-pong buffers,
  // then the tile joins' scratch.
  __shared__ Span before[2][kScaleThreads], after[2][kScaleThreads];
  Span* const fwd[2] = {before[0], before[1]};
  Span* const bwd[2] = {after[0], after[1]};
  Span* const scratch[2] = {before[1], after[1]};
  allow_dependents();  // the rows kernel reads the scales only after its wait
  const ThreadTokens t = thread_tokens(a, tiles_per_row);
  const TokenFlags f = token_flags(a, t);
  before[0][threadIdx.x] = after[0][threadIdx.x] = span_of(f);
  __syncthreads();
  block_scan(fwd, bwd);
  // Real tokens since the last start before the tile, and until the next start after it.
  int64_t carry_in = 0, carry_out = 0;
  if (tiles != nullptr) {
    wait_for_prerequisites();  // launched after the summaries' kernel, perhaps while it runs
    const int64_t* row_tiles = tiles + 2 * t.r * tiles_per_row;
    Span left;  // tiles before this one, nearest first, until one holds a start
    for (int64_t hi = t.tile; hi > 0 && !left.has_start; hi -= kScaleThreads)
      left = join(join_tiles(row_tiles, hi > kScaleThreads ? hi - kScaleThreads : 0, hi, scratch), left);
    carry_in = left.has_start ? left.tail : left.head;
    Span right;
    for (int64_t lo = t.tile + 1; lo < tiles_per_row && !right.has_start; lo += kScaleThreads)
      right = join(right, join_tiles(row_tiles, lo,
                                     lo + kScaleThreads < tiles_per_row ? lo + kScaleThreads : tiles_per_row, scratch));
    carry_out = right.head;
  }
  if (f.n == 0) return;
  // Around this thread's tokens: the spans before and after it, tile edges included.
  const Span left = threadIdx.x > 0 ? before[0][threadIdx.x - 1] : Span{};
  const Span right = threadIdx.x + 1 < kScaleThreads ? after[0][threadIdx.x + 1] : Span{};
  const int64_t real_before = left.has_start ? left.tail : carry_in + left.head;
  const int64_t real_after = right.has_start ? right.head : right.head + carry_out;

  const double alpha = a.alpha_ptr ? *a.alpha_ptr : a.alpha;
  for (int p = 0; p < f.n;) {  // each piece [p, q) of a sub-sequence among this thread's tokens
    int q = p + 1;
    while (q < f.n && !(f.start >> q & 1u)) ++q;
    int64_t count = 0;
    for (int j = p; j < q; ++j) count += f.real >> j & 1u;
    if (p == 0 && !(f.start & 1u)) count += real_before;
    if (q == f.n) count += real_after;
    const float scale = a.d > 0 ? neft::scale_of(alpha, count, a.d) : 0.0f;
    for (int j = p; j < q; ++j) out[t.r * a.width + t.c0 + j] = (f.real & f.noised) >> j & 1u ? scale : 0.0f;
    p = q;
  }
}

// Launch shape: blocks per row; rows of several tiles need launch 1 first, and its workspace.
inline int64_t scale_tiles_per_row(int64_t width) { return (width + kScaleTile - 1) / kScaleTile; }
inline int64_t scale_workspace(int64_t rows, int64_t width) {
  const int64_t tiles = scale_tiles_per_row(width);
  return tiles > 1 ? 2 * rows * tiles : 0;
}

}  // namespace neft::cuda
