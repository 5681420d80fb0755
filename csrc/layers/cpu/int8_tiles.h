// The packed int8 weight layout and the tile micro-kernels of fastopt::int8_mm / int8_linear.
//
// Packed layout (built once at conversion time by fastopt.int8.pack_int8_weight): the [N, K]
// int8 weight, zero-padded to N16 = ceil(N/16)*16 rows and K4 = ceil(K/4)*4 columns, stored as
// [N16/16][K4/4][16][4]: for each block of 16 output channels and each group of 4 input
// channels, 64 contiguous bytes, the 4 weights of channel n at bytes 4n..4n+3. That is exactly
// one 512-bit operand of vpdpbusd (16 int32 lanes, each a dot product of 4 bytes), and the other
// instruction sets read the same bytes, so one packed buffer serves every variant and device.
#pragma once

#include <cstdint>

namespace fastopt::cpu::int8 {

constexpr int kBlockN = 16;  // output channels per packed block
constexpr int kGroupK = 4;   // input channels per packed group
constexpr int kGroupBytes = kBlockN * kGroupK;
// A tile is up to kTileRows rows of the input times kPanelBlocks packed blocks (two AMX tiles
// high; the vector kernels walk it 8 or fewer rows at a time).
constexpr int kTileRows = 32;
constexpr int kPanelBlocks = 2;
constexpr int kPanelCols = kPanelBlocks * kBlockN;

// int8 x int8 products summed over K input channels stay exact in int32 while
// K * 255 * 128 < 2^31 (the VNNI variant offsets activations by +128 to make them unsigned).
constexpr int64_t kMaxInFeatures = 65536;

// One tile of the exact integer GEMM: c[r][j] = sum_k a[r][k] * w[col j][k], in int32.
struct GemmTile {
  const uint8_t* a;  // rows x (groups * 4) activation bytes, see Int8Kernels::unsigned_activations
  int64_t lda;       // bytes between rows of a
  const int8_t* b;   // the panel's first packed block (from its first group to sum)
  int64_t block_stride;  // bytes between blocks: K4 / 4 * 64
  int64_t groups;        // groups to sum: K4 / 4, or a part of them
  int rows;              // 1..kTileRows
  int blocks;            // 1..kPanelBlocks
  int32_t* c;            // [kTileRows][kPanelCols]
};

// One tile of the weight-only product: c[r][j] = sum_k x[r][k] * float(w[col j][k]), in fp32.
struct WeightOnlyTile {
  const float* x;  // rows x (groups * 4) fp32 activations, zero-padded
  int64_t ldx;
  const int8_t* b;
  int64_t groups;
  int rows;
  int blocks;
  float* c;  // [kTileRows][kPanelCols]
};

// The micro-kernels of one instruction set.
struct Int8Kernels {
  const char* name;  // "amx", "vnni", "avx2" or "portable": what `python -m fastopt info` reports
  // The GEMM reads activations as uint8 a + 128 (vpdpbusd multiplies unsigned by signed bytes);
  // the caller then subtracts 128 * sum_k w[n][k] (the weight compensation) from every sum.
  bool unsigned_activations;
  // A thread runs start_gemm before its first `gemm` call of a parallel region and finish_gemm
  // after its last: AMX loads its tile configuration there once (ldtilecfg costs about as much as
  // the products of a small tile) and releases the tiles after, so that no tile state is left for
  // the operating system to save at context switches.
  void (*start_gemm)();
  void (*finish_gemm)();
  void (*gemm)(const GemmTile&);  // between start_gemm and finish_gemm
  void (*weight_only)(const WeightOnlyTile&);
};

// The micro-kernels of the active instruction set level (cpu/isa.h): amx (AMX for whole 16-row
// tiles, VNNI for the rest), avx512_vnni (VNNI), avx512 and avx2 (exact int16 products with
// vpmaddwd), baseline (portable C++).
const Int8Kernels& active_int8_kernels();

}  // namespace fastopt::cpu::int8
