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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The first n of 16 lanes (none for n <= 0).
__mmask16 Lanes(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

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

// Lane j of the result is the sum of the 16 lanes of a[j]: three rounds of pairwise shuffles and
// adds instead of sixteen full reductions.
__m512 ReduceEach(const __m512 a[16]) {
  __m512 pairs[8], quads[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: (a[2j] lanes 0+2, a[2j+1] 0+2, a[2j] 1+3, a[2j+1] 1+3)
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]),
                             _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the sums of a[4j .. 4j + 3] over that lane
    const __m512d x = _mm512_castps_pd(pairs[2 * j]), y = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Across the four 128-bit lanes: quads[j]'s lanes summed land in 128-bit lane j.
  auto halves = [](__m512 x, __m512 y) {  // 128-bit lanes (x0 + x1, x2 + x3, y0 + y1, y2 + y3)
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd));
  };
  const __m512 h01 = halves(quads[0], quads[1]), h23 = halves(quads[2], quads[3]);
  return halves(h01, h23);
}

struct Shapes {
  int64_t heads, kv_heads, group, head_dim, page_size, pages_per_seq, num_pages;
};

template <typename T>  // the pages' element: float, or uint16_t holding a bfloat16
// offsets[t]: where token t's row of this sequence and KV head starts in a pool, for every t the
// block table covers up to len.
void AttendGroup(const Shapes& s, const float* q, const T* k, const T* v, const int64_t* offsets, int32_t len,
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
  thread_local std::vector<float> scores;
  scores.resize(g_count * n);
  const int64_t* rows = offsets + lo;
  // 16 keys at a time, with independent sums, reduced together.
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - t0);
    for (int64_t g = 0; g < g_count; ++g) {
      const float* qh = qg + g * d;
      __m512 acc[16];
      for (int64_t j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mask = Lanes(d - i);
        const __m512 qv = _mm512_maskz_loadu_ps(mask, qh + i);
        for (int64_t j = 0; j < keys; ++j) acc[j] = _mm512_fmadd_ps(qv, Load(mask, k + rows[t0 + j] + i), acc[j]);
      }
      const __m512 sums = _mm512_mul_ps(ReduceEach(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores.data() + g * n + t0, Lanes(keys), sums);
    }
  }
  thread_local std::vector<float> total;
  total.resize(g_count);
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) top = _mm512_mask_max_ps(top, Lanes(n - i), top, _mm512_loadu_ps(sg + i));
    const float m = _mm512_reduce_max_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mask = Lanes(n - i);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + i), _mm512_set1_ps(m)));
      _mm512_mask_storeu_ps(sg + i, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  // The weighted values, 64 of head_dim at a time, summed in registers over the keys in order.
  for (int64_t g = 0; g < g_count; ++g) {
    const float* pg = scores.data() + g * n;
    const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
    for (int64_t i0 = 0; i0 < d; i0 += 64) {
      const __mmask16 m0 = Lanes(d - i0), m1 = Lanes(d - i0 - 16), m2 = Lanes(d - i0 - 32), m3 = Lanes(d - i0 - 48);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < n; ++t) {
        const T* vr = v + rows[t] + i0;
        const __m512 p = _mm512_set1_ps(pg[t]);
        a0 = _mm512_fmadd_ps(p, Load(m0, vr), a0);
        if (m1) a1 = _mm512_fmadd_ps(p, Load(m1, vr + 16), a1);
        if (m2) a2 = _mm512_fmadd_ps(p, Load(m2, vr + 32), a2);
        if (m3) a3 = _mm512_fmadd_ps(p, Load(m3, vr + 48), a3);
      }
      float* o = og + g * d + i0;
      _mm512_mask_storeu_ps(o, m0, _mm512_mul_ps(a0, inv));
      _mm512_mask_storeu_ps(o + 16, m1, _mm512_mul_ps(a1, inv));
      _mm512_mask_storeu_ps(o + 32, m2, _mm512_mul_ps(a2, inv));
      _mm512_mask_storeu_ps(o + 48, m3, _mm512_mul_ps(a3, inv));
    }
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
    // Where each token's row starts, page by page: computed once for the item's query rows.
    thread_local std::vector<int64_t> offsets;
    const int64_t covered = std::clamp<int64_t>(lens[b], 0, s.pages_per_seq * s.page_size);
    offsets.resize(covered);
    for (int64_t p = 0, t = 0; t < covered; ++p) {
      const int64_t page = std::clamp<int64_t>(tables[b * s.pages_per_seq + p], 0, s.num_pages - 1);
      const int64_t base = (page * s.kv_heads + kvh) * s.page_size * s.head_dim;
      for (int64_t o = 0; o < s.page_size && t < covered; ++o, ++t) offsets[t] = base + o * s.head_dim;
    }
    for (int64_t r = r0; r < std::min(q_len, r0 + kRowsPerItem); ++r) {
      const int64_t row = b * q_len + r;
      AttendGroup(s, q + row * per_row, k, v, offsets.data(), lens[b], positions[row], kvh, scale, window,
                  out + row * per_row);
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
