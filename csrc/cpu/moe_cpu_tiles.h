// The AMX tile configuration and the per-thread scratch of the tile kernels (moe_cpu_amx.cpp, moe_cpu_amx_bf16.cpp).
// Included after their `#pragma GCC target` with amx-tile; internal linkage only.
#pragma once

#include <cstdint>
#include <vector>

namespace {

// Palette 1 with tile t of rows[t] rows of colsb[t] bytes, loaded into this thread's tile configuration
inline void load_tile_config(const uint8_t (&rows)[8], const uint16_t (&colsb)[8]) {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = rows[t];
    config.colsb[t] = colsb[t];
  }
  _tile_loadconfig(&config);
}

// A 64-byte aligned scratch array of this thread, kept between calls and not zeroed: the kernels clear only the rows
// they read unwritten (zeroing a fresh 512 KiB of code values for every expert and projection is 128 MB at T = 512)
template <class T, int kSlot>
T* scratch(int64_t n) {
  thread_local std::vector<T> v;
  if (static_cast<int64_t>(v.size()) < n + 64) v.resize(n + 64);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

}  // namespace
