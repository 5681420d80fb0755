// The caller's handling of subnormal floats, carried into the threads of a parallel region.
//
// torch.set_flush_denormal(True) turns on flush-to-zero and denormals-are-zero in the calling
// thread only. Threads of torch's pool started before the call keep the modes they were started
// with, so a parallel region would flush in some of its threads and not in others: results that
// depend on which thread ran which piece, and most of the work left to the CPU's slow microcode
// assists for subnormal operands (an optimizer step over moments that decayed into the subnormal
// range, as those of a param whose grads stay zero do, runs several times slower). A region's
// work runs in the modes of the thread that called it instead.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastopt::cpu {

#if defined(__x86_64__) || defined(_M_X64)

// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) bits.
constexpr unsigned kDenormalModeBits = 0x8000u | 0x0040u;

// This thread's denormal modes.
inline unsigned denormal_modes() {
  return _mm_getcsr() & kDenormalModeBits;
}

// Runs f() with this thread's denormal modes set to `modes` (from denormal_modes()), then
// restores the thread's own, also if f throws.
template <typename F>
void with_denormal_modes(unsigned modes, const F& f) {
  const unsigned own = _mm_getcsr();
  const unsigned wanted = (own & ~kDenormalModeBits) | modes;
  if (wanted == own) return f();
  struct Restore {
    unsigned csr;
    ~Restore() { _mm_setcsr(csr); }
  } restore{own};
  _mm_setcsr(wanted);
  f();
}

#else  // other CPUs: torch.set_flush_denormal has no effect there either

inline unsigned denormal_modes() {
  return 0;
}

template <typename F>
void with_denormal_modes(unsigned, const F& f) {
  f();
}

#endif

// at::parallel_for(begin, end, grain, f), every chunk run in the calling thread's denormal modes.
template <typename F>
void parallel_for_in_callers_denormal_modes(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const unsigned callers_modes = denormal_modes();
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    with_denormal_modes(callers_modes, [&] { f(chunk_begin, chunk_end); });
  });
}

}  // namespace fastopt::cpu
