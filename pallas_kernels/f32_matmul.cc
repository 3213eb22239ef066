// y[M, N] = x[M, K] times float32 weights packed by f32_matmul.pack, with AVX-512 FMAs. Each
// output is one chain of FMAs over k = 0 .. K-1 whatever M is and however rows and columns are
// tiled, so a row's result does not depend on the rest of the batch.
//
// Packed weights: [ceil(N / 16), K, 16]: column block b holds W[k, 16b .. 16b + 15] at row k,
// zero padded, so a tile streams each of its column blocks from contiguous memory. At decode's
// few rows the product is a pass over the weights; XLA:CPU's float32 dot reads them at ~14 GB/s
// there (benchmarks/cpu_limits.py), half of what two cores can read.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed block (one zmm)
constexpr int kTileRows = 6;        // rows of x per register tile
constexpr int kTileBlocks = 4;      // column blocks per register tile: 6 x 4 accumulators
constexpr int64_t kChunkRows = 8 * kTileRows;  // rows per work item, so that prefill splits finely

// Rows [0, R) of x times column blocks [0, C) of `panel` into y; the last block may be partial
// (`last_cols` of its 16 columns are real).
template <int R, int C>
void Tile(const float* x, int64_t k, const float* panel, int64_t block_stride, float* y, int64_t n,
          int last_cols) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 w[C];
    for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_ps(panel + c * block_stride + kk * kBlockCols);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + kk]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xr, w[c], acc[r][c]);
    }
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << last_cols) - 1);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C - 1; ++c) _mm512_storeu_ps(y + r * n + c * kBlockCols, acc[r][c]);
    _mm512_mask_storeu_ps(y + r * n + (C - 1) * kBlockCols, tail, acc[r][C - 1]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int);

template <int R>
TileFn TileFor(int blocks) {
  switch (blocks) {
    case 1: return Tile<R, 1>;
    case 2: return Tile<R, 2>;
    case 3: return Tile<R, 3>;
    default: return Tile<R, 4>;
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
  const int64_t panels = (blocks + kTileBlocks - 1) / kTileBlocks, chunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t block_stride = k * kBlockCols;
  // Column panels vary fastest: at decode's single chunk the items split the weights.
  jaxinfer::ParallelFor(pool, panels * chunks, [=](int64_t item) {
    const int64_t panel = item % panels, r_end = std::min(m, (item / panels + 1) * kChunkRows);
    const int64_t block0 = panel * kTileBlocks, count = std::min<int64_t>(kTileBlocks, blocks - block0);
    const int last_cols = static_cast<int>(std::min(kBlockCols, n - (block0 + count - 1) * kBlockCols));
    for (int64_t r0 = item / panels * kChunkRows; r0 < r_end; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, r_end - r0));
      TileFor(rows, static_cast<int>(count))(xp + r0 * k, k, wp + block0 * block_stride, block_stride,
                                              yp + r0 * n + block0 * kBlockCols, n, last_cols);
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
