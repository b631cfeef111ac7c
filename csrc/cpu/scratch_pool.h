// Scratch memory for the CPU kernels' calls, kept between calls (huge_pages.cpp). Fresh memory for every call cost
// the page faults of its first touch: at 2,048 tokens of Qwen3-30B-A3B's shape a layer's ~340 MiB of scratch (the
// slots' activations and outputs above all) faulted in 4 KiB pages, a tenth of the call's time in the kernel. The
// pool hands out 2 MiB-aligned blocks on transparent huge pages and keeps those given back for the next calls, so it
// holds about what the largest call needed at once (~0.5 GB at 2,048 tokens of that shape); it unmaps free blocks
// only when a larger one is needed, and is never returned to the OS otherwise.
#pragma once

#include <cstddef>

namespace bitsmoe::cpu {

// A block of at least `bytes` bytes from the pool, uninitialized; back to the pool when destroyed
class PooledBlock {
 public:
  explicit PooledBlock(size_t bytes);
  ~PooledBlock();
  PooledBlock(const PooledBlock&) = delete;
  PooledBlock& operator=(const PooledBlock&) = delete;
  void* get() const { return data_; }

 private:
  size_t size_ = 0;
  void* data_ = nullptr;
};

}  // namespace bitsmoe::cpu
