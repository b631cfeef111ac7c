// torch.ops.bitsmoe.huge_page_copy(t): a contiguous copy of t in memory that Linux backs with transparent huge pages
// (2 MiB), for the weights the CPU kernels stream through on every token. With 4 KiB pages a layer's read touches
// thousands of pages, each a TLB miss (a two-dimensional page walk under a hypervisor); measured faster on huge
// pages (benchmarks/README.md, design timings).
//
// The memory is its own mapping, 2 MiB-aligned, advised MADV_HUGEPAGE, so this works whatever the system's THP mode
// is short of "never" (the default "madvise" included). Tensors under 2 MiB get a plain copy: a caller may free
// the original either way.
// Also the kernels' scratch pool (scratch_pool.h): the same mappings, kept between calls.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "scratch_pool.h"

namespace {

constexpr size_t kHugePage = size_t{1} << 21;
constexpr size_t kPage = size_t{1} << 12;

// `bytes` (rounded up to 4 KiB pages) of fresh memory, 2 MiB-aligned and advised MADV_HUGEPAGE; unmap with munmap
void* map_huge(size_t bytes) {
  // map 2 MiB more than needed, then unmap what lies before the first 2 MiB boundary and after the pages asked for
  const size_t mapped = (bytes + kPage - 1) / kPage * kPage;
  void* raw = mmap(nullptr, mapped + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "bitsmoe: mmap of ", mapped + kHugePage, " bytes failed: ", std::strerror(errno));
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw), start = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (start > base) munmap(raw, start - base);
  munmap(reinterpret_cast<void*>(start + mapped), base + kHugePage - start);
  void* data = reinterpret_cast<void*>(start);
  if (madvise(data, mapped, MADV_HUGEPAGE) != 0)
    TORCH_WARN_ONCE("bitsmoe: madvise(MADV_HUGEPAGE) failed (", std::strerror(errno),
                    "): the CPU kernels' weights and scratch stay on 4 KiB pages, ~5% slower where measured (a kernel "
                    "without transparent huge pages?)");
  return data;
}

at::Tensor huge_page_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "huge_page_copy: expected a CPU tensor, got one on ", t.device());
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < kHugePage) return t.clone(at::MemoryFormat::Contiguous);
  // munmap takes the length unrounded: it unmaps every page the range touches
  at::Tensor out = at::from_blob(map_huge(bytes), t.sizes(), [bytes](void* p) { munmap(p, bytes); }, t.options());
  out.copy_(t);
  return out;
}

// The pool's free blocks: size and address.
struct Pool {
  std::mutex lock;
  std::vector<std::pair<size_t, void*>> free;
};
Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: blocks may come back from threads after exit begins
  return *p;
}

}  // namespace

bitsmoe::cpu::PooledBlock::PooledBlock(size_t bytes) {
  bytes = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
  {
    Pool& p = pool();
    const std::lock_guard<std::mutex> hold(p.lock);
    // the smallest free block that fits
    auto best = p.free.end();
    for (auto it = p.free.begin(); it != p.free.end(); ++it)
      if (it->first >= bytes && (best == p.free.end() || it->first < best->first)) best = it;
    if (best != p.free.end()) {
      std::tie(size_, data_) = *best;
      p.free.erase(best);
      return;
    }
    // none fits: the free blocks are all smaller, kept from smaller calls; unmapped, so that the pool holds about what
    // the largest calls use at once rather than every size it has seen
    for (const auto& [size, data] : p.free) munmap(data, size);
    p.free.clear();
  }
  size_ = bytes;
  data_ = map_huge(bytes);
}

bitsmoe::cpu::PooledBlock::~PooledBlock() {
  Pool& p = pool();
  const std::lock_guard<std::mutex> hold(p.lock);
  p.free.emplace_back(size_, data_);
}

// The schema is declared in bitsmoe_vllm/library.py.
TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) { m.impl("huge_page_copy", &huge_page_copy); }
