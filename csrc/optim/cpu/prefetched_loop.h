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

// Calls body(i) for every i in [begin, end), prefetching `streams` (null ones skipped) ahead.
// `body` must be always-inline, as it runs inside a per-instruction-set variant (isa.h), and may
// touch only element i of each stream (the streams may be the same array, not overlap otherwise).
template <typename Body, typename... Streams>
FASTOPT_INLINE void prefetched_loop(int64_t begin, int64_t end, const Body& body,
                                    const Streams*... streams) {
  for (int64_t block = begin; block < end; block += kPrefetchBlock) {
    (prefetch_block_ahead(streams, block), ...);
    // A 32-bit counter within the block lets the vectorized loop keep 32-bit index lanes where
    // the body narrows the index (stochastic rounding hashes it as 32 bits) instead of 64-bit
    // lanes it would have to narrow for every vector.
    const int32_t block_size = int32_t(std::min(kPrefetchBlock, end - block));
    // Element i reads and writes index i of every stream only, so no iteration depends on
    // another: this spares the vectorized loop the run-time overlap checks between every pair of
    // streams that the compiler otherwise emits before each block (the streams' restrict
    // qualifiers do not reach it through the body's captures).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
    for (int32_t j = 0; j < block_size; ++j) body(block + j);
  }
}

}  // namespace fastopt::cpu
