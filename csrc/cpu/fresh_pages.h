// Fresh output pages: faulting them in one 4 KiB page at a time on first write can cost more
// than a linear-time kernel computes (about 6 ms for the 19 MB of LLaVA-1.5's K and V on the
// development machine, against 2.5 ms of refinement). prefault_output() asks Linux for the
// whole 2 MiB-aligned interior of a large output at once, as transparent huge pages where the
// system allows them (MADV_HUGEPAGE, then MADV_POPULATE_WRITE: one call, one page-table walk).
// prefault_outputs() does the same for several outputs from 256 KiB on (the 4 KiB pages outside
// the 2 MiB-aligned interior too: one call still beats a fault per page), the populate calls
// split at 2 MiB boundaries and run on torch's intra-op threads (the kernel zeroes each page:
// with T threads about T times faster than one call). Memory that is already mapped (reused by
// the allocator) is left as it is. Best effort: any error (kernels before 5.14, THP disabled)
// leaves the pages to fault in as before.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

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

inline void prefault_outputs(const std::vector<at::Tensor>& ts) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21, kPage = uintptr_t(1) << 12;
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14), absent from older headers
  std::vector<std::pair<uintptr_t, uintptr_t>> pieces;  // [a, b): at most one huge page each
  for (const at::Tensor& t : ts) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
    const uintptr_t lo = (begin + kPage - 1) & ~(kPage - 1), hi = end & ~(kPage - 1);
    if (hi < lo + 64 * kPage) continue;  // small outputs: nothing to gain
    const uintptr_t hlo = (lo + kHuge - 1) & ~(kHuge - 1), hhi = hi & ~(kHuge - 1);
    if (hhi > hlo) madvise(reinterpret_cast<void*>(hlo), hhi - hlo, MADV_HUGEPAGE);
    for (uintptr_t p = lo; p < hi;) {
      const uintptr_t q = std::min(hi, (p & ~(kHuge - 1)) + kHuge);
      pieces.emplace_back(p, q);
      p = q;
    }
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      void* a = reinterpret_cast<void*>(pieces[p].first);
      const size_t n = pieces[p].second - pieces[p].first;
      if (madvise(a, n, kPopulateWrite) != 0 && n == kHuge) madvise(a, n, MADV_NOHUGEPAGE);
    }
  });
#else
  (void)ts;
#endif
}

}  // namespace kvfix
