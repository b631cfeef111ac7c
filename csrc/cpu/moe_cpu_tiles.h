// The AMX tile configuration of the tile kernels (moe_cpu_amx.cpp, moe_cpu_amx_bf16.cpp). Included after their
// `#pragma GCC target` with amx-tile; internal linkage only.
#pragma once

#include <cstdint>

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

}  // namespace
