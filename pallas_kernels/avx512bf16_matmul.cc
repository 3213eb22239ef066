// y[M, N] (float32) = x[M, K] (float32, rounded to bfloat16) times bfloat16 weights packed by
// amx_matmul.pack, with AVX512_BF16's pair dot products (vdpbf16ps): the bfloat16 matmul of CPUs
// that have those but no AMX tiles, or whose OS refuses AMX state (AMD Zen 4 and later, Intel
// Cooper Lake). Each output is one chain over the pairs of K, in order, whatever M is and however
// rows and columns are tiled, so a row's result does not depend on the rest of the batch.
//
// Packed weights: [ceil(N / 16), kpad / 2, 32], kpad = K rounded up to 32: column block b, pair
// row j holds (W[2j, c], W[2j + 1, c]) for the block's 16 columns c. That is one 512-bit register
// per pair row, already in the layout vdpbf16ps multiplies by a broadcast pair of x.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_matmul_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::kBlockCols;
constexpr int64_t kPadK = 32;  // amx_matmul.pack pads K to this

// 6 x 4 of the 32 registers hold a register tile's sums.
constexpr int TileBlocks(int) { return 4; }

// Rows [0, R) of xw (x as bfloat16 pairs, `x_pairs` per row) times column blocks [0, C) of
// `panel` (`pairs` pair rows each) into y; the last block may be partial (`last_cols` real).
// ahead: the next item's panel to request (null: none), in a loop of its own as in F32Tile.
template <int R, int C>
struct Tile {
  static void Run(const uint32_t* xw, int64_t x_pairs, int64_t pairs, const uint32_t* panel, int64_t block_stride,
                  float* y, int64_t n, int last_cols, jaxinfer::NextPanel* ahead) {
    if (ahead)
      Sums<true>(xw, x_pairs, pairs, panel, block_stride, y, n, last_cols, ahead);
    else
      Sums<false>(xw, x_pairs, pairs, panel, block_stride, y, n, last_cols, nullptr);
  }

  template <bool kAhead>
  __attribute__((target("avx512f,avx512bf16"))) static void Sums(const uint32_t* xw, int64_t x_pairs, int64_t pairs,
                                                                const uint32_t* panel, int64_t block_stride, float* y,
                                                                int64_t n, int last_cols, jaxinfer::NextPanel* ahead) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; ++j) {
      __m512i w[C];
      for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(panel + c * block_stride + j * kBlockCols);
      if constexpr (kAhead) ahead->Issue();
      for (int r = 0; r < R; ++r) {
        const __m512i xr = _mm512_set1_epi32(static_cast<int>(xw[r * x_pairs + j]));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)xr, (__m512bh)w[c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        const int cols = c == C - 1 ? last_cols : static_cast<int>(kBlockCols);
        _mm512_mask_storeu_ps(y + r * n + c * kBlockCols, static_cast<__mmask16>((1u << cols) - 1), acc[r][c]);
      }
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> packed,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != 2 * kBlockCols || yd[0] != xd[0])
    return ffi::Error::InvalidArgument(
        "jaxinfer_avx512bf16_matmul: expected x [M, K], packed [N/16, K/2, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], x_pairs = pd[1], n = yd[1], blocks = pd[0];
  if (2 * x_pairs % kPadK || 2 * x_pairs < k || 2 * x_pairs - k >= kPadK || (n + kBlockCols - 1) / kBlockCols != blocks)
    return ffi::Error::InvalidArgument("jaxinfer_avx512bf16_matmul: packed weights do not match x and y");
  // x rounded once, zero padded to whole pairs; the pairs past K's are zeros on both sides and skipped.
  std::vector<uint32_t> xb(m * x_pairs, 0);
  const float* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r)
    jaxinfer::RoundToBf16(xs + r * k, k, reinterpret_cast<uint16_t*>(xb.data() + r * x_pairs));
  const uint32_t* xp = xb.data();
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.typed_data());
  float* yp = y->typed_data();
  const int64_t pairs = (k + 1) / 2, block_stride = x_pairs * kBlockCols;
  const jaxinfer::PackedBlocks w{reinterpret_cast<const char*>(wp), block_stride * 4, pairs * 64};
  jaxinfer::ForEachTile<TileBlocks>(pool, m, n, blocks, w, [=](int64_t r0, int rows, int64_t block0, int count,
                                                                int last_cols, jaxinfer::NextPanel* ahead) {
    jaxinfer::TileTable<Tile, TileBlocks>::For(rows, count)(xp + r0 * x_pairs, x_pairs, pairs,
                                                            wp + block0 * block_stride, block_stride,
                                                            yp + r0 * n + block0 * kBlockCols, n, last_cols, ahead);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_avx512bf16_matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
