// torch.ops.bitsmoe.huge_page_copy(t): a contiguous copy of t in memory that Linux backs with transparent huge pages
// (2 MiB), for the weights the CPU kernels stream through on every token. With 4 KiB pages a layer's read touches
// thousands of pages, each a TLB miss (a two-dimensional page walk under a hypervisor); measured faster on huge
// pages (benchmarks/README.md, design timings).
//
// The memory is its own mapping, 2 MiB-aligned, advised MADV_HUGEPAGE, so this works whatever the system's THP mode
// is short of "never" (the default "madvise" included). Tensors under 2 MiB get a plain copy: a caller may free
// the original either way.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

namespace {

constexpr size_t kHugePage = size_t{1} << 21;
constexpr size_t kPage = size_t{1} << 12;

at::Tensor huge_page_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "huge_page_copy: expected a CPU tensor, got one on ", t.device());
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < kHugePage) return t.clone(at::MemoryFormat::Contiguous);
  // map 2 MiB more than needed, then unmap what lies before the first 2 MiB boundary and after the tensor's pages
  const size_t mapped = (bytes + kPage - 1) / kPage * kPage;
  void* raw = mmap(nullptr, mapped + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "huge_page_copy: mmap of ", mapped + kHugePage,
              " bytes failed: ", std::strerror(errno));
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw), start = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (start > base) munmap(raw, start - base);
  munmap(reinterpret_cast<void*>(start + mapped), base + kHugePage - start);
  void* data = reinterpret_cast<void*>(start);
  if (madvise(data, mapped, MADV_HUGEPAGE) != 0)
    TORCH_WARN_ONCE("bitsmoe: madvise(MADV_HUGEPAGE) failed (", std::strerror(errno),
                    "): the CPU kernels' weights "
                    "stay on 4 KiB pages, ~5% slower where measured (a kernel without transparent huge pages?)");
  at::Tensor out = at::from_blob(data, t.sizes(), [mapped](void* p) { munmap(p, mapped); }, t.options());
  out.copy_(t);
  return out;
}

}  // namespace

// The schema is declared in bitsmoe_vllm/library.py.
TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) { m.impl("huge_page_copy", &huge_page_copy); }
