// y[M, N] (float32) = x[M, K] (float32, rounded to bfloat16) times bfloat16 weights packed by
// amx_matmul.pack, summed in float32 by AMX tiles. Each output's sum runs over K in the same
// order whatever M is, so a row's result does not depend on the rest of the batch.
//
// Packed weights: [ceil(N / 16), kpad / 2, 32], kpad = K rounded up to 32: column block b, pair
// row j holds (W[2j, c], W[2j + 1, c]) for the block's 16 columns c, the layout a B tile loads
// with a 64-byte stride. XLA:CPU's own bfloat16 dot rearranges the weights so on every call,
// which costs more than the product at decode's few rows.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileRows = 16;  // rows of x per A tile
constexpr int64_t kTileK = 32;     // values of K per tile product
constexpr int64_t kBlockCols = 16;  // output columns per B tile
constexpr int64_t kPanelBlocks = 4;  // column blocks per work item at decode's few rows

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes; which holds what is up to each product below.
void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Tile numbers are immediates: one branch per C tile.
void StoreC(int tile, float* c) {
  switch (tile) {
    case 0: _tile_stored(0, c, 64); break;
    case 1: _tile_stored(1, c, 64); break;
    case 2: _tile_stored(2, c, 64); break;
    default: _tile_stored(3, c, 64); break;
  }
}

void ZeroC() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Stores C tile `tile` (rows [r0, r0 + 16), column block `block`) into y.
void StoreTile(int tile, float* c, int64_t r0, int64_t m, int64_t block, int64_t n, float* y) {
  StoreC(tile, c);
  const int64_t col = block * kBlockCols;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min(kBlockCols, n - col)) - 1);
  for (int64_t r = 0; r < std::min(kTileRows, m - r0); ++r)
    _mm512_mask_storeu_ps(y + (r0 + r) * n + col, mask, _mm512_load_ps(c + r * kBlockCols));
}

// Decode's few rows: tiles 0-3 are C for one row tile and four column blocks, 4 is A, 5-6 are B.
// Columns [block0 * 16, (block0 + blocks) * 16) of every row; xb: [m padded to 16, kpad] bfloat16.
void PanelProduct(const uint16_t* xb, int64_t m, int64_t kpad, const uint32_t* w, int64_t n, int64_t block0,
                  int64_t blocks, float* y) {
  const int64_t block_words = kpad / 2 * kBlockCols;
  const uint32_t* panel = w + block0 * block_words;
  alignas(64) float c[kTileRows * kBlockCols];
  for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
    ZeroC();
    for (int64_t k0 = 0; k0 < kpad; k0 += kTileK) {
      const uint32_t* b = panel + k0 / 2 * kBlockCols;
      _tile_loadd(4, xb + r0 * kpad + k0, kpad * 2);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (blocks > 1) {
        _tile_loadd(6, b + block_words, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (blocks > 2) {
        _tile_loadd(5, b + 2 * block_words, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (blocks > 3) {
        _tile_loadd(6, b + 3 * block_words, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) StoreTile(static_cast<int>(blk), c, r0, m, block0 + blk, n, y);
  }
}

// Prefill's many rows: tiles 0-3 are C for two row tiles x two column blocks, 4-5 A, 6-7 B, so
// each tile loaded is used twice. xb: [m padded to 32, kpad]; blocks: 1 or 2.
void PanelProduct2x2(const uint16_t* xb, int64_t m, int64_t kpad, const uint32_t* w, int64_t n, int64_t block0,
                     int64_t blocks, float* y) {
  const int64_t block_words = kpad / 2 * kBlockCols;
  const uint32_t* panel = w + block0 * block_words;
  alignas(64) float c[kTileRows * kBlockCols];
  for (int64_t r0 = 0; r0 < m; r0 += 2 * kTileRows) {
    ZeroC();
    for (int64_t k0 = 0; k0 < kpad; k0 += kTileK) {
      const uint32_t* b = panel + k0 / 2 * kBlockCols;
      _tile_loadd(4, xb + r0 * kpad + k0, kpad * 2);
      _tile_loadd(5, xb + (r0 + kTileRows) * kpad + k0, kpad * 2);
      _tile_loadd(6, b, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (blocks > 1) {
        _tile_loadd(7, b + block_words, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    StoreTile(0, c, r0, m, block0, n, y);
    if (r0 + kTileRows < m) StoreTile(2, c, r0 + kTileRows, m, block0, n, y);
    if (blocks > 1) {
      StoreTile(1, c, r0, m, block0 + 1, n, y);
      if (r0 + kTileRows < m) StoreTile(3, c, r0 + kTileRows, m, block0 + 1, n, y);
    }
  }
}

// A thread's AMX tile configuration, for as long as it runs items.
struct TileScope {
  TileScope() { ConfigureTiles(); }
  ~TileScope() { _tile_release(); }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> packed,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != 2 * kBlockCols || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("jaxinfer_amx_matmul: expected x [M, K], packed [N/16, K/2, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], kpad = 2 * pd[1], n = yd[1], blocks = pd[0];
  if (kpad % kTileK || kpad < k || kpad - k >= kTileK || (n + kBlockCols - 1) / kBlockCols != blocks)
    return ffi::Error::InvalidArgument("jaxinfer_amx_matmul: packed weights do not match x and y");
  const bool many_rows = m > kTileRows;
  const int64_t row_group = many_rows ? 2 * kTileRows : kTileRows;
  const int64_t m_pad = (m + row_group - 1) / row_group * row_group;
  std::vector<uint16_t> xb(m_pad * kpad, 0);
  const float* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r) jaxinfer::RoundToBf16(xs + r * k, k, xb.data() + r * kpad);
  const uint16_t* xp = xb.data();
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.typed_data());
  float* yp = y->typed_data();
  // Every output's sum runs over the same tile products in the same order in both arrangements.
  const int64_t per_item = many_rows ? 2 : kPanelBlocks;
  jaxinfer::ParallelFor<TileScope>(pool, (blocks + per_item - 1) / per_item, [=](int64_t item) {
    const int64_t block0 = item * per_item, count = std::min(per_item, blocks - block0);
    if (many_rows) PanelProduct2x2(xp, m, kpad, wp, n, block0, count, yp);
    else PanelProduct(xp, m, kpad, wp, n, block0, count, yp);
  });
  return ffi::Error::Success();
}

}  // namespace

// Asks Linux for the AMX tile state, which a process must request before its first tile
// instruction; true when granted.
extern "C" bool jaxinfer_amx_request() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_amx_matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
