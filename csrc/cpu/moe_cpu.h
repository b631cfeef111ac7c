// The CPU kernels of a BitsMoE layer (FORMAT.md section 4), one set per instruction set: moe_cpu_impl.h compiled
// for AVX-512 (moe_cpu_avx512.cpp) and for AVX2 (moe_cpu_avx2.cpp); binding.cpp picks one from the CPU's flags at
// run time and splits the work across threads. No torch headers: plain pointers and sizes, shapes checked by the
// binding.
//
//   z = B x                              basis_rows     (skipped for identity bases)
//   h = (F_g^T z_g, F_u^T z_u)           gate_up_part   per (expert, share of the rank rows), on the packed codes
//   a = act(h_g + b_g, h_u + b_u)        activate       per expert, the shares summed in a fixed order
//   u = F_d a                            down           per (expert, block of rank rows), on the packed codes
//   t = sum_k w_k u_k; y = B_d t         in the binding (fixed order), then basis_rows
#pragma once

#include <cstdint>

namespace bitsmoe::cpu {

// The CPU layout's constants, defined once for the kernels; bitsmoe_vllm/cpu_layout.py, which writes the layout,
// compares its own with these (torch.ops.bitsmoe.cpu_layout_constants) when the library is loaded.
constexpr int kClassWidths[] = {8, 6, 4, 3, 2, 1};  // the width classes of a CpuFactors' segs, widest first
constexpr int kGroupsPerBlock = 32;                 // gate/up 4-row groups rounded with one scale: 128 rank rows
constexpr int kDownGroupRows = 16;                  // rows of a down group: the 16 int32 lanes of a vector

// A basis (or any row-major matrix to multiply by): rows [n, in]; float16, bfloat16, int8 with a float16 scale per
// row, or float32.
enum class BasisType : int { kFloat16, kBFloat16, kInt8, kFloat32 };
struct Basis {
  const void* weight;
  const uint16_t* scale;  // int8 only: float16 [n]
  BasisType type;
  int64_t n, in;
};

// One projection's factors, all local experts (FORMAT.md): codes [planes, words] bit planes of 32 columns each,
// scales [stored rows, groups] float16, bits [E, R]. plane_at / row_at [E + 1]: each expert's first plane and first
// stored row.
struct Factors {
  const uint32_t* codes;
  const uint16_t* scales;
  const uint8_t* bits;
  const int64_t* plane_at;
  const int64_t* row_at;
  int64_t R, words, groups, group_words;  // words = I / 32, group_words = G / 32
  bool odd;                               // odd codes up to 6 bits (format version 2)
};

// The tokens one expert serves: n of them, token[j] (row of x) and slot[j] (token * K + choice).
struct Tokens {
  const int64_t* token;
  const int64_t* slot;
  int64_t n;
};

// The experts' activation (bitsmoe_vllm/activation.py): silu(h_g) * h_u, or gpt-oss's swigluoai with its alpha and
// limit; the biases [E, I] float32 (nullptr: none) added to h_g and h_u first.
struct Activation {
  bool swigluoai;
  float alpha, limit;
  const float* gate_bias;
  const float* up_bias;
};

struct Kernels {
  const char* name;
  // plane_at, row_at [E + 1]: the first plane and first stored row of each expert, from bits [E, R]
  void (*expert_offsets)(const uint8_t* bits, int64_t E, int64_t R, int64_t* plane_at, int64_t* row_at);
  // out[t, r] = sum_i B[r, i] x[t, i] for rows r in [r0, r1); x [T, B.in], out [T, B.n] float32
  void (*basis_rows)(const Basis& b, const float* x, int64_t T, float* out, int64_t r0, int64_t r1);
  // One expert's pre-activations from part `part` of `parts` equal shares of each factor's rank rows:
  // h [2, n, I] = (F_g^T z_g, F_u^T z_u) of its tokens, summed over those rows only. z_g [T, g.R], z_u [T, u.R].
  void (*gate_up_part)(const Factors& g, const Factors& u, int64_t e, const float* z_g, const float* z_u,
                       const Tokens& tk, int64_t part, int64_t parts, float* h);
  // a[slot j] = act(h_g[j], h_u[j]) of expert e, the parts of h [parts, 2, n, I] summed in order; a [slots, I]
  void (*activate)(const float* h, int64_t parts, const Tokens& tk, int64_t I, const Activation& act, int64_t e,
                   float* a);
  // u[slot, r] = sum_c F_d[r, c] a[slot, c] for rank rows r in [r0, r1); u [slots, d.R] (rows with 0 bits untouched)
  void (*down)(const Factors& d, int64_t e, const float* a, const Tokens& tk, int64_t r0, int64_t r1, float* u);
};

extern const Kernels kAvx512;
extern const Kernels kAvx2;

// ---- the integer path (AVX-512 VNNI, BW, VBMI, GFNI), on the CPU layout of bitsmoe_vllm/cpu_layout.py -------------
//
// Activations are rounded to 16-bit integers, q = 256 hi + lo with hi and lo signed bytes, one scale per (128 rank
// rows, column group) for gate/up, per (slot, column group) for down and per token for int8 bases; codes are decoded
// to bytes (int8 bases: their sign bit flipped), and each vpdpbusd adds 64 code x byte products (once for hi, once
// for lo).

// Factors in the CPU layout: each expert's stored rows grouped by width (8, 6, 4, 3, 2, 1 bits), each class padded
// to a multiple of the group size with rows of rank -1 and scale 0; per group, plane and chunk of columns, one
// uint64 mask. scales [I/G, rows] float16 (column-group major), rows [rows] int32: each row's rank index (-1 for
// padding). segs [E, 6, 3] int32: for each (expert, width class) its first group, number of groups and first mask
// row (`chunks` masks make a row). The masks end with at least 64 bytes of zeros: a chunk's planes are read as one
// 64-byte load.
// - gate and up: 4-row groups, chunks of 16 columns; bit 4j + r of a mask is its plane's bit of column 16c + j of
//   the group's row r. A class's groups are taken 32 at a time (a block, the last one shorter), a block's masks
//   ordered [tile, group, chunk in the tile, plane], a tile being tile_chunks chunks (8, 4 or 2: the most that
//   divides a column group).
// - down: 16-row groups, chunks of 4 columns; bit 4i + c of a mask is its plane's bit of column 4m + c of the
//   group's row i; a group's masks ordered [chunk, plane].
struct CpuFactors {
  const uint64_t* masks;
  const uint16_t* scales;
  const int32_t* rows;
  const int32_t* segs;
  int64_t R, chunks, groups, group_chunks, tile_chunks,
      stored_rows;  // chunks per row of masks, groups = I/G, stored_rows = rows' length
  bool odd;         // odd codes up to 6 bits (format version 2)
};

// Rows of activations [rows, I] as 16-bit integers: hi, lo [rows, I] int8; per (row, column group) its scale and the
// sum of its values as rounded (scale * sum of q), [rows, groups] float32.
struct QuantizedRows {
  int8_t* hi;
  int8_t* lo;
  float* scale;
  float* sum;
  int64_t I, groups;
};

struct VnniKernels {
  const char* name;
  // x [rows, q.I] rounded into q, one scale per (row, column group)
  void (*round)(const float* x, int64_t rows, const QuantizedRows& q);
  // As Kernels::basis_rows for an int8 basis in the CPU basis layout of bitsmoe_vllm/cpu_layout.py (the rows in
  // blocks of 4, each block stored one 64-column chunk after the other, each chunk the block's rows side by side), on
  // x [T, b.in] rounded by `round` with one group per row; r0 a multiple of 4
  void (*int8_rows)(const Basis& b, const QuantizedRows& x, int64_t T, float* out, int64_t r0, int64_t r1);
  // As Kernels::gate_up_part, on the CPU layout; a part is a share of each expert's 4-row groups.
  void (*gate_up_part)(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                       const Tokens& tk, int64_t part, int64_t parts, float* h);
  // As Kernels::activate into a [slots, I] (float32), then those rows rounded to 16-bit integers into q
  void (*activate)(const float* h, int64_t parts, const Tokens& tk, const Activation& act, int64_t e, float* a,
                   const QuantizedRows& q);
  // As Kernels::down on the rounded activations, for part `part` of `parts` equal shares of expert e's 16-row groups
  void (*down)(const CpuFactors& d, int64_t e, const QuantizedRows& a, const Tokens& tk, int64_t part, int64_t parts,
               float* u);
};

extern const VnniKernels kAvx512Vnni;

// ---- AMX tiles (AMX-TILE, AMX-INT8) for the experts with many tokens ---------------------------------------------
//
// The same integer sums as the VNNI kernels (tdpbsud: the activations' signed bytes times the decoded codes), 16
// tokens x 16 columns x 64 codes per instruction: an expert's codes are decoded once into tiles that all its tokens
// share, where the VNNI kernels decode them again for every 4 tokens. The float steps around the sums (the scales,
// the offsets, their order) are the VNNI kernels'.
struct TileKernels {
  const char* name;
  int64_t min_tokens;        // the experts with fewer tokens run the VNNI kernels' gate/up
  int64_t min_down_tokens;   // ... and their down
  int64_t min_basis_tokens;  // the calls with fewer tokens multiply the int8 bases on VNNI
  // As VnniKernels::int8_rows for rows r0 to r1, multiples of 16 within the basis' whole blocks of 4 rows, where
  // b.in is a multiple of 64 and x's rows are readable up to the next multiple of 16 tokens
  void (*int8_rows)(const Basis& b, const QuantizedRows& x, int64_t T, float* out, int64_t r0, int64_t r1);
  // As VnniKernels::gate_up_part and VnniKernels::down
  void (*gate_up_part)(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                       const Tokens& tk, int64_t part, int64_t parts, float* h);
  void (*down)(const CpuFactors& d, int64_t e, const QuantizedRows& a, const Tokens& tk, int64_t part, int64_t parts,
               float* u);
};

extern const TileKernels kAmx;

// Whether the CPU has AMX-TILE and AMX-INT8 and the OS lets this process use the tile state (asked once, with
// arch_prctl(ARCH_REQ_XCOMP_PERM), as Linux requires before the first tile instruction).
bool amx_usable();

// ---- AMX-BF16 tiles for bfloat16 layers -------------------------------------------------------------------------
//
// In place of TileKernels' kernels where the layer's input is bfloat16 (its precision is the input's): gate/up with
// z times the scales rounded to bfloat16, the codes' values exact, and float sums over all of a part's rank rows
// (tdpbf16ps); down with the activations rounded to bfloat16 and one float sum per column group. Same arguments and
// results as VnniKernels' gate_up_part and down, to bfloat16's precision.
struct Bf16TileKernels {
  int64_t min_down_tokens;  // the experts with fewer tokens (and at least kAmx.min_down_tokens) run kAmx's down
  // gate/up holds a part's z for every token of the expert twice (float, and times the scales in bfloat16): z_bytes a
  // token and rank row, kept under part_bytes by splitting the rank rows in more parts (at 128 tokens an expert on
  // Qwen3-30B-A3B's shape, 1.5 MiB in one part spilled L2 and cost 10-20 % of gate/up); the kernels take the tokens
  // of an expert with many more in blocks
  int64_t part_bytes, z_bytes;
  void (*gate_up_part)(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                       const Tokens& tk, int64_t part, int64_t parts, float* h);
  // As VnniKernels::down on Kernels::activate's float activations a [slots, I], rounded to bfloat16; in one part
  // (parts 1), every rank of the slots' rows of u, zeros where the expert stores no row (u need not be zeroed)
  void (*down)(const CpuFactors& d, int64_t e, const float* a, const Tokens& tk, int64_t part, int64_t parts, float* u);
};

extern const Bf16TileKernels kAmxBf16;

// amx_usable(), and the CPU has AMX-BF16 and AVX512-BF16
bool amx_bf16_usable();

}  // namespace bitsmoe::cpu
