// One Llama decoder layer of a step (a decode step's one token per sequence, or a prefill
// chunk's L), float32 on CPU with AVX-512 or AVX2, as one call: what decoder_layer_reference
// computes.
//
//   h = rmsnorm(x) * input_norm;  q, k, v = h @ Wqkv (+ bias);  rope on q and k;
//   k, v written at each token's slot;  o = causal paged attention of q;  x1 = x + o @ Wo;
//   h2 = rmsnorm(x1) * post_norm;  out = x1 + (silu(h2 @ Wgate) * (h2 @ Wup)) @ Wdown
//
// x [B, L, E]; weights packed as f32_matmul.pack does ([ceil(N / 16), K, 16]); cos, sin
// [B, L, D / 2]; K/V pools [num_pages, KVH, page_size, D] float32, updated in place (aliased to the
// results); slots, positions [B, L], seq_lens [B], block_tables [B, P] int32.
//
// Why one call: at batch 1 a layer's weights take ~0.4 ms to stream, and as separate XLA ops the
// norms, rope, K/V writes, residual adds and the activation cost ~20 small ops and as many
// hand-offs between XLA's threads per layer (~1.6 ms of a 14.6 ms SmolLM2 step, profile_step.py).
// Here the phases run back to back on the same threads (RunPhases). The projections use the
// standalone matmul's tile (f32_matmul_tile.h) and the attention its kernel's code
// (paged_attention_cpu.h), so every product sums in the same order as there. Each token's result
// depends on nothing else in the step, and decode steps and prefill chunks compute a token alike,
// bit for bit: a sequence preempted and recomputed by prefill resumes exactly where it was.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_matmul_tiles.h"
#include "cpu_parallel.h"
#include "cpu_vec16.h"
#include "f32_matmul_tile.h"
#include "paged_attention_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::F32Tile;
using jaxinfer::F32TileBlocks;
using jaxinfer::kBlockCols;
using jaxinfer::TileGrid;
using jaxinfer::V16;

// A projection of the layer: y [m, n] = x [m, k] times packed weights, on a grid of work items.
struct Projection {
  const float* x;
  const float* packed;
  float* y;
  int64_t k, n;
  TileGrid grid;

  Projection(const float* x, const float* packed, float* y, int64_t m, int64_t k, int64_t n, int64_t threads)
      : x(x), packed(packed), y(y), k(k), n(n),
        grid{m, n, (n + kBlockCols - 1) / kBlockCols,
             TileGrid::EvenPanelBlocks((n + kBlockCols - 1) / kBlockCols, m, threads)} {}

  void Run(int64_t item) const {
    const int64_t stride = k * kBlockCols;
    grid.RunItem<F32TileBlocks>(item, [this, stride](int64_t r0, int rows, int64_t block0, int count, int last_cols) {
      jaxinfer::TileTable<F32Tile, F32TileBlocks>::For(rows, count)(x + r0 * k, k, packed + block0 * stride, stride,
                                                                    y + r0 * n + block0 * kBlockCols, n, last_cols,
                                                                    nullptr);
    });
  }
};

// out [e] = x * rsqrt(mean(x^2) + eps) * weight.
void RmsNorm(const float* x, const float* weight, int64_t e, float eps, float* out) {
  V16 squares = V16::Zero();
  for (int64_t i = 0; i < e; i += 16) {
    const V16 v = V16::Load(e - i, x + i);
    squares = V16::Fma(v, v, squares);
  }
  const V16 inv = V16::Set1(1.0f / std::sqrt(squares.ReduceAdd() / static_cast<float>(e) + eps));
  for (int64_t i = 0; i < e; i += 16) (V16::Load(e - i, x + i) * inv * V16::Load(e - i, weight + i)).Store(e - i, out + i);
}

// heads [count, d] rotated in place by cos, sin [d / 2] (HF's half layout).
void Rope(float* heads, int64_t count, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < count; ++h) {
    float* x1 = heads + h * d;
    float* x2 = x1 + half;
    for (int64_t i = 0; i < half; i += 16) {
      const int64_t live = half - i;
      const V16 a = V16::Load(live, x1 + i), b = V16::Load(live, x2 + i);
      const V16 c = V16::Load(live, cos + i), s = V16::Load(live, sin + i);
      (a * c - b * s).Store(live, x1 + i);
      (b * c + a * s).Store(live, x2 + i);
    }
  }
}

// gate [n] = silu(gate) * up, silu(g) = g * e^min(g,0) / (e^min(g,0) + e^-max(g,0)): both
// exponents are <= 0, so neither overflows.
void SiluTimes(float* gate, const float* up, int64_t n) {
  const V16 zero = V16::Zero();
  for (int64_t i = 0; i < n; i += 16) {
    const V16 g = V16::Load(n - i, gate + i);
    const V16 num = jaxinfer::ExpNonPositive(V16::Min(g, zero));
    const V16 den = jaxinfer::ExpNonPositive(zero - V16::Max(g, zero));
    (g * num / (num + den) * V16::Load(n - i, up + i)).Store(n - i, gate + i);
  }
}

// Spans' equality (XLA's Span has no operator==).
bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

int64_t Count(const ffi::Buffer<ffi::F32>& b) { return static_cast<int64_t>(b.element_count()); }
int64_t Count(const ffi::Buffer<ffi::S32>& b) { return static_cast<int64_t>(b.element_count()); }

// A prefill chunk's tokens attended per work item (with one KV head of their sequence): they read
// the same keys while those are in cache, as in paged_attention_cpu.cc.
constexpr int64_t kRowsPerItem = 16;

enum Phase { kInputNorm, kQkv, kRopeWrite, kAttend, kOut, kPostNorm, kGateUp, kActivation, kDown, kResidual };

ffi::Error DecoderLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> input_norm,
                        ffi::Buffer<ffi::F32> qkv_w, ffi::Buffer<ffi::F32> qkv_bias, ffi::Buffer<ffi::F32> cos,
                        ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> k_pool, ffi::Buffer<ffi::F32> v_pool,
                        ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> block_tables,
                        ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> o_w,
                        ffi::Buffer<ffi::F32> post_norm, ffi::Buffer<ffi::F32> gate_w, ffi::Buffer<ffi::F32> up_w,
                        ffi::Buffer<ffi::F32> down_w, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out, float eps, float scale,
                        int64_t window, int64_t heads) {
  const auto xd = x.dimensions(), kd = k_pool.dimensions(), td = block_tables.dimensions();
  const auto qd = qkv_w.dimensions(), od = o_w.dimensions(), gd = gate_w.dimensions(), dd = down_w.dimensions();
  if (xd.size() != 3 || kd.size() != 4 || td.size() != 2 || qd.size() != 3 || od.size() != 3 || gd.size() != 3 ||
      dd.size() != 3 || !SameDims(v_pool.dimensions(), kd) || !SameDims(up_w.dimensions(), gd) || heads <= 0 || heads % kd[1] != 0)
    return ffi::Error::InvalidArgument("jaxinfer_decoder_layer: operands of the wrong rank");
  const int64_t batch = xd[0], q_len = xd[1], tokens = batch * q_len, e = xd[2];
  const int64_t kvh = kd[1], d = kd[3], q_dim = heads * d, kv_dim = kvh * d;
  const int64_t qkv_n = q_dim + 2 * kv_dim, inter = dd[1];
  const auto blocks = [](int64_t n) { return (n + kBlockCols - 1) / kBlockCols; };
  if (qd[1] != e || qd[0] != blocks(qkv_n) || od[1] != q_dim || od[0] != blocks(e) || gd[1] != e ||
      gd[0] != blocks(inter) || dd[0] != blocks(e) || Count(input_norm) != e || Count(post_norm) != e ||
      (Count(qkv_bias) != 0 && Count(qkv_bias) != qkv_n) || Count(cos) != tokens * d / 2 ||
      Count(sin) != tokens * d / 2 || d % 2 != 0 || Count(slots) != tokens || Count(seq_lens) != batch ||
      Count(positions) != tokens || td[0] != batch)
    return ffi::Error::InvalidArgument("jaxinfer_decoder_layer: shapes do not match");
  // XLA hands over the pools aliased to the results: updating the results updates the cache.
  if (k_out->typed_data() != k_pool.typed_data() || v_out->typed_data() != v_pool.typed_data())
    return ffi::Error::InvalidArgument("jaxinfer_decoder_layer: the pools must be aliased to the results");

  // Scratch, per token: h [E] (both norms' outputs), qkv [qkv_n], attention [q_dim], projected [E]
  // (o and down projections), gate and up [inter].
  thread_local std::vector<float> scratch;
  scratch.resize(tokens * (2 * e + qkv_n + q_dim + 2 * inter));
  float* h = scratch.data();
  float* qkv = h + tokens * e;
  float* attn = qkv + tokens * qkv_n;
  float* projected = attn + tokens * q_dim;
  float* gate = projected + tokens * e;
  float* up = gate + tokens * inter;

  const jaxinfer::Shapes s{heads, kvh, heads / kvh, d, kd[2], td[1], kd[0]};
  const int64_t threads = pool.num_threads();
  const Projection qkv_proj(h, qkv_w.typed_data(), qkv, tokens, e, qkv_n, threads);
  const Projection o_proj(attn, o_w.typed_data(), projected, tokens, q_dim, e, threads);
  const Projection gate_proj(h, gate_w.typed_data(), gate, tokens, e, inter, threads);
  const Projection up_proj(h, up_w.typed_data(), up, tokens, e, inter, threads);
  const Projection down_proj(gate, down_w.typed_data(), projected, tokens, inter, e, threads);
  const float* xp = x.typed_data();
  const float* bias = Count(qkv_bias) ? qkv_bias.typed_data() : nullptr;
  float* outp = out->typed_data();
  float* kp = k_out->typed_data();
  float* vp = v_out->typed_data();
  const int32_t* slot = slots.typed_data();
  const int32_t* tables = block_tables.typed_data();
  const int32_t* lens = seq_lens.typed_data();
  const int32_t* pos = positions.typed_data();
  const float* cosp = cos.typed_data();
  const float* sinp = sin.typed_data();
  const float* in_norm = input_norm.typed_data();
  const float* post = post_norm.typed_data();
  const int64_t pool_tokens = s.num_pages * s.page_size;

  // Decode attends in runs of (sequence, KV head) pairs, a prefill chunk in blocks of its tokens.
  const int64_t row_blocks = (q_len + kRowsPerItem - 1) / kRowsPerItem;
  const int64_t pairs = batch * kvh, run = jaxinfer::RunLength(pairs, threads);
  const int64_t attend_items = q_len == 1 ? (pairs + run - 1) / run : batch * kvh * row_blocks;
  const std::vector<int64_t> counts = {
      tokens, qkv_proj.grid.items(), tokens, attend_items, o_proj.grid.items(), tokens,
      gate_proj.grid.items() + up_proj.grid.items(), tokens, down_proj.grid.items(), tokens};
  jaxinfer::RunPhases(pool, counts, [&](int phase, int64_t i) {
    switch (phase) {
      case kInputNorm: RmsNorm(xp + i * e, in_norm, e, eps, h + i * e); break;
      case kQkv: qkv_proj.Run(i); break;
      case kRopeWrite: {  // token i: bias, rope on its q and k heads, k and v into its slot
        float* row = qkv + i * qkv_n;
        if (bias != nullptr)
          for (int64_t j = 0; j < qkv_n; ++j) row[j] += bias[j];
        Rope(row, heads + kvh, d, cosp + i * d / 2, sinp + i * d / 2);
        // A slot outside the pools (never handed out) lands on a page clamped into them, as
        // the attention clamps its reads. Padding tokens all write the trash page.
        const int64_t flat = std::clamp<int64_t>(slot[i], 0, pool_tokens - 1);
        const int64_t page = flat / s.page_size, offset = flat % s.page_size;
        for (int64_t g = 0; g < kvh; ++g) {
          const int64_t at = ((page * kvh + g) * s.page_size + offset) * d;
          std::copy_n(row + q_dim + g * d, d, kp + at);
          std::copy_n(row + q_dim + kv_dim + g * d, d, vp + at);
        }
        break;
      }
      case kAttend: {
        if (q_len == 1) {
          jaxinfer::AttendDecodeRun(s, qkv, qkv_n, static_cast<const float*>(kp), static_cast<const float*>(vp), d,
                                    nullptr, nullptr, tables, lens, pos, scale, window, i * run,
                                    std::min(pairs, (i + 1) * run), attn, q_dim);
          break;
        }
        // up to kRowsPerItem tokens of sequence b, KV head g, reading the same keys
        const int64_t b = i / (kvh * row_blocks), g = i / row_blocks % kvh, r0 = i % row_blocks * kRowsPerItem;
        const int64_t r_end = std::min(q_len, r0 + kRowsPerItem);
        thread_local std::vector<int64_t> offsets;
        jaxinfer::TokenOffsets(s, tables + b * s.pages_per_seq, lens[b], g, s.head_dim, offsets);
        for (int64_t t = b * q_len + r0; t < b * q_len + r_end; ++t)
          jaxinfer::AttendGroup(s, qkv + t * qkv_n, static_cast<const float*>(kp), static_cast<const float*>(vp),
                                offsets.data(), lens[b], pos[t], g, scale, window, attn + t * q_dim);
        break;
      }
      case kOut: o_proj.Run(i); break;
      case kPostNorm:
        for (int64_t j = 0; j < e; j += 16)
          (V16::Load(e - j, xp + i * e + j) + V16::Load(e - j, projected + i * e + j)).Store(e - j, outp + i * e + j);
        RmsNorm(outp + i * e, post, e, eps, h + i * e);
        break;
      case kGateUp:
        if (i < gate_proj.grid.items())
          gate_proj.Run(i);
        else
          up_proj.Run(i - gate_proj.grid.items());
        break;
      case kActivation: SiluTimes(gate + i * inter, up + i * inter, inter); break;
      case kDown: down_proj.Run(i); break;
      case kResidual:
        for (int64_t j = 0; j < e; j += 16)
          (V16::Load(e - j, outp + i * e + j) + V16::Load(e - j, projected + i * e + j)).Store(e - j, outp + i * e + j);
        break;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_decoder_layer, DecoderLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // input_norm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv_w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv_bias ([0]: none)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o_w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // post_norm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up_w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // down_w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k_pool, updated
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_pool, updated
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("heads"));
