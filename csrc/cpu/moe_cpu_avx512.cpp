// The CPU kernels (moe_cpu_impl.h) for AVX-512; binding.cpp uses them only where the CPU reports avx512f.
// GCC 12 flags its own _mm512_undefined_* inside the intrinsics header (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>

#include "moe_cpu.h"

#pragma GCC target("avx512f,avx2,fma,f16c")
#define BITSMOE_AVX512 1
#include "moe_cpu_impl.h"

const bitsmoe::cpu::Kernels bitsmoe::cpu::kAvx512 = {"avx512",      &expert_offsets, &basis_rows,
                                                     &gate_up_part, &activate,       &down};
