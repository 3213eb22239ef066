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
#include "f32_matmul_tile.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::F32Tile;
using jaxinfer::F32TileBlocks;
using jaxinfer::kBlockCols;

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
  const jaxinfer::PackedBlocks w{reinterpret_cast<const char*>(wp), block_stride * 4, k * 64};
  jaxinfer::ForEachTile<F32TileBlocks>(pool, m, n, blocks, w, [=](int64_t r0, int rows, int64_t block0, int count,
                                                                   int last_cols, jaxinfer::NextPanel* ahead) {
    jaxinfer::TileTable<F32Tile, F32TileBlocks>::For(rows, count)(xp + r0 * k, k, wp + block0 * block_stride, block_stride,
                                                            yp + r0 * n + block0 * kBlockCols, n, last_cols, ahead);
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
