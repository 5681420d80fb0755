// Runs an elementwise kernel over every element of many tensors in ONE parallel region.
//
// The tensors' elements are laid end to end and the range is cut into equal contiguous shares,
// one per thread, so a model of thousands of small tensors balances as well as one big tensor
// and pays for a single fork/join per step instead of one per tensor. Every piece runs in the
// caller's handling of subnormal floats (cpu/denormal_modes.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/denormal_modes.h"

namespace fastopt::cpu {

// Shares start on multiples of this many elements of the concatenated range, which keeps most
// shares from splitting a vector of the element loop (it does not align them to cache lines).
constexpr int64_t kShareAlignment = 16;
// Below this many elements in all, one thread does everything: forking costs more.
constexpr int64_t kMinElementsPerThread = 32768;

// Calls piece(tensor_index, begin, end) for element ranges [begin, end) of each tensor, such that
// together the calls cover every element of every tensor once. `numels[i]` is tensor i's size.
// A kernel whose unit is a block of elements rather than one passes block counts as `numels`,
// and as `min_per_thread` the blocks a thread must get at least.
template <typename PieceFn>
void for_each_piece_in_parallel(const std::vector<int64_t>& numels, const PieceFn& piece,
                                int64_t min_per_thread = kMinElementsPerThread) {
  std::vector<int64_t> offsets(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) offsets[i + 1] = offsets[i] + numels[i];
  const int64_t total = offsets.back();
  if (total == 0) return;

  const int64_t units = (total + kShareAlignment - 1) / kShareAlignment;
  const int64_t grain = std::max<int64_t>(1, min_per_thread / kShareAlignment);
  parallel_for_in_callers_denormal_modes(
      0, units, grain, [&](int64_t unit_begin, int64_t unit_end) {
        int64_t begin = unit_begin * kShareAlignment;
        const int64_t end = std::min(total, unit_end * kShareAlignment);
        // The last tensor whose range starts at or before `begin`.
        size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
        for (; begin < end; ++t) {
          const int64_t piece_end = std::min(end, offsets[t + 1]);
          if (piece_end > begin) piece(t, begin - offsets[t], piece_end - offsets[t]);
          begin = piece_end;
        }
      });
}

}  // namespace fastopt::cpu
