// The CPU kernels (moe_cpu_impl.h) for AVX2 with FMA and F16C: every x86-64 CPU of the last decade.
#include <immintrin.h>

#include <cmath>

#include "moe_cpu.h"

#pragma GCC target("avx2,fma,f16c")
#define BITSMOE_AVX512 0
#include "moe_cpu_impl.h"

const bitsmoe::cpu::Kernels bitsmoe::cpu::kAvx2 = {"avx2",        &expert_offsets, &basis_rows,
                                                   &gate_up_part, &activate,       &down};
