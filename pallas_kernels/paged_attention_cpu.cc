// Paged attention over float32 or bfloat16 KV pages, on CPU with AVX-512 or AVX2: what
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
#include "cpu_vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxinfer::V16;

// e^x for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial; relative error below 2e-7.
V16 Exp(V16 x) {
  x = V16::Max(x, V16::Set1(-87.0f));
  const V16 n = V16::RoundInt(x * V16::Set1(1.44269504088896341f));
  V16 r = V16::Fma(n, V16::Set1(-0.693145751953125f), x);
  r = V16::Fma(n, V16::Set1(-1.428606765330187e-06f), r);
  V16 p = V16::Set1(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = V16::Fma(p, r, V16::Set1(c));
  return V16::Scale2(p, n);
}

// Query heads whose weighted values one pass over the value rows sums: 4 x 4 accumulators fit
// AVX-512's 32 registers; AVX2's 16 hold those of one head (each V16 is two registers there).
#ifdef __AVX512F__
constexpr int64_t kHeadsAtOnce = 4;
#else
constexpr int64_t kHeadsAtOnce = 1;
#endif

struct Shapes {
  int64_t heads, kv_heads, group, head_dim, page_size, pages_per_seq, num_pages;
};

// Scores of G query heads (q: [G, d]) against keys rows[0 .. n): 16 keys at a time, each key
// read (and widened) once for the G heads, each head's lane-wise products over head_dim in order,
// then the 16 keys' sums reduced together. scores: [G, n].
template <int G, typename T>
void Scores(const float* q, const T* k, const int64_t* rows, int64_t n, int64_t d, float scale, float* scores) {
  V16 partial[G][16];
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - t0);
    for (int64_t j = 0; j < 16; ++j) {
      V16 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = V16::Zero();
      if (j < keys) {
        const T* kr = k + rows[t0 + j];
        for (int64_t i = 0; i < d; i += 16) {
          const V16 kv = V16::Load(d - i, kr + i);
          for (int g = 0; g < G; ++g) acc[g] = V16::Fma(V16::Load(d - i, q + g * d + i), kv, acc[g]);
        }
      }
      for (int g = 0; g < G; ++g) partial[g][j] = acc[g];
    }
    for (int g = 0; g < G; ++g) (V16::ReduceEach(partial[g]) * V16::Set1(scale)).Store(keys, scores + g * n + t0);
  }
}

// out[G, d] = the weights p [G, n] (unnormalized; total: their sums) times values rows[0 .. n),
// 64 of head_dim at a time, summed in registers over the keys in order; each value row read (and
// widened) once for the G heads.
template <int G, typename T>
void WeightedValues(const float* p, const T* v, const int64_t* rows, int64_t n, int64_t d, const float* total,
                    float* out) {
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    const int64_t live = d - i0;
    V16 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = V16::Zero();
    for (int64_t t = 0; t < n; ++t) {
      const T* vr = v + rows[t] + i0;
      V16 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = live > 16 * c ? V16::Load(live - 16 * c, vr + 16 * c) : V16::Zero();
      for (int g = 0; g < G; ++g) {
        const V16 w = V16::Set1(p[g * n + t]);
        for (int c = 0; c < 4; ++c)
          if (live > 16 * c) acc[g][c] = V16::Fma(w, vv[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const V16 inv = V16::Set1(1.0f / total[g]);
      for (int c = 0; c < 4; ++c) (acc[g][c] * inv).Store(live - 16 * c, out + g * d + i0 + 16 * c);
    }
  }
}

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
  for (int64_t g0 = 0; g0 < g_count; g0 += kHeadsAtOnce) {
    const int64_t heads = std::min(kHeadsAtOnce, g_count - g0);
    float* sg = scores.data() + g0 * n;
    const float* qh = qg + g0 * d;
    switch (heads) {
      case 1: Scores<1>(qh, k, rows, n, d, scale, sg); break;
      case 2: Scores<2>(qh, k, rows, n, d, scale, sg); break;
      case 3: Scores<3>(qh, k, rows, n, d, scale, sg); break;
      default: Scores<4>(qh, k, rows, n, d, scale, sg); break;
    }
  }
  thread_local std::vector<float> total;
  total.resize(g_count);
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    V16 top = V16::Set1(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) top = V16::Max(top, V16::Load(n - i, sg + i, -INFINITY));
    const V16 m = V16::Set1(top.ReduceMax());
    V16 sum = V16::Zero();
    for (int64_t i = 0; i < n; i += 16) {
      const V16 e = Exp(V16::Load(n - i, sg + i) - m);
      e.Store(n - i, sg + i);
      sum = sum + e.Keep(n - i);
    }
    total[g] = sum.ReduceAdd();
  }
  for (int64_t g0 = 0; g0 < g_count; g0 += kHeadsAtOnce) {
    const int64_t heads = std::min(kHeadsAtOnce, g_count - g0);
    const float* pg = scores.data() + g0 * n;
    float* o = og + g0 * d;
    switch (heads) {
      case 1: WeightedValues<1>(pg, v, rows, n, d, total.data() + g0, o); break;
      case 2: WeightedValues<2>(pg, v, rows, n, d, total.data() + g0, o); break;
      case 3: WeightedValues<3>(pg, v, rows, n, d, total.data() + g0, o); break;
      default: WeightedValues<4>(pg, v, rows, n, d, total.data() + g0, o); break;
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
