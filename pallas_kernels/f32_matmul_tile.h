// The register tile of jaxinfer's float32 matmul over packed weights (f32_matmul.cc): shared with
// decoder_layer_cpu.cc, whose projections must sum exactly as the standalone kernel does.
#ifndef JAXINFER_F32_MATMUL_TILE_H_
#define JAXINFER_F32_MATMUL_TILE_H_

#include <cstdint>

#include "cpu_matmul_tiles.h"
#include "cpu_vec16.h"

namespace jaxinfer {

// Column blocks per register tile by its rows. AVX-512: 6 x 4 of the 32 registers hold sums.
// AVX2's 16 registers: one row takes 4 blocks (8 sums), two rows 2, more rows 1 (up to 12 sums).
#ifdef __AVX512F__
constexpr int F32TileBlocks(int) { return 4; }
#else
constexpr int F32TileBlocks(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }
#endif

// Rows [0, R) of x times column blocks [0, C) of `panel` into y; the last block may be partial
// (`last_cols` of its 16 columns are real). ahead: the next item's panel to request (null: none).
template <int R, int C>
struct F32Tile {
  static void Run(const float* x, int64_t k, const float* panel, int64_t block_stride, float* y, int64_t n,
                  int last_cols, NextPanel* ahead) {
    // Two loops, so that the one without read-ahead is the plain FMA loop it was before there was
    // one (with a test inside it, a float32 prefill ran 4-14% slower, exploratory).
    if (ahead)
      Sums<true>(x, k, panel, block_stride, y, n, last_cols, ahead);
    else
      Sums<false>(x, k, panel, block_stride, y, n, last_cols, nullptr);
  }

  template <bool kAhead>
  static void Sums(const float* x, int64_t k, const float* panel, int64_t block_stride, float* y, int64_t n,
                   int last_cols, NextPanel* ahead) {
    V16 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = V16::Zero();
    for (int64_t kk = 0; kk < k; ++kk) {
      V16 w[C];
      for (int c = 0; c < C; ++c) w[c] = V16::Load(panel + c * block_stride + kk * kBlockCols);
      if constexpr (kAhead) ahead->Issue();
      for (int r = 0; r < R; ++r) {
        const V16 xr = V16::Set1(x[r * k + kk]);
        for (int c = 0; c < C; ++c) acc[r][c] = V16::Fma(xr, w[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c].Store(c == C - 1 ? last_cols : kBlockCols, y + r * n + c * kBlockCols);
  }
};

}  // namespace jaxinfer

#endif  // JAXINFER_F32_MATMUL_TILE_H_
