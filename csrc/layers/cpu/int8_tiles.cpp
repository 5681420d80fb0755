// The int8 tile micro-kernels, one set per instruction set (the layout is in int8_tiles.h).
// Accumulators live in registers for a whole pass over K; the callers add scales and bias.
#include "layers/cpu/int8_tiles.h"

#include <algorithm>
#include <cstring>

#include "cpu/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastopt::cpu::int8 {
namespace {

// ---- Portable C++: the integer GEMM every vector variant must match bit for bit. ----

void gemm_portable(const GemmTile& t) {
  for (int r = 0; r < t.rows; ++r) {
    const int8_t* a = reinterpret_cast<const int8_t*>(t.a + r * t.lda);
    for (int j = 0; j < t.blocks * kBlockN; ++j) {
      const int8_t* w = t.b + (j / kBlockN) * t.block_stride + (j % kBlockN) * kGroupK;
      int32_t sum = 0;
      for (int64_t g = 0; g < t.groups; ++g) {
        for (int k = 0; k < kGroupK; ++k)
          sum += int32_t(a[g * kGroupK + k]) * w[g * kGroupBytes + k];
      }
      t.c[r * kPanelCols + j] = sum;
    }
  }
}

void weight_only_portable(const WeightOnlyTile& t) {
  for (int r = 0; r < t.rows; ++r) {
    const float* x = t.x + r * t.ldx;
    for (int j = 0; j < t.blocks * kBlockN; ++j) {
      const int8_t* w = t.b + (j / kBlockN) * t.groups * kGroupBytes + (j % kBlockN) * kGroupK;
      float sum = 0.0f;
      for (int64_t g = 0; g < t.groups; ++g) {
        for (int k = 0; k < kGroupK; ++k) sum += x[g * kGroupK + k] * float(w[g * kGroupBytes + k]);
      }
      t.c[r * kPanelCols + j] = sum;
    }
  }
}

void no_gemm_state() {}

constexpr Int8Kernels kPortable{.name = "portable",
                                .unsigned_activations = false,
                                .start_gemm = no_gemm_state,
                                .finish_gemm = no_gemm_state,
                                .gemm = gemm_portable,
                                .weight_only = weight_only_portable};

#if defined(__x86_64__)

int32_t load_group(const uint8_t* p) {  // the 4 activation bytes of one group, as one lane
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ---- AVX-512 VNNI: vpdpbusd does 64 exact byte products per instruction. ----

// One named accumulator per (row, block) rather than an array: GCC 12 keeps a 16-vector array
// in memory (it exceeds its scalar-replacement limit) or copies it between registers.
#define FASTOPT_VNNI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FASTOPT_VNNI_ZERO(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0;
#define FASTOPT_VNNI_STEP(r)                                                        \
  if constexpr (R > r) {                                                            \
    const __m512i a = _mm512_set1_epi32(load_group(t.a + r * t.lda + g * kGroupK)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, a, w0);                                  \
    if constexpr (NB > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, a, w1);            \
  }
#define FASTOPT_VNNI_STORE(r)                                                           \
  if constexpr (R > r) {                                                                \
    _mm512_storeu_si512(t.c + r * kPanelCols, c##r##0);                                 \
    if constexpr (NB > 1) _mm512_storeu_si512(t.c + r * kPanelCols + kBlockN, c##r##1); \
  }

template <int R, int NB>
FASTOPT_TARGET_AVX512_VNNI void gemm_vnni_fixed(const GemmTile& t) {
  static_assert(R <= 8 && NB <= 2, "FASTOPT_VNNI_ROWS names 8 rows of 2 blocks");
  FASTOPT_VNNI_ROWS(FASTOPT_VNNI_ZERO)
  const int8_t* b0 = t.b;
  const int8_t* b1 = t.b + (NB > 1 ? t.block_stride : 0);
  for (int64_t g = 0; g < t.groups; ++g) {
    const __m512i w0 = _mm512_loadu_si512(b0 + g * kGroupBytes);
    const __m512i w1 = NB > 1 ? _mm512_loadu_si512(b1 + g * kGroupBytes) : w0;
    FASTOPT_VNNI_ROWS(FASTOPT_VNNI_STEP)
  }
  FASTOPT_VNNI_ROWS(FASTOPT_VNNI_STORE)
}

#undef FASTOPT_VNNI_ROWS
#undef FASTOPT_VNNI_ZERO
#undef FASTOPT_VNNI_STEP
#undef FASTOPT_VNNI_STORE

template <int NB>
FASTOPT_TARGET_AVX512_VNNI void gemm_vnni_blocks(const GemmTile& t) {
  switch (t.rows) {
    case 1:
      return gemm_vnni_fixed<1, NB>(t);
    case 2:
      return gemm_vnni_fixed<2, NB>(t);
    case 3:
      return gemm_vnni_fixed<3, NB>(t);
    case 4:
      return gemm_vnni_fixed<4, NB>(t);
    case 5:
      return gemm_vnni_fixed<5, NB>(t);
    case 6:
      return gemm_vnni_fixed<6, NB>(t);
    case 7:
      return gemm_vnni_fixed<7, NB>(t);
    default:
      return gemm_vnni_fixed<8, NB>(t);
  }
}

// Any number of rows, 8 at a time.
FASTOPT_TARGET_AVX512_VNNI void gemm_vnni(const GemmTile& t) {
  for (int r0 = 0; r0 < t.rows; r0 += 8) {
    GemmTile part = t;
    part.a = t.a + r0 * t.lda;
    part.c = t.c + r0 * kPanelCols;
    part.rows = std::min(8, t.rows - r0);
    t.blocks == 2 ? gemm_vnni_blocks<2>(part) : gemm_vnni_blocks<1>(part);
  }
}

// ---- AMX: one tdpbusd multiplies a 16 x 64 byte tile by a 64 x 16 one (16K products). ----
//
// A block's packed bytes for 16 consecutive groups are exactly a 16-row x 64-byte B tile, so AMX
// reads the same layout. Tiles: 0-3 accumulators (2 row tiles x 2 blocks), 4-5 activations,
// 6-7 weights; all 16 rows x 64 bytes.

constexpr int kAmxRows = 16;
constexpr int kAmxGroups = 16;  // K groups per tile step: 64 bytes

struct alignas(64) AmxConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register is 16 rows x 64 bytes, whatever the tile: one configuration for all. A
// constant in memory, not a local: _tile_loadconfig's asm declares only the first 8 bytes as read,
// so GCC may drop the stores that fill a local configuration.
constexpr AmxConfig amx_config() {
  AmxConfig config;
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = kAmxRows;
    config.colsb[i] = kAmxGroups * kGroupK;
  }
  return config;
}
constexpr AmxConfig kAmxConfig = amx_config();

template <int RT, int NB>
FASTOPT_TARGET_AMX void gemm_amx_fixed(const GemmTile& t) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (RT > 1) _tile_zero(2);
  if constexpr (RT > 1 && NB > 1) _tile_zero(3);
  const int8_t* b1 = t.b + t.block_stride;
  const uint8_t* a1 = t.a + kAmxRows * t.lda;
  for (int64_t g = 0; g < t.groups; g += kAmxGroups) {
    _tile_loadd(4, t.a + g * kGroupK, t.lda);
    _tile_loadd(6, t.b + g * kGroupBytes, kGroupBytes);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, b1 + g * kGroupBytes, kGroupBytes);
      _tile_dpbusd(1, 4, 7);
    }
    if constexpr (RT > 1) {
      _tile_loadd(5, a1 + g * kGroupK, t.lda);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NB > 1) _tile_dpbusd(3, 5, 7);
    }
  }
  constexpr int64_t stride = kPanelCols * sizeof(int32_t);
  _tile_stored(0, t.c, stride);
  if constexpr (NB > 1) _tile_stored(1, t.c + kBlockN, stride);
  if constexpr (RT > 1) _tile_stored(2, t.c + kAmxRows * kPanelCols, stride);
  if constexpr (RT > 1 && NB > 1) _tile_stored(3, t.c + kAmxRows * kPanelCols + kBlockN, stride);
}

FASTOPT_TARGET_AMX void start_amx() {
  _tile_loadconfig(&kAmxConfig);
}

FASTOPT_TARGET_AMX void finish_amx() {
  _tile_release();
}

// Whole 16-row tiles over whole 64-byte K steps on AMX; the K tail of those rows, and the
// remaining rows, on VNNI.
FASTOPT_TARGET_AMX void gemm_amx(const GemmTile& t) {
  static_assert(kTileRows == 2 * kAmxRows && kPanelBlocks == 2, "gemm_amx_fixed covers these");
  const int64_t amx_groups = t.groups / kAmxGroups * kAmxGroups;
  const int amx_rows = amx_groups > 0 ? t.rows / kAmxRows * kAmxRows : 0;
  if (amx_rows > 0) {
    GemmTile head = t;
    head.groups = amx_groups;
    if (amx_rows == 2 * kAmxRows) {
      t.blocks == 2 ? gemm_amx_fixed<2, 2>(head) : gemm_amx_fixed<2, 1>(head);
    } else {
      t.blocks == 2 ? gemm_amx_fixed<1, 2>(head) : gemm_amx_fixed<1, 1>(head);
    }
    if (amx_groups < t.groups) {
      alignas(64) int32_t tail_sums[kTileRows * kPanelCols];
      GemmTile tail = t;
      tail.a = t.a + amx_groups * kGroupK;
      tail.b = t.b + amx_groups * kGroupBytes;
      tail.groups = t.groups - amx_groups;
      tail.rows = amx_rows;
      tail.c = tail_sums;
      gemm_vnni(tail);
      // gemm_vnni writes t.blocks * kBlockN columns of each row: with one block, the rest of
      // tail_sums is uninitialized (and t.c's columns there are not read either).
      const int cols = t.blocks * kBlockN;
      for (int r = 0; r < amx_rows; ++r)
        for (int j = 0; j < cols; ++j) t.c[r * kPanelCols + j] += tail_sums[r * kPanelCols + j];
    }
  }
  if (amx_rows < t.rows) {
    GemmTile rest = t;
    rest.a = t.a + amx_rows * t.lda;
    rest.c = t.c + amx_rows * kPanelCols;
    rest.rows = t.rows - amx_rows;
    gemm_vnni(rest);
  }
}

// ---- AVX2: exact products of sign-extended int16 with vpmaddwd (no vpmaddubsw saturation). ----

// Rows r0..r0+R-1 of one block. The 64 bytes of a group are 4 quarters of 4 channels x 4 weights;
// vpmaddwd sums products in pairs, so lane 2i of quarter q holds channel 4q+i's k0*a0 + k1*a1 and
// lane 2i+1 its k2*a2 + k3*a3; the two are added once, after the K loop.
template <int R>
FASTOPT_TARGET_AVX2 void gemm_avx2_rows(const GemmTile& t, int r0, int block) {
  __m256i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
  const int8_t* b = t.b + block * t.block_stride;
  for (int64_t g = 0; g < t.groups; ++g) {
    __m256i w[4];
    for (int q = 0; q < 4; ++q) {
      const __m128i bytes =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g * kGroupBytes + 16 * q));
      w[q] = _mm256_cvtepi8_epi16(bytes);
    }
    for (int r = 0; r < R; ++r) {
      const int32_t group = load_group(t.a + (r0 + r) * t.lda + g * kGroupK);
      const __m256i a = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(group)));
      for (int q = 0; q < 4; ++q)
        acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(a, w[q]));
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t* c = t.c + (r0 + r) * kPanelCols + block * kBlockN;
    for (int q = 0; q < 4; ++q) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][q]);
      for (int i = 0; i < 4; ++i) c[4 * q + i] = lanes[2 * i] + lanes[2 * i + 1];
    }
  }
}

FASTOPT_TARGET_AVX2 void gemm_avx2(const GemmTile& t) {
  for (int block = 0; block < t.blocks; ++block) {
    int r = 0;
    for (; r + 2 <= t.rows; r += 2) gemm_avx2_rows<2>(t, r, block);
    if (r < t.rows) gemm_avx2_rows<1>(t, r, block);
  }
}

// ---- Weight-only: int8 weights widened to fp32 in registers, fp32 FMAs. ----

// Rows r0..r0+R-1 of one block: lane n of a group's 32-bit word n holds channel n's 4 weights;
// weight k is that word shifted left by 24 - 8k and arithmetically right by 24. One accumulator
// per (row, k) keeps 4 independent FMA chains per row.
constexpr __mmask16 kAll = 0xFFFF;

template <int R>
FASTOPT_TARGET_AVX512_VNNI void weight_only_avx512_rows(const WeightOnlyTile& t, int r0,
                                                        int block) {
  __m512 acc[R][kGroupK];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < kGroupK; ++k) acc[r][k] = _mm512_setzero_ps();
  const int8_t* b = t.b + block * t.groups * kGroupBytes;
  for (int64_t g = 0; g < t.groups; ++g) {
    const __m512i words = _mm512_loadu_si512(b + g * kGroupBytes);
    for (int k = 0; k < kGroupK; ++k) {
      // (The maskz forms: GCC 12 warns about the undefined pass-through of the plain ones.)
      const __m512i lane =
          _mm512_maskz_srai_epi32(kAll, _mm512_maskz_slli_epi32(kAll, words, 24 - 8 * k), 24);
      const __m512 w = _mm512_maskz_cvtepi32_ps(kAll, lane);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(t.x[(r0 + r) * t.ldx + g * kGroupK + k]);
        acc[r][k] = _mm512_fmadd_ps(x, w, acc[r][k]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sum =
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    _mm512_storeu_ps(t.c + (r0 + r) * kPanelCols + block * kBlockN, sum);
  }
}

// Many rows (up to 8) of one block: the 4 widened weight vectors of a group serve all of them,
// so the FMAs, not the widening, set the pace. Two accumulators (even / odd k) per row, named
// rather than an array for the reason given at FASTOPT_VNNI_ROWS.
#define FASTOPT_WIDE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FASTOPT_WIDE_ZERO(r) __m512 even##r = _mm512_setzero_ps(), odd##r = even##r;
#define FASTOPT_WIDE_STEP(r)                                        \
  if constexpr (R > r) {                                            \
    const float* x = t.x + (r0 + r) * t.ldx + g * kGroupK;          \
    even##r = _mm512_fmadd_ps(_mm512_set1_ps(x[0]), w[0], even##r); \
    odd##r = _mm512_fmadd_ps(_mm512_set1_ps(x[1]), w[1], odd##r);   \
    even##r = _mm512_fmadd_ps(_mm512_set1_ps(x[2]), w[2], even##r); \
    odd##r = _mm512_fmadd_ps(_mm512_set1_ps(x[3]), w[3], odd##r);   \
  }
#define FASTOPT_WIDE_STORE(r)                                       \
  if constexpr (R > r) {                                            \
    _mm512_storeu_ps(t.c + (r0 + r) * kPanelCols + block * kBlockN, \
                     _mm512_add_ps(even##r, odd##r));               \
  }

template <int R>
FASTOPT_TARGET_AVX512_VNNI void weight_only_avx512_wide_rows(const WeightOnlyTile& t, int r0,
                                                             int block) {
  static_assert(R <= 8, "FASTOPT_WIDE_ROWS names 8 rows");
  FASTOPT_WIDE_ROWS(FASTOPT_WIDE_ZERO)
  const int8_t* b = t.b + block * t.groups * kGroupBytes;
  for (int64_t g = 0; g < t.groups; ++g) {
    const __m512i words = _mm512_loadu_si512(b + g * kGroupBytes);
    __m512 w[kGroupK];
    for (int k = 0; k < kGroupK; ++k) {
      const __m512i lane =
          _mm512_maskz_srai_epi32(kAll, _mm512_maskz_slli_epi32(kAll, words, 24 - 8 * k), 24);
      w[k] = _mm512_maskz_cvtepi32_ps(kAll, lane);
    }
    FASTOPT_WIDE_ROWS(FASTOPT_WIDE_STEP)
  }
  FASTOPT_WIDE_ROWS(FASTOPT_WIDE_STORE)
}

#undef FASTOPT_WIDE_ROWS
#undef FASTOPT_WIDE_ZERO
#undef FASTOPT_WIDE_STEP
#undef FASTOPT_WIDE_STORE

template <int R>
FASTOPT_TARGET_AVX2 void weight_only_avx2_rows(const WeightOnlyTile& t, int r0, int block) {
  __m256 acc[R][2][2];  // [row][half of the block][even / odd k]
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) acc[r][h][0] = acc[r][h][1] = _mm256_setzero_ps();
  const int8_t* b = t.b + block * t.groups * kGroupBytes;
  for (int64_t g = 0; g < t.groups; ++g) {
    for (int h = 0; h < 2; ++h) {
      const __m256i words =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * kGroupBytes + 32 * h));
      for (int k = 0; k < kGroupK; ++k) {
        const __m256 w =
            _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(words, 24 - 8 * k), 24));
        for (int r = 0; r < R; ++r) {
          const __m256 x = _mm256_set1_ps(t.x[(r0 + r) * t.ldx + g * kGroupK + k]);
          acc[r][h][k % 2] = _mm256_fmadd_ps(x, w, acc[r][h][k % 2]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(t.c + (r0 + r) * kPanelCols + block * kBlockN + 8 * h,
                       _mm256_add_ps(acc[r][h][0], acc[r][h][1]));
}

// Runs RowsWide (WIDE rows at a time), Rows4, Rows2, Rows1 over every row of every block of the
// tile.
template <int WIDE, void (*RowsWide)(const WeightOnlyTile&, int, int),
          void (*Rows4)(const WeightOnlyTile&, int, int),
          void (*Rows2)(const WeightOnlyTile&, int, int),
          void (*Rows1)(const WeightOnlyTile&, int, int)>
void weight_only_by_rows(const WeightOnlyTile& t) {
  for (int block = 0; block < t.blocks; ++block) {
    int r = 0;
    for (; r + WIDE <= t.rows; r += WIDE) RowsWide(t, r, block);
    for (; r + 4 <= t.rows; r += 4) Rows4(t, r, block);
    for (; r + 2 <= t.rows; r += 2) Rows2(t, r, block);
    if (r < t.rows) Rows1(t, r, block);
  }
}

constexpr auto weight_only_avx512 =
    weight_only_by_rows<8, weight_only_avx512_wide_rows<8>, weight_only_avx512_rows<4>,
                        weight_only_avx512_rows<2>, weight_only_avx512_rows<1>>;
constexpr Int8Kernels kAmx{.name = "amx",
                           .unsigned_activations = true,
                           .start_gemm = start_amx,
                           .finish_gemm = finish_amx,
                           .gemm = gemm_amx,
                           .weight_only = weight_only_avx512};
constexpr Int8Kernels kVnni{.name = "vnni",
                            .unsigned_activations = true,
                            .start_gemm = no_gemm_state,
                            .finish_gemm = no_gemm_state,
                            .gemm = gemm_vnni,
                            .weight_only = weight_only_avx512};
constexpr Int8Kernels kAvx2{
    .name = "avx2",
    .unsigned_activations = false,
    .start_gemm = no_gemm_state,
    .finish_gemm = no_gemm_state,
    .gemm = gemm_avx2,
    .weight_only = weight_only_by_rows<4, weight_only_avx2_rows<4>, weight_only_avx2_rows<4>,
                                       weight_only_avx2_rows<2>, weight_only_avx2_rows<1>>};

#endif  // __x86_64__

}  // namespace

const Int8Kernels& active_int8_kernels() {
#if defined(__x86_64__)
  switch (active_isa()) {
    case Isa::kAmx:
      return kAmx;
    case Isa::kAvx512Vnni:
      return kVnni;
    case Isa::kAvx512:  // AVX-512 without VNNI (before Cascade Lake) has no faster int8 product
    case Isa::kAvx2:
      return kAvx2;
    case Isa::kBaseline:
      break;
  }
#endif
  return kPortable;
}

}  // namespace fastopt::cpu::int8
