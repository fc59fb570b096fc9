// Weight buffers on transparent huge pages. The decode kernels stream every weight once per token; on 4 KB
// pages a 1-3 MB matrix costs hundreds of TLB misses and the hardware prefetcher restarts at every page.
#include "common.h"

#include <sys/mman.h>

#include <cstdlib>

namespace qwen35 {

// nbytes of uninitialised memory, 2 MB aligned, its whole 2 MB pages advised for huge pages (the tail stays on
// 4 KB pages, so no partly used 2 MB page is ever backed). Advice only: where the OS has none, 4 KB pages.
torch::Tensor huge_page_empty(int64_t nbytes) {
  constexpr int64_t kHuge = 2 << 20;
  void* p = nullptr;
  TORCH_CHECK(nbytes > 0 && posix_memalign(&p, kHuge, nbytes) == 0, "cannot allocate ", nbytes, " bytes");
  if (nbytes >= kHuge) madvise(p, nbytes / kHuge * kHuge, MADV_HUGEPAGE);
  return torch::from_blob(p, {nbytes}, [](void* q) { std::free(q); }, torch::dtype(torch::kUInt8));
}

}  // namespace qwen35
