// y[M, N] = x[M, K] times float32 weights packed by f32_matmul.pack, with AVX-512 or AVX2 FMAs
// (whichever the library is built for). Each output is one chain of FMAs over k = 0 .. K-1
// whatever M is and however rows and columns are tiled, so a row's result does not depend on the
// rest of the batch, and both builds give the same bits.
//
// Packed weights: [ceil(N / 16), K, 16]: column block b holds W[k, 16b .. 16b + 15] at row k,
// zero padded, so a tile streams each of its column blocks from contiguous memory. At decode's
// few rows the product is a pass over the weights; XLA:CPU's float32 dot reads them at ~14 GB/s
// there on the 2-core Xeon (benchmarks/cpu_limits.py), half of what two cores can read.
#include <cstdint>

#include "cpu_matmul_tiles.h"
#include "cpu_vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::kBlockCols;
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
struct Tile {
  static void Run(const float* x, int64_t k, const float* panel, int64_t block_stride, float* y, int64_t n,
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
};

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
  const int64_t block_stride = k * kBlockCols;
  jaxinfer::ForEachTile<TileBlocks>(pool, m, n, blocks, [=](int64_t r0, int rows, int64_t block0, int count,
                                                             int last_cols) {
    jaxinfer::TileTable<Tile, TileBlocks>::For(rows, count)(xp + r0 * k, k, wp + block0 * block_stride, block_stride,
                                                            yp + r0 * n + block0 * kBlockCols, n, last_cols);
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
