// The register-blocked micro-kernel of the block-sparse products, written once over a vector type
// per instruction set (AVX-512: 16 floats, AVX2: 8, baseline: scalar), and the dispatch that
// compiles a body once per instruction set with the vector type as a template argument.
//
// FASTOPT_DISPATCH_BY_ISA (isa.h) compiles the same body for every variant; these kernels need
// the variant's vector width as a type, because the register tile (rows x vectors) depends on
// it. So FASTOPT_DISPATCH_BY_VECTOR passes the vector type to the one dispatch of isa.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/macros.h"
#include "cpu/isa.h"

// The tile helpers below take and return vector types without a target attribute of their own;
// GCC's note that their ABI differs between instruction sets is off for the whole build
// (-Wno-psabi in setup.py): they are always inlined into a variant of one instruction set.

namespace fastopt::cpu::blocksparse {

// Scalar "vectors": the baseline variant (the compiler may still vectorize it for SSE).
struct VecScalar {
  using T = float;
  static constexpr int kLanes = 1;
  static constexpr int kMaxVectors = 8;     // columns of the tile
  static constexpr int kAccumulators = 32;  // tile rows x columns
  FASTOPT_INLINE static T zero() { return 0.0f; }
  FASTOPT_INLINE static T load(const float* p) { return *p; }
  FASTOPT_INLINE static void store(float* p, T v) { *p = v; }
  FASTOPT_INLINE static void stream(float* p, T v) { *p = v; }
  template <int kIndex>
  FASTOPT_INLINE static T broadcast(const float* p) {
    return p[kIndex];
  }
  FASTOPT_INLINE static T fma(const T& a, const T& b, const T& c) { return a * b + c; }
};

#if defined(__x86_64__)

// GCC vector types rather than intrinsics: an intrinsic cannot be inlined into a helper without
// the target attribute (the tile helpers below are shared by all variants), while these plain
// operations are lowered to the instruction set of the variant they end up inlined into (a * b + c
// contracts to an FMA there). Declared outside the template: GCC drops vector_size from a
// dependent alias.
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats16 __attribute__((vector_size(64)));
typedef int Ints8 __attribute__((vector_size(32)));
typedef int Ints16 __attribute__((vector_size(64)));

template <typename Vector, typename LaneIndices>
struct VecGcc {
  using T = Vector;
  using Lanes = LaneIndices;  // the shuffle mask type of T
  static constexpr int kLanes = sizeof(Vector) / sizeof(float);
  FASTOPT_INLINE static T zero() { return T{}; }
  FASTOPT_INLINE static T load(const float* p) {
    T v;
    __builtin_memcpy(&v, p, sizeof(T));
    return v;
  }
  FASTOPT_INLINE static void store(float* p, const T& v) { __builtin_memcpy(p, &v, sizeof(T)); }
  // A store that bypasses the caches (p aligned to sizeof(T)): the line is not read first, and
  // the stored data does not evict the operands. Weakly ordered: end with stream_fence().
  FASTOPT_INLINE static void stream(float* p, const T& v) {
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<T*>(p)) : "v"(v));
  }
  // p[kIndex] in every lane: one broadcast load, its offset folded into the address. Written in
  // assembly because GCC builds the vector lane by lane with masked broadcasts from
  // `T{x, x, ...}` or a splat shuffle in the innermost loop, and `T{} + x` adds x to +0 first (to
  // honour -0). The asm reads memory it does not declare (an "m" operand makes GCC keep the
  // accumulators in memory, as if they could alias): correct here because what it reads (packed
  // panels, the weights' blocks) is never written while the kernels run.
  template <int kIndex>
  FASTOPT_INLINE static T broadcast(const float* p) {
    T v;
    asm("vbroadcastss %c2(%1), %0" : "=v"(v) : "r"(p), "i"(kIndex * sizeof(float)));
    return v;
  }
  FASTOPT_INLINE static T fma(const T& a, const T& b, const T& c) { return a * b + c; }
};

struct VecAvx2 : VecGcc<Floats8, Ints8> {
  static constexpr int kMaxVectors = 2;
  static constexpr int kAccumulators = 12;  // + up to 3 loaded vectors + 1 broadcast: 16 registers
};

struct VecAvx512 : VecGcc<Floats16, Ints16> {
  // 8 x 2 vectors for blocks of 64 too: a step of 4 x 4 reads four lines of the right panel
  // rather than two, and measured slower with the same 16 accumulators.
  static constexpr int kMaxVectors = 2;
  static constexpr int kAccumulators = 24;  // of 32 registers, leaving room for loads
};

#endif

// Orders the streaming stores (V::stream) issued so far before every later store.
FASTOPT_INLINE void stream_fence() {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
}

// Defines `static void name(const Args&)`, which runs `body<V>(args)` compiled for the active
// instruction set, V being that set's vector type (off x86-64, only the scalar call is compiled).
#define FASTOPT_DISPATCH_BY_VECTOR(name, body, Args)                                               \
  FASTOPT_DISPATCH_BY_VECTOR_WIDTH(name, Args, body<::fastopt::cpu::blocksparse::VecAvx512>(args), \
                                   body<::fastopt::cpu::blocksparse::VecAvx2>(args),               \
                                   body<::fastopt::cpu::blocksparse::VecScalar>(args))

// A power of two of at most 16 rows that `accumulators` accumulators hold, 4 at least: tile rows
// cut a block's rows or columns, so they must divide the block size.
constexpr int tile_rows(int accumulators) {
  return accumulators >= 16 ? 16 : accumulators >= 8 ? 8 : 4;
}

// The register tile of the sampled product (sdd): kRows rows of one output block by kVectors
// vectors of its columns (the block's width, or part of it when the registers cannot hold it).
template <typename V, int kBlock>
struct SddTile {
  static constexpr int kVectors = std::min(kBlock / V::kLanes, V::kMaxVectors);
  static constexpr int kColumns = kVectors * V::kLanes;
  static constexpr int kRows = tile_rows(V::kAccumulators / kVectors);
  static_assert(kBlock % kColumns == 0 && kBlock % kRows == 0);
};

// The register tile of the dsd products: kRows output features (rows or columns of one weight
// block, broadcast from it) by kVectors vectors of batch rows (loaded from a packed panel of
// kPanelRows rows). Wide: three vectors of batch rows, for batches beyond one vector; narrow: one,
// so that a small batch is not padded to three.
template <typename V, int kBlock, bool kWide>
struct DsdTile {
  static constexpr int kVectors = kWide ? 3 : 1;
  static constexpr int kRows = std::min(kBlock, tile_rows(V::kAccumulators / kVectors));
  static constexpr int kPanelRows = kVectors * V::kLanes;
  static_assert(kBlock % kRows == 0);
};

// DsdTile<V, *, wide>::kPanelRows of the active instruction set's V.
inline int64_t dsd_panel_rows(bool wide) {
  const int vectors = wide ? 3 : 1;
#if defined(__x86_64__)
  const Isa isa = active_isa();  // the choice of FASTOPT_DISPATCH_BY_VECTOR_WIDTH
  if (isa >= Isa::kAvx512) return vectors * VecAvx512::kLanes;
  if (isa >= Isa::kAvx2) return vectors * VecAvx2::kLanes;
#endif
  return vectors * VecScalar::kLanes;
}

// acc[m][v] = 0.
template <typename V, int kRows, int kVectors>
FASTOPT_INLINE void zero_tile(typename V::T (&acc)[kRows][kVectors]) {
  for (int m = 0; m < kRows; ++m) {
    for (int v = 0; v < kVectors; ++v) acc[m][v] = V::zero();
  }
}

// acc[m][:] += a[m] * b[:] for every row m of the tile, unrolled at compile time.
template <typename V, int kRowStride, int kVectors, int... kRow>
FASTOPT_INLINE void accumulate_rows(typename V::T (&acc)[sizeof...(kRow)][kVectors], const float* a,
                                    const typename V::T (&b)[kVectors],
                                    std::integer_sequence<int, kRow...>) {
  const auto row = [&]<int kM>(std::integral_constant<int, kM>) FASTOPT_INLINE_LAMBDA {
    const typename V::T am = V::template broadcast<kM * kRowStride>(a);
    for (int v = 0; v < kVectors; ++v) acc[kM][v] = V::fma(am, b[v], acc[kM][v]);
  };
  (row(std::integral_constant<int, kRow>{}), ...);
}

// acc[m][:] += sum over k < depth of a[k * lda + m * kRowStride] * b[k * ldb + :], the columns
// being the kVectors vectors from b. Each step loads kVectors vectors of b once and broadcasts
// kRows elements of a: kRows * kVectors FMAs for kRows + kVectors loads. With `next_b`, each
// step also prefetches the b of the call that follows (same shape), whose memory the hardware
// prefetcher cannot guess; `next_lines` and `more_lines` (the first `count` steps prefetch one
// line of each) spread the prefetches of other memory over the steps: issued together, more lines
// than the core can fetch at once would stall it.
struct PrefetchLines {
  const char* first = nullptr;
  int64_t stride = 0;
  int64_t count = 0;
};

template <typename V, int kRowStride, int kRows, int kVectors>
FASTOPT_INLINE void accumulate_tile(typename V::T (&acc)[kRows][kVectors], const float* a,
                                    int64_t lda, const float* b, int64_t ldb, int64_t depth,
                                    const float* next_b = nullptr, PrefetchLines next_lines = {},
                                    PrefetchLines more_lines = {}) {
  for (int64_t k = 0; k < depth; ++k) {
    typename V::T bk[kVectors];
    for (int v = 0; v < kVectors; ++v) bk[v] = V::load(b + k * ldb + v * V::kLanes);
    if (next_b) {
      for (int v = 0; v < kVectors; ++v) __builtin_prefetch(next_b + k * ldb + v * V::kLanes);
    }
    if (k < next_lines.count) __builtin_prefetch(next_lines.first + k * next_lines.stride);
    if (k < more_lines.count) __builtin_prefetch(more_lines.first + k * more_lines.stride);
    accumulate_rows<V, kRowStride>(acc, a + k * lda, bk, std::make_integer_sequence<int, kRows>{});
  }
}

// acc = the tile at p (row stride ld).
template <typename V, int kRows, int kVectors>
FASTOPT_INLINE void load_tile(typename V::T (&acc)[kRows][kVectors], const float* p, int64_t ld) {
  for (int m = 0; m < kRows; ++m) {
    for (int v = 0; v < kVectors; ++v) acc[m][v] = V::load(p + m * ld + v * V::kLanes);
  }
}

// Writes acc to out (row stride ldo) as float, the first `rows` rows only.
template <typename V, int kRows, int kVectors>
FASTOPT_INLINE void store_tile(const typename V::T (&acc)[kRows][kVectors], float* out, int64_t ldo,
                               int rows) {
  for (int m = 0; m < rows; ++m) {
    for (int v = 0; v < kVectors; ++v) V::store(out + m * ldo + v * V::kLanes, acc[m][v]);
  }
}

}  // namespace fastopt::cpu::blocksparse
