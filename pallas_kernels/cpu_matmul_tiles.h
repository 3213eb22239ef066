// How jaxinfer's CPU matmuls over weights packed in 16-column blocks (f32_matmul.cc,
// avx512bf16_matmul.cc) split their work: items of column panels x row chunks shared on XLA's
// pool, each item cut into register tiles of up to 6 rows and a build-dependent number of blocks.
// A tile computes whole sums, so how an output is reached never depends on the split.
#ifndef JAXINFER_CPU_MATMUL_TILES_H_
#define JAXINFER_CPU_MATMUL_TILES_H_

#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

constexpr int64_t kBlockCols = 16;  // output columns per packed block
constexpr int kTileRows = 6;        // rows of x per register tile
constexpr int kPanelBlocks = 4;     // column blocks per work item
constexpr int64_t kChunkRows = 8 * kTileRows;  // rows per work item, so that prefill splits finely

// Tile<R, C>::Run for R rows (1 .. kTileRows) and C column blocks (1 .. MaxBlocks(R)), picked at
// run time. The min()s keep tiles wider than MaxBlocks(R) from being instantiated; those cases
// are never reached.
template <template <int, int> class Tile, int (*MaxBlocks)(int)>
struct TileTable {
  using Fn = decltype(&Tile<1, 1>::Run);

  template <int R>
  static Fn ForRows(int blocks) {
    constexpr int kMax = MaxBlocks(R);
    switch (std::min(blocks, kMax)) {
      case 1: return Tile<R, 1>::Run;
      case 2: return Tile<R, std::min(2, kMax)>::Run;
      case 3: return Tile<R, std::min(3, kMax)>::Run;
      default: return Tile<R, kMax>::Run;
    }
  }

  static Fn For(int rows, int blocks) {
    switch (rows) {
      case 1: return ForRows<1>(blocks);
      case 2: return ForRows<2>(blocks);
      case 3: return ForRows<3>(blocks);
      case 4: return ForRows<4>(blocks);
      case 5: return ForRows<5>(blocks);
      default: return ForRows<6>(blocks);
    }
  }
};

// The work items of an [m, n] product over `column_blocks` packed blocks: column panels of
// `panel_blocks` blocks x chunks of kChunkRows rows, panels varying fastest, so that at decode's
// single chunk of rows the items split the weights.
struct TileGrid {
  int64_t m, n, column_blocks, panel_blocks;

  int64_t panels() const { return (column_blocks + panel_blocks - 1) / panel_blocks; }
  int64_t items() const { return panels() * ((m + kChunkRows - 1) / kChunkRows); }

  // Calls tile(r0, rows, block0, blocks, last_cols) for every register tile of `item`: rows
  // [r0, r0 + rows) times blocks [block0, block0 + blocks), the last of which has `last_cols`
  // real columns.
  template <int (*MaxBlocks)(int), typename TileCall>
  void RunItem(int64_t item, TileCall tile) const {
    const int64_t panel = item % panels(), r_end = std::min(m, (item / panels() + 1) * kChunkRows);
    const int64_t block0 = panel * panel_blocks, count = std::min(panel_blocks, column_blocks - block0);
    const int last_cols = static_cast<int>(std::min(kBlockCols, n - (block0 + count - 1) * kBlockCols));
    for (int64_t r0 = item / panels() * kChunkRows; r0 < r_end; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, r_end - r0));
      for (int64_t c0 = 0; c0 < count; c0 += MaxBlocks(rows)) {
        const int blocks = static_cast<int>(std::min<int64_t>(MaxBlocks(rows), count - c0));
        tile(r0, rows, block0 + c0, blocks, c0 + blocks == count ? last_cols : static_cast<int>(kBlockCols));
      }
    }
  }
};

// Every register tile of an [m, n] product (TileGrid::RunItem), items shared on XLA's pool.
template <int (*MaxBlocks)(int), typename TileCall>
void ForEachTile(xla::ffi::ThreadPool& pool, int64_t m, int64_t n, int64_t column_blocks, TileCall tile) {
  const TileGrid grid{m, n, column_blocks, kPanelBlocks};
  ParallelFor(pool, grid.items(), [=](int64_t item) { grid.RunItem<MaxBlocks>(item, tile); });
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_MATMUL_TILES_H_
