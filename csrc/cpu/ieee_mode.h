// The CPU kernels compute in the default IEEE mode whatever the calling thread set
// (torch.set_flush_denormal(True) sets flush-to-zero and denormals-are-zero): an
// IeeeMode sets x86's MXCSR to its power-on value (round to nearest, no flushing, every
// exception masked, flags clear) for its scope and restores the caller's after, flags
// and traps included (flags raised inside are dropped). ops.cpp opens one at each op's
// entry (the coefficients' conversions, the codebook build) and kernels.cpp in each
// parallel task (OpenMP workers have their own MXCSR). Otherwise a flushing mode makes
// the vector builds' bitwise max-abs and the scalar compare-based one disagree on
// subnormals, and results depend on which thread, with which mode, ran a block.
// Elsewhere than x86 the mode is left as it is.
#pragma once

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace distopt::cpu {

#if defined(__SSE__)
class IeeeMode {
 public:
  IeeeMode() : saved_(_mm_getcsr()) { _mm_setcsr(kDefault); }
  ~IeeeMode() { _mm_setcsr(saved_); }
  IeeeMode(const IeeeMode&) = delete;
  IeeeMode& operator=(const IeeeMode&) = delete;

 private:
  static constexpr unsigned kDefault = 0x1F80;
  unsigned saved_;
};
#else
struct IeeeMode {};
#endif

}  // namespace distopt::cpu
