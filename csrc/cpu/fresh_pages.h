// Fresh output pages: faulting them in one 4 KiB page at a time on first write can cost more
// than a linear-time kernel computes (about 6 ms for the 19 MB of LLaVA-1.5's K and V on the
// development machine, against 2.5 ms of refinement). prefault_output() asks Linux for the
// whole 2 MiB-aligned interior of a large output at once, as transparent huge pages where the
// system allows them (MADV_HUGEPAGE, then MADV_POPULATE_WRITE: one call, one page-table walk).
// Memory that is already mapped (reused by the allocator) is left as it is. Best effort: any
// error (kernels before 5.14, THP disabled) leaves the pages to fault in as before.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvfix {

inline void prefault_output(const at::Tensor& t) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14), absent from older headers
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi < lo + 2 * kHuge) return;  // small outputs: nothing to gain
  void* p = reinterpret_cast<void*>(lo);
  const size_t n = hi - lo;
  const bool huge = madvise(p, n, MADV_HUGEPAGE) == 0;
  if (madvise(p, n, kPopulateWrite) != 0 && huge) madvise(p, n, MADV_NOHUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace kvfix
