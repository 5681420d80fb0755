// The element loop of the streaming CPU kernels (optimizer steps, the traffic probe).
//
// Elements go in blocks; before each block the loop asks for the cache lines kPrefetchAhead
// elements further on, on every stream. The hardware prefetchers follow four or five streams
// less well while the core is busy with sqrt and division, so the lines of a stream can arrive
// late; the explicit requests are issued early enough to keep the memory pipes busy (the
// optimizer benchmarks and the traffic probe show the difference).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/macros.h"

namespace fastopt::cpu {

constexpr int64_t kPrefetchBlock = 64;    // elements per block
constexpr int64_t kPrefetchAhead = 1024;  // elements between the block and its prefetches

template <typename T>
FASTOPT_INLINE void prefetch_block_ahead(const T* stream, int64_t block_begin) {
  if (stream == nullptr) return;  // a state slot the kernel variant does not use
  // Prefetches never fault, so running past the end of a stream is harmless.
  const char* ahead = reinterpret_cast<const char*>(stream + block_begin + kPrefetchAhead);
  for (int64_t byte = 0; byte < kPrefetchBlock * int64_t(sizeof(T)); byte += 64) {
    __builtin_prefetch(ahead + byte);
  }
}

// body(block, j) for j in [0, count).
template <typename Body>
FASTOPT_INLINE void for_each_offset(int64_t block, int32_t count, const Body& body) {
  // Element i reads and writes index i of every stream only, so no iteration depends on
  // another: this spares the vectorized loop the run-time overlap checks between every pair of
  // streams that the compiler otherwise emits before each block (the streams' restrict
  // qualifiers do not reach it through the body's captures).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (int32_t j = 0; j < count; ++j) body(block, j);
}

// Calls body(block, j) for every element i = block + j in [begin, end), where `block` is the
// start of the element's block and j its offset in it (below kPrefetchBlock), prefetching
// `streams` (null ones skipped) ahead. The offset is a 32-bit counter so that a body that hashes
// the index (stochastic rounding) keeps 32-bit index lanes instead of narrowing 64-bit ones for
// every vector. `body` must be always-inline, as it runs inside a per-instruction-set variant
// (isa.h), and may touch only element i of each stream (the streams may be the same array, not
// overlap otherwise).
template <typename Body, typename... Streams>
FASTOPT_INLINE void prefetched_loop(int64_t begin, int64_t end, const Body& body,
                                    const Streams*... streams) {
  // Whole blocks run a loop of a constant trip count, which the compiler unrolls into straight
  // vector code with its constants set up once for all blocks; a loop of a run-time count
  // (the last block's) sets them up again on every entry.
  int64_t block = begin;
  for (; block + kPrefetchBlock <= end; block += kPrefetchBlock) {
    (prefetch_block_ahead(streams, block), ...);
    for_each_offset(block, int32_t(kPrefetchBlock), body);
  }
  for_each_offset(block, int32_t(end - block), body);
}

}  // namespace fastopt::cpu
