// Paged attention over float32 or bfloat16 KV pages, on CPU with AVX-512: what
// paged_attention_reference computes, for decode (one query token per sequence) and prefill
// chunks alike, reading each visible key and value straight from its page instead of gathering
// the pages into a copy first.
//
// q [B, L, H, D], pools [num_pages, KVH, page_size, D], block_tables [B, P], seq_lens [B],
// q_positions [B, L] -> out [B, L, H, D]. One work item per (sequence, KV head, 16 query rows):
// the G = H / KVH query heads of the group share each key and value read, and a chunk's rows
// read the same keys while they are in cache. Each query row sees the keys at positions up to
// its own (causal) and within the sliding window; softmax in two passes over them (scores, then
// the weighted sum of values), so each row's result depends on nothing else in the batch.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

__mmask16 Lanes(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// Up to 16 K or V values widened to float32 (a bfloat16 is the top half of a float32).
__m512 Load(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
__m512 Load(__mmask16 mask, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// e^x for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial; relative error below 2e-7.
__m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

struct Shapes {
  int64_t heads, kv_heads, group, head_dim, page_size, pages_per_seq, num_pages;
};

template <typename T>  // the pages' element: float, or uint16_t holding a bfloat16
void AttendGroup(const Shapes& s, const float* q, const T* k, const T* v, const int32_t* table, int32_t len,
                 int32_t q_pos, int64_t kvh, float scale, int64_t window, float* out) {
  const int64_t g_count = s.group, d = s.head_dim;
  const float* qg = q + kvh * g_count * d;
  float* og = out + kvh * g_count * d;
  // Never past the block table, whatever seq_lens says (the reference clamps its reads too).
  const int64_t hi = std::min({int64_t{len}, int64_t{q_pos} + 1, s.pages_per_seq * s.page_size});
  const int64_t lo = window > 0 ? std::max<int64_t>(0, int64_t{q_pos} - window + 1) : 0;
  const int64_t n = hi - lo;
  if (len <= 0 || n <= 0) {  // padding row, or nothing visible: zeros, as the reference gives
    std::memset(og, 0, sizeof(float) * g_count * d);
    return;
  }
  thread_local std::vector<float> scores, acc;
  scores.resize(g_count * n);
  acc.assign(g_count * d, 0.0f);
  auto row = [&](const T* pool, int64_t t) {
    const int64_t page = std::clamp<int64_t>(table[t / s.page_size], 0, s.num_pages - 1);
    return pool + ((page * s.kv_heads + kvh) * s.page_size + t % s.page_size) * d;
  };
  // 16 keys at a time, with independent sums, so that the reductions overlap.
  for (int64_t t0 = lo; t0 < hi; t0 += 16) {
    const int64_t keys = std::min<int64_t>(16, hi - t0);
    const T* kr[16];
    for (int64_t j = 0; j < keys; ++j) kr[j] = row(k, t0 + j);
    for (int64_t g = 0; g < g_count; ++g) {
      const float* qh = qg + g * d;
      __m512 acc[16];
      for (int64_t j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mask = Lanes(d - i);
        const __m512 qv = _mm512_maskz_loadu_ps(mask, qh + i);
        for (int64_t j = 0; j < keys; ++j) acc[j] = _mm512_fmadd_ps(qv, Load(mask, kr[j] + i), acc[j]);
      }
      for (int64_t j = 0; j < keys; ++j) scores[g * n + (t0 - lo + j)] = _mm512_reduce_add_ps(acc[j]) * scale;
    }
  }
  thread_local std::vector<float> total;
  total.resize(g_count);
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    const float m = *std::max_element(sg, sg + n);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mask = Lanes(n - i);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + i), _mm512_set1_ps(m)));
      _mm512_mask_storeu_ps(sg + i, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t t = lo; t < hi; ++t) {
    const T* vr = row(v, t);
    for (int64_t g = 0; g < g_count; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + (t - lo)]);
      float* a = acc.data() + g * d;
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mask = Lanes(d - i);
        _mm512_mask_storeu_ps(a + i, mask,
                              _mm512_fmadd_ps(p, Load(mask, vr + i), _mm512_maskz_loadu_ps(mask, a + i)));
      }
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    const float inv = 1.0f / total[g];
    for (int64_t i = 0; i < d; ++i) og[g * d + i] = acc[g * d + i] * inv;
  }
}

constexpr int64_t kRowsPerItem = 16;  // query rows of one sequence and KV head per work item

template <typename T>
void AttendAll(ffi::ThreadPool& pool, const Shapes& s, const float* q, const T* k, const T* v, const int32_t* tables,
               const int32_t* lens, const int32_t* positions, float scale, int64_t window, int64_t batch,
               int64_t q_len, float* out) {
  const int64_t per_row = s.heads * s.head_dim, row_blocks = (q_len + kRowsPerItem - 1) / kRowsPerItem;
  jaxinfer::ParallelFor(pool, batch * s.kv_heads * row_blocks, [=, &s](int64_t item) {
    const int64_t b = item / (s.kv_heads * row_blocks), kvh = item / row_blocks % s.kv_heads;
    const int64_t r0 = item % row_blocks * kRowsPerItem;
    for (int64_t r = r0; r < std::min(q_len, r0 + kRowsPerItem); ++r) {
      const int64_t row = b * q_len + r;
      AttendGroup(s, q + row * per_row, k, v, tables + b * s.pages_per_seq, lens[b], positions[row], kvh, scale,
                  window, out + row * per_row);
    }
  });
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                          ffi::Buffer<ffi::S32> q_positions, ffi::ResultBuffer<ffi::F32> out, float scale,
                          int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = block_tables.dimensions(), pd = q_positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || pd.size() != 2 || kd[3] != qd[3] || qd[2] % kd[1] != 0 ||
      td[0] != qd[0] || pd[0] != qd[0] || pd[1] != qd[1])
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
              static_cast<const float*>(v.untyped_data()), tables, lens, positions, scale, window, qd[0], qd[1],
              out->typed_data());
  else
    AttendAll(pool, s, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
              static_cast<const uint16_t*>(v.untyped_data()), tables, lens, positions, scale, window, qd[0], qd[1],
              out->typed_data());
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
