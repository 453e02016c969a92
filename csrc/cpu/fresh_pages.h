// Fresh output pages: faulting them in one 4 KiB page at a time on first write can cost more
// than a linear-time kernel computes (about 6 ms for the 19 MB of LLaVA-1.5's K and V on the
// development machine, against 2.5 ms of refinement). prefault_outputs() asks Linux for the
// pages of each output from 256 KiB on at once, as transparent huge pages where the system allows
// them (MADV_HUGEPAGE on the 2 MiB-aligned interior, then MADV_POPULATE_WRITE over the whole
// output, the 4 KiB pages outside the interior included: one call, one page-table walk), one call
// per output from the calling thread: huge pages populated from several threads at once were ~10x
// slower than from one on a 2-core Zen 4 VM (67 MB of outputs: 70-80 ms on 2 threads, 7.5 ms on
// one; 19 MB: 24-28 ms against ~3), where the calling thread also gets back the huge pages it
// freed. Where huge pages are off (transparent_hugepage "never"), the 4 KiB populate calls are
// split at 2 MiB boundaries and run on torch's intra-op threads (the kernel zeroes each page: 67
// MB on 2 threads 15 ms, on one 30 ms). Memory that is already mapped (reused by the allocator)
// is left as it is: an output whose pages are all resident (mincore) is not advised at all, since
// populating mapped pages still walks them one by one (19 MB: ~0.5 ms on the development machine,
// a tenth of the 24 x 24 banded refinement). Best effort: any error (kernels before 5.14, no THP
// support) leaves the pages to fault in as before.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvfix {

#if defined(__linux__)
// Whether every page of [p, p + n) (page-aligned p) is resident: mincore in 16 MiB steps, stopping
// at the first page that is not (or on any error).
inline bool pages_resident(uintptr_t p, size_t n) {
  constexpr size_t kPage = size_t(1) << 12, kStep = size_t(4096);  // pages per mincore call
  unsigned char vec[kStep];
  for (size_t off = 0; off < n; off += kStep * kPage) {
    const size_t len = std::min(n - off, kStep * kPage);
    if (mincore(reinterpret_cast<void*>(p + off), len, vec) != 0) return false;
    for (size_t i = 0; i < (len + kPage - 1) / kPage; ++i)
      if (!(vec[i] & 1)) return false;
  }
  return true;
}
#endif

// Whether transparent huge pages may be had (the "enabled" mode is "always" or "madvise"): read once.
inline bool huge_pages_on() {
#if defined(__linux__)
  static const bool on = [] {
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f == nullptr) return false;
    char buf[128] = {};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    return n > 0 && std::strstr(buf, "[never]") == nullptr;
  }();
  return on;
#else
  return false;
#endif
}

inline void prefault_outputs(const std::vector<at::Tensor>& ts) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21, kPage = uintptr_t(1) << 12;
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14), absent from older headers
  const bool huge = huge_pages_on();
  std::vector<std::pair<uintptr_t, uintptr_t>> pieces;  // [a, b): at most one huge page each (huge pages off)
  for (const at::Tensor& t : ts) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
    const uintptr_t lo = (begin + kPage - 1) & ~(kPage - 1), hi = end & ~(kPage - 1);
    if (hi < lo + 64 * kPage) continue;  // small outputs: nothing to gain
    if (pages_resident(lo, hi - lo)) continue;
    if (huge) {
      const uintptr_t hlo = (lo + kHuge - 1) & ~(kHuge - 1), hhi = hi & ~(kHuge - 1);
      const bool advised = hhi > hlo && madvise(reinterpret_cast<void*>(hlo), hhi - hlo, MADV_HUGEPAGE) == 0;
      if (madvise(reinterpret_cast<void*>(lo), hi - lo, kPopulateWrite) != 0 && advised)
        madvise(reinterpret_cast<void*>(hlo), hhi - hlo, MADV_NOHUGEPAGE);
      continue;
    }
    for (uintptr_t p = lo; p < hi;) {
      const uintptr_t q = std::min(hi, (p & ~(kHuge - 1)) + kHuge);
      pieces.emplace_back(p, q);
      p = q;
    }
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      madvise(reinterpret_cast<void*>(pieces[p].first), pieces[p].second - pieces[p].first, kPopulateWrite);
  });
#else
  (void)ts;
#endif
}

}  // namespace kvfix
