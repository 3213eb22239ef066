// Paged attention over float32, bfloat16, int8 or int4 KV pages, on CPU with AVX-512 or AVX2:
// what paged_attention_reference computes, for decode (one query token per sequence) and prefill
// chunks alike, reading each visible key and value straight from its page instead of gathering
// the pages into a copy first.
//
// q [B, L, H, D], pools [num_pages, KVH, page_size, D], block_tables [B, P], seq_lens [B],
// q_positions [B, L] -> out [B, L, H, D]. Quantized pools (jaxinfer_paged_attention_quantized)
// hold uint8 codes [num_pages, KVH, page_size, D * bits / 8] beside float32 scale/zero pools
// [num_pages, KVH, page_size, 2]; the codes are widened as they are read, and each key's scale
// and zero applied to its score and weight (paged_attention_cpu.h).
//
// Work items: in a decode step, runs of (sequence, KV head) pairs, each pair requesting the next
// one's rows while it computes; in a prefill chunk, (sequence, KV head, 16 query rows), whose rows
// read the same keys while they are in cache. The G = H / KVH query heads of the group share each
// key and value read. Each query row sees the keys at positions up to
// its own (causal) and within the sliding window; softmax in two passes over them (scores, then
// the weighted sum of values), so each row's result depends on nothing else in the batch.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "paged_attention_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::AttendGroup;
using jaxinfer::Nibbles;
using jaxinfer::Shapes;

constexpr int64_t kRowsPerItem = 16;  // query rows of one sequence and KV head per prefill work item

// width: the elements of T a pool row holds; k_sz, v_sz: the scale/zero pools of quantized pages
// (null for float ones).
template <typename T>
void AttendAll(ffi::ThreadPool& pool, const Shapes& s, const float* q, const T* k, const T* v, int64_t width,
               const float* k_sz, const float* v_sz, const int32_t* tables, const int32_t* lens,
               const int32_t* positions, float scale, int64_t window, int64_t batch, int64_t q_len, float* out) {
  const int64_t per_row = s.heads * s.head_dim;
  if (q_len == 1) {
    const int64_t pairs = batch * s.kv_heads, run = jaxinfer::RunLength(pairs, pool.num_threads());
    jaxinfer::ParallelFor(pool, (pairs + run - 1) / run, [=, &s](int64_t item) {
      jaxinfer::AttendDecodeRun(s, q, per_row, k, v, width, k_sz, v_sz, tables, lens, positions, scale, window,
                                item * run, std::min(pairs, (item + 1) * run), out, per_row);
    });
    return;
  }
  const int64_t row_blocks = (q_len + kRowsPerItem - 1) / kRowsPerItem;
  jaxinfer::ParallelFor(pool, batch * s.kv_heads * row_blocks, [=, &s](int64_t item) {
    const int64_t b = item / (s.kv_heads * row_blocks), kvh = item / row_blocks % s.kv_heads;
    const int64_t r0 = item % row_blocks * kRowsPerItem;
    thread_local jaxinfer::SequenceRows rows;
    rows.Find(s, tables + b * s.pages_per_seq, lens[b], kvh, width, k_sz, v_sz);
    for (int64_t r = r0; r < std::min(q_len, r0 + kRowsPerItem); ++r) {
      const int64_t row = b * q_len + r;
      AttendGroup(s, q + row * per_row, k, v, rows.offsets.data(), lens[b], positions[row], kvh, scale, window,
                  out + row * per_row, rows.scale_zero());
    }
  });
}

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

bool ShapesMatch(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> td,
                 ffi::Span<const int64_t> pd) {
  return qd.size() == 4 && kd.size() == 4 && td.size() == 2 && pd.size() == 2 && qd[2] % kd[1] == 0 &&
         td[0] == qd[0] && pd[0] == qd[0] && pd[1] == qd[1];
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                          ffi::Buffer<ffi::S32> q_positions, ffi::ResultBuffer<ffi::F32> out, float scale,
                          int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = block_tables.dimensions(), pd = q_positions.dimensions();
  if (!ShapesMatch(qd, kd, td, pd) || kd[3] != qd[3])
    return ffi::Error::InvalidArgument("jaxinfer_paged_attention: shapes do not match");
  const ffi::DataType type = k.element_type();
  if (v.element_type() != type || (type != ffi::DataType::F32 && type != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("jaxinfer_paged_attention: K and V pages must both be float32 or bfloat16");
  const Shapes s{qd[2], kd[1], qd[2] / kd[1], qd[3], kd[2], td[1], kd[0]};
  const int32_t* tables = block_tables.typed_data();
  const int32_t* lens = seq_lens.typed_data();
  const int32_t* positions = q_positions.typed_data();
  if (type == ffi::DataType::F32)
    AttendAll(pool, s, q.typed_data(), static_cast<const float*>(k.untyped_data()),
              static_cast<const float*>(v.untyped_data()), s.head_dim, nullptr, nullptr, tables, lens, positions,
              scale, window, qd[0], qd[1], out->typed_data());
  else
    AttendAll(pool, s, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
              static_cast<const uint16_t*>(v.untyped_data()), s.head_dim, nullptr, nullptr, tables, lens, positions,
              scale, window, qd[0], qd[1], out->typed_data());
  return ffi::Error::Success();
}

ffi::Error PagedAttentionQuantized(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> k,
                                   ffi::Buffer<ffi::U8> v, ffi::Buffer<ffi::F32> k_scale_zero,
                                   ffi::Buffer<ffi::F32> v_scale_zero, ffi::Buffer<ffi::S32> block_tables,
                                   ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> q_positions,
                                   ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window, int64_t bits) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = block_tables.dimensions(), pd = q_positions.dimensions();
  const auto szd = k_scale_zero.dimensions();
  if ((bits != 8 && bits != 4) || !ShapesMatch(qd, kd, td, pd) || !SameDims(v.dimensions(), kd) ||
      qd[3] % (8 / bits) != 0 || kd[3] != qd[3] * bits / 8 || szd.size() != 4 ||
      !SameDims(v_scale_zero.dimensions(), szd) || szd[0] != kd[0] || szd[1] != kd[1] || szd[2] != kd[2] ||
      szd[3] != 2)
    return ffi::Error::InvalidArgument("jaxinfer_paged_attention_quantized: shapes do not match");
  const Shapes s{qd[2], kd[1], qd[2] / kd[1], qd[3], kd[2], td[1], kd[0]};
  const uint8_t *kc = k.typed_data(), *vc = v.typed_data();
  const float *ksz = k_scale_zero.typed_data(), *vsz = v_scale_zero.typed_data();
  if (bits == 8)
    AttendAll(pool, s, q.typed_data(), kc, vc, kd[3], ksz, vsz, block_tables.typed_data(), seq_lens.typed_data(),
              q_positions.typed_data(), scale, window, qd[0], qd[1], out->typed_data());
  else
    AttendAll(pool, s, q.typed_data(), reinterpret_cast<const Nibbles*>(kc), reinterpret_cast<const Nibbles*>(vc),
              kd[3], ksz, vsz, block_tables.typed_data(), seq_lens.typed_data(), q_positions.typed_data(), scale,
              window, qd[0], qd[1], out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_attention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_attention_quantized, PagedAttentionQuantized,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("bits"));
