// y[M, N] = x[M, K] times float32 weights packed by f32_matmul.pack, with AVX-512 or AVX2 FMAs
// (whichever the library is built for). Each output is one chain of FMAs over k = 0 .. K-1
// whatever M is and however rows and columns are tiled, so a row's result does not depend on the
// rest of the batch, and both builds give the same bits.
//
// Packed weights: [ceil(N / 16), K, 16]: column block b holds W[k, 16b .. 16b + 15] at row k,
// zero padded, so a tile streams each of its column blocks from contiguous memory. At decode's
// few rows the product is a pass over the weights; XLA:CPU's float32 dot reads them at ~14 GB/s
// there on the 2-core Xeon (benchmarks/cpu_limits.py), half of what two cores can read.
#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "cpu_vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed block
constexpr int kTileRows = 6;        // rows of x per register tile
constexpr int kPanelBlocks = 4;     // column blocks per work item
constexpr int64_t kChunkRows = 8 * kTileRows;  // rows per work item, so that prefill splits finely

using jaxinfer::V16;  // one column block

// Column blocks per register tile by its rows. AVX-512: 6 x 4 of the 32 registers hold sums.
// AVX2's 16 registers: one row takes 4 blocks (8 sums), two rows 2, more rows 1 (up to 12 sums).
#ifdef __AVX512F__
constexpr int TileBlocks(int) { return 4; }
#else
constexpr int TileBlocks(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }
#endif

// Rows [0, R) of x times column blocks [0, C) of `panel` into y; the last block may be partial
// (`last_cols` of its 16 columns are real).
template <int R, int C>
void Tile(const float* x, int64_t k, const float* panel, int64_t block_stride, float* y, int64_t n,
          int last_cols) {
  V16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V16::Zero();
  for (int64_t kk = 0; kk < k; ++kk) {
    V16 w[C];
    for (int c = 0; c < C; ++c) w[c] = V16::Load(panel + c * block_stride + kk * kBlockCols);
    for (int r = 0; r < R; ++r) {
      const V16 xr = V16::Set1(x[r * k + kk]);
      for (int c = 0; c < C; ++c) acc[r][c] = V16::Fma(xr, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c].Store(c == C - 1 ? last_cols : kBlockCols, y + r * n + c * kBlockCols);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int);

// The tile of R rows and `blocks` column blocks (at most TileBlocks(R)). The min()s keep tiles
// wider than R rows' registers allow from being instantiated; those cases are never reached.
template <int R>
TileFn TileFor(int blocks) {
  switch (std::min(blocks, TileBlocks(R))) {
    case 1: return Tile<R, 1>;
    case 2: return Tile<R, std::min(2, TileBlocks(R))>;
    case 3: return Tile<R, std::min(3, TileBlocks(R))>;
    default: return Tile<R, TileBlocks(R)>;
  }
}

TileFn TileFor(int rows, int blocks) {
  switch (rows) {
    case 1: return TileFor<1>(blocks);
    case 2: return TileFor<2>(blocks);
    case 3: return TileFor<3>(blocks);
    case 4: return TileFor<4>(blocks);
    case 5: return TileFor<5>(blocks);
    default: return TileFor<6>(blocks);
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> packed,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != kBlockCols || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("jaxinfer_f32_matmul: expected x [M, K], packed [N/16, K, 16], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], blocks = pd[0];
  if (pd[1] != k || (n + kBlockCols - 1) / kBlockCols != blocks)
    return ffi::Error::InvalidArgument("jaxinfer_f32_matmul: packed weights do not match x and y");
  const float* xp = x.typed_data();
  const float* wp = packed.typed_data();
  float* yp = y->typed_data();
  const int64_t panels = (blocks + kPanelBlocks - 1) / kPanelBlocks, chunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t block_stride = k * kBlockCols;
  // Column panels vary fastest: at decode's single chunk the items split the weights.
  jaxinfer::ParallelFor(pool, panels * chunks, [=](int64_t item) {
    const int64_t panel = item % panels, r_end = std::min(m, (item / panels + 1) * kChunkRows);
    const int64_t block0 = panel * kPanelBlocks, count = std::min<int64_t>(kPanelBlocks, blocks - block0);
    const int last_cols = static_cast<int>(std::min(kBlockCols, n - (block0 + count - 1) * kBlockCols));
    for (int64_t r0 = item / panels * kChunkRows; r0 < r_end; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, r_end - r0));
      for (int64_t c0 = 0; c0 < count; c0 += TileBlocks(rows)) {
        const int blocks_here = static_cast<int>(std::min<int64_t>(TileBlocks(rows), count - c0));
        TileFor(rows, blocks_here)(xp + r0 * k, k, wp + (block0 + c0) * block_stride, block_stride,
                                   yp + r0 * n + (block0 + c0) * kBlockCols, n,
                                   c0 + blocks_here == count ? last_cols : 16);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_f32_matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
