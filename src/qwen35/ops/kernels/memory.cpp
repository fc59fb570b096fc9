// Weight and K/V buffers on transparent huge pages. The decode kernels stream every weight once per token; on 4 KB
// pages a 1-3 MB matrix costs hundreds of TLB misses and the hardware prefetcher restarts at every page.
#include "common.h"

#include <sys/mman.h>

#include <cstdint>

namespace qwen35 {

// nbytes of uninitialised memory, 2 MB aligned, its whole 2 MB pages advised for huge pages (the tail stays on
// 4 KB pages, so no partly used 2 MB page is ever backed). Advice only: where the OS has none, 4 KB pages. Its own
// mapping, never the heap's: freed, it goes back to the OS at once (from glibc's heap, a freed K/V buffer's pages
// stayed resident in the heap's free lists).
torch::Tensor huge_page_empty(int64_t nbytes) {
  constexpr int64_t kHuge = 2 << 20;
  TORCH_CHECK(nbytes > 0, "cannot allocate ", nbytes, " bytes");
  const int64_t size = (nbytes + 4095) / 4096 * 4096;  // whole 4 KB pages
  char* raw = static_cast<char*>(mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                      -1, 0));
  TORCH_CHECK(raw != MAP_FAILED, "cannot map ", nbytes, " bytes");
  char* p = raw + (kHuge - reinterpret_cast<uintptr_t>(raw) % kHuge) % kHuge;  // the slack each side unmapped
  if (p > raw) munmap(raw, p - raw);
  munmap(p + size, raw + kHuge - p);  // the tail: never empty, as p < raw + kHuge
  if (nbytes >= kHuge) madvise(p, nbytes / kHuge * kHuge, MADV_HUGEPAGE);
  return torch::from_blob(p, {nbytes}, [size](void* q) { munmap(q, size); }, torch::dtype(torch::kUInt8));
}

}  // namespace qwen35
