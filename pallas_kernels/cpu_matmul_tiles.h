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

// Packed weights as the read-ahead sees them: column block b's rows start at base + b * stride
// bytes and fill `used` bytes (its K rows, or pairs of rows, of 64 bytes each).
struct PackedBlocks {
  const char* base;
  int64_t stride, used;
};

// The next work item's weight panel, requested into L2 a few lines at a time while this item's
// register tiles run (each tile calls Issue() once per step along K). At decode's few rows an
// item computes on its panel for about as long as DRAM takes to deliver it, and the first of its
// row tiles would wait for it; requested ahead, the reads overlap the arithmetic.
class NextPanel {
 public:
  // Blocks [block0, block0 + count) of w, spread over `steps` calls of Issue().
  void Plan(const PackedBlocks& w, int64_t block0, int64_t count, int64_t steps) {
    w_ = w;
    block_ = block0;
    end_ = block0 + count;
    line_ = 0;
    lines_ = (w.used + 63) / 64;
    per_call_ = std::max<int64_t>(1, (count * lines_ + steps - 1) / std::max<int64_t>(1, steps));
  }

  void Issue() {
    for (int64_t i = 0; i < per_call_ && block_ < end_; ++i) {
      _mm_prefetch(w_.base + block_ * w_.stride + line_ * 64, _MM_HINT_T1);
      if (++line_ == lines_) line_ = 0, ++block_;
    }
  }

 private:
  PackedBlocks w_{};
  int64_t block_ = 0, end_ = 0, line_ = 0, lines_ = 1, per_call_ = 1;
};

// The work items of an [m, n] product over `column_blocks` packed blocks: column panels of
// `panel_blocks` blocks x chunks of kChunkRows rows, panels varying fastest, so that at decode's
// single chunk of rows the items split the weights.
struct TileGrid {
  int64_t m, n, column_blocks, panel_blocks;

  int64_t panels() const { return (column_blocks + panel_blocks - 1) / panel_blocks; }
  int64_t items() const { return panels() * ((m + kChunkRows - 1) / kChunkRows); }
  int64_t first_block(int64_t item) const { return item % panels() * panel_blocks; }
  int64_t block_count(int64_t item) const { return std::min(panel_blocks, column_blocks - first_block(item)); }
  // Register tiles down an item's rows: each passes over the whole panel.
  int64_t row_tiles(int64_t item) const {
    const int64_t r0 = item / panels() * kChunkRows;
    return (std::min(m - r0, kChunkRows) + kTileRows - 1) / kTileRows;
  }

  // When the rows are one chunk (decode) the items are the panels: the widest panel, from
  // kPanelBlocks blocks down to 2, whose items the threads share evenly (at few rows an item
  // streams its blocks, and more streams read faster). A [576, 576] weight gives 12 items of 3
  // blocks rather than 9 of 4, of which one thread ran 5 while the other ran 4.
  static int64_t EvenPanelBlocks(int64_t column_blocks, int64_t m, int64_t threads) {
    if (m > kChunkRows || threads < 2) return kPanelBlocks;
    for (int64_t panel = kPanelBlocks; panel >= 2; --panel)
      if ((column_blocks + panel - 1) / panel % threads == 0) return panel;
    return kPanelBlocks;
  }

  // Calls tile(r0, rows, block0, blocks, last_cols) for every register tile of `item`: rows
  // [r0, r0 + rows) times blocks [block0, block0 + blocks), the last of which has `last_cols`
  // real columns.
  template <int (*MaxBlocks)(int), typename TileCall>
  void RunItem(int64_t item, TileCall tile) const {
    const int64_t r_end = std::min(m, (item / panels() + 1) * kChunkRows);
    const int64_t block0 = first_block(item), count = block_count(item);
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

// Every register tile of an [m, n] product (TileGrid::RunItem) over the packed weights w, items
// shared on XLA's pool in runs (RunLength), each item reading the next one's panel ahead:
// tile(r0, rows, block0, blocks, last_cols, ahead). The [32, K] products of a SmolLM2 layer over
// cold bfloat16 weights ran 1.06-1.07x faster than with one item at a time, on top of the even
// panels' 1.04x (exploratory, alternated in one process).
template <int (*MaxBlocks)(int), typename TileCall>
void ForEachTile(xla::ffi::ThreadPool& pool, int64_t m, int64_t n, int64_t column_blocks, const PackedBlocks& w,
                 TileCall tile) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const TileGrid grid{m, n, column_blocks, TileGrid::EvenPanelBlocks(column_blocks, m, threads)};
  // A single row tile streams its panel once and gains nothing from reading ahead; items claimed
  // one at a time absorb a helper's late start.
  const int64_t items = grid.items(), run = m > kTileRows ? RunLength(items, threads) : 1;
  ParallelFor(pool, (items + run - 1) / run, [=](int64_t r) {
    thread_local NextPanel ahead;
    const int64_t end = std::min(items, (r + 1) * run);
    for (int64_t item = r * run; item < end; ++item) {
      NextPanel* next = nullptr;
      if (item + 1 < end) {
        const int64_t steps = grid.row_tiles(item) * w.used / 64;
        ahead.Plan(w, grid.first_block(item + 1), grid.block_count(item + 1), steps);
        next = &ahead;
      }
      grid.RunItem<MaxBlocks>(item, [&](int64_t r0, int rows, int64_t block0, int blocks, int last_cols) {
        tile(r0, rows, block0, blocks, last_cols, next);
      });
    }
  });
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_MATMUL_TILES_H_
