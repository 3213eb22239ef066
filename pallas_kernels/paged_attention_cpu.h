// The attention of one sequence's query rows over its paged K/V, on CPU with AVX-512 or AVX2:
// shared by paged_attention_cpu.cc (decode and prefill attention) and decoder_layer_cpu.cc (a
// whole decode layer). Pools are [num_pages, KVH, page_size, D] of float32 or bfloat16, or of
// int8 or int4 codes with a float32 [num_pages, KVH, page_size, 2] pool of each row's scale and
// zero (value = code * scale + zero).
#ifndef JAXINFER_PAGED_ATTENTION_CPU_H_
#define JAXINFER_PAGED_ATTENTION_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_vec16.h"

namespace jaxinfer {

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

// A byte of an int4 page: two codes, the even head_dim element in the low nibble.
struct Nibbles {
  uint8_t pair;
};

// Elements i .. i + 16 of a pool's row (n of them live), widened to float32.
template <typename T>
V16 LoadRow(const T* row, int64_t i, int64_t n) {
  return V16::Load(n, row + i);
}
inline V16 LoadRow(const Nibbles* row, int64_t i, int64_t n) { return V16::LoadNibbles(n, &row[i / 2].pair); }

// The scales and zeros of quantized pages: sz_rows[t] is where token t's (scale, zero) pair
// starts in the K and V scale/zero pools, indexed as the token offsets are.
struct ScaleZero {
  const float* k;
  const float* v;
  const int64_t* rows;
};

// Keys (and values) read ahead of the one in use. A sequence's rows are runs of one page each
// (8 KiB of bfloat16 keys at SmolLM2's shapes), scattered over the pool, and a step reads them
// from DRAM: the hardware prefetcher restarts at every run, so the loops ask for the row 32 keys
// ahead themselves. With the whole-vector loads below, a batch-32 decode step ran 1.05x faster
// over bfloat16 pages and 1.06x over int8 pages than before (exploratory: two engines alternated
// in one process); 16 and 64 keys ahead were no better in a chain of this kernel alone.
constexpr int64_t kPrefetchKeys = 32;

template <typename T>
inline void PrefetchRow(const T* row, int64_t d) {
  const int64_t bytes = std::is_same_v<T, Nibbles> ? d / 2 : d * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// The next work item's K and V rows, requested into L2 a few lines at a time while the item before
// it computes. A decode item (one sequence and KV head) reads ~50 KB of scattered pages and
// computes on them for about as long as DRAM takes to deliver them; requested all at once at its
// start, the requests stall the core behind them, so the item pays for the reads and then for the
// arithmetic. Spread over the previous item's keys, the reads overlap it.
class NextRows {
 public:
  // rows[0 .. n) of k and v (pools of element size `elem`, rows of `row_bytes`), spread over
  // `calls` calls of Issue(); at most kMaxBytes of them, so this item's rows and the next one's
  // stay in L2 together.
  void Plan(const void* k, const void* v, const int64_t* rows, int64_t n, int64_t elem, int64_t row_bytes,
            int64_t calls) {
    k_ = static_cast<const char*>(k);
    v_ = static_cast<const char*>(v);
    rows_ = rows;
    elem_ = elem;
    lines_per_row_ = (row_bytes + 63) / 64;
    n_ = std::min(n, std::max<int64_t>(1, kMaxBytes / (2 * lines_per_row_ * 64)));
    const int64_t total = 2 * n_ * lines_per_row_;
    per_call_ = calls > 0 ? (total + calls - 1) / calls : total;
    t_ = line_ = 0;
    in_v_ = false;
  }

  // The next few lines: K rows first, then V rows.
  void Issue() {
    for (int64_t i = 0; i < per_call_ && t_ < n_; ++i) {
      _mm_prefetch((in_v_ ? v_ : k_) + rows_[t_] * elem_ + line_ * 64, _MM_HINT_T1);
      if (++line_ < lines_per_row_) continue;
      line_ = 0;
      if (++t_ == n_ && !in_v_) t_ = 0, in_v_ = true;
    }
  }

 private:
  static constexpr int64_t kMaxBytes = 256 << 10;
  const char *k_ = nullptr, *v_ = nullptr;
  const int64_t* rows_ = nullptr;
  int64_t elem_ = 0, lines_per_row_ = 0, n_ = 0, per_call_ = 0, t_ = 0, line_ = 0;
  bool in_v_ = false;
};

// Scores of G query heads (q: [G, d]) against keys rows[0 .. n): 16 keys at a time, each key
// read (and widened) once for the G heads, each head's lane-wise products over head_dim in order,
// then the 16 keys' sums reduced together. scores: [G, n]. kChunks: d / 16 when the caller knows
// it (the loads are then whole vectors and q stays in registers), else 0.
template <int G, int kChunks, typename T>
void Scores(const float* q, const T* k, const int64_t* rows, int64_t n, int64_t d, float scale, float* scores,
            NextRows* ahead) {
  const int64_t chunks = kChunks ? kChunks : (d + 15) / 16;
  V16 partial[G][16];
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - t0);
    for (int64_t j = 0; j < 16; ++j) {
      V16 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = V16::Zero();
      if (j < keys) {
        if (t0 + j + kPrefetchKeys < n) PrefetchRow(k + rows[t0 + j + kPrefetchKeys], d);
        if (ahead) ahead->Issue();
        const T* kr = k + rows[t0 + j];
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t i = 16 * c, live = kChunks ? 16 : d - i;
          const V16 kv = LoadRow(kr, i, live);
          for (int g = 0; g < G; ++g) acc[g] = V16::Fma(V16::Load(live, q + g * d + i), kv, acc[g]);
        }
      }
      for (int g = 0; g < G; ++g) partial[g][j] = acc[g];
    }
    for (int g = 0; g < G; ++g) (V16::ReduceEach(partial[g]) * V16::Set1(scale)).Store(keys, scores + g * n + t0);
  }
}

// out[G, d] = (the weights p [G, n] times values rows[0 .. n) + shift[G]) / total[G], 64 of
// head_dim at a time, summed in registers over the keys in order; each value row read (and
// widened) once for the G heads. p is unnormalized, total its sums; shift (null: none) is what
// quantized values' zeros add to every element. kWhole: d is a multiple of 64.
template <int G, bool kWhole, typename T>
void WeightedValues(const float* p, const T* v, const int64_t* rows, int64_t n, int64_t d, const float* total,
                    const float* shift, float* out, NextRows* ahead) {
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    const int64_t live = kWhole ? 64 : d - i0;
    V16 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = V16::Zero();
    for (int64_t t = 0; t < n; ++t) {
      if (i0 == 0) {
        if (t + kPrefetchKeys < n) PrefetchRow(v + rows[t + kPrefetchKeys], d);
        if (ahead) ahead->Issue();
      }
      const T* vr = v + rows[t];
      V16 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = live > 16 * c ? LoadRow(vr, i0 + 16 * c, live - 16 * c) : V16::Zero();
      for (int g = 0; g < G; ++g) {
        const V16 w = V16::Set1(p[g * n + t]);
        for (int c = 0; c < 4; ++c)
          if (live > 16 * c) acc[g][c] = V16::Fma(w, vv[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const V16 inv = V16::Set1(1.0f / total[g]), add = V16::Set1(shift ? shift[g] : 0.0f);
      for (int c = 0; c < 4; ++c) ((acc[g][c] + add) * inv).Store(live - 16 * c, out + g * d + i0 + 16 * c);
    }
  }
}

// Scores<G, ...> and WeightedValues<G, ...> for the head counts and head_dims met at run time.
template <int G, typename T>
void ScoresOf(const float* q, const T* k, const int64_t* rows, int64_t n, int64_t d, float scale, float* scores,
              NextRows* ahead) {
  if (d == 64) return Scores<G, 4>(q, k, rows, n, d, scale, scores, ahead);
  if (d == 128) return Scores<G, 8>(q, k, rows, n, d, scale, scores, ahead);
  Scores<G, 0>(q, k, rows, n, d, scale, scores, ahead);
}

template <int G, typename T>
void WeightedValuesOf(const float* p, const T* v, const int64_t* rows, int64_t n, int64_t d, const float* total,
                      const float* shift, float* out, NextRows* ahead) {
  if (d % 64 == 0) return WeightedValues<G, true>(p, v, rows, n, d, total, shift, out, ahead);
  WeightedValues<G, false>(p, v, rows, n, d, total, shift, out, ahead);
}

// The keys [lo, hi) a query row at q_pos sees: causal, within the window, and never past the
// block table, whatever seq_lens says (the reference clamps its reads too). Empty for padding rows.
struct Visible {
  int64_t lo, hi;
  int64_t n() const { return hi > lo ? hi - lo : 0; }
};

inline Visible VisibleKeys(const Shapes& s, int32_t len, int32_t q_pos, int64_t window) {
  if (len <= 0) return {0, 0};
  return {window > 0 ? std::max<int64_t>(0, int64_t{q_pos} - window + 1) : 0,
          std::min({int64_t{len}, int64_t{q_pos} + 1, s.pages_per_seq * s.page_size})};
}

// How often AttendGroup calls a NextRows' Issue() for a row that sees n keys: once per key in each
// of its two passes, for each block of kHeadsAtOnce query heads.
inline int64_t IssueCalls(const Shapes& s, int64_t n) { return 2 * n * ((s.group + kHeadsAtOnce - 1) / kHeadsAtOnce); }

// T, the pages' element: float, uint16_t holding a bfloat16, uint8_t (int8 codes) or Nibbles.
// offsets[t]: where token t's row of this sequence and KV head starts in a pool, for every t the
// block table covers up to len; sz: the scales and zeros of quantized pages (null for float ones);
// ahead: the next work item's rows, requested while this one computes (null: none).
template <typename T>
void AttendGroup(const Shapes& s, const float* q, const T* k, const T* v, const int64_t* offsets, int32_t len,
                 int32_t q_pos, int64_t kvh, float scale, int64_t window, float* out, const ScaleZero* sz = nullptr,
                 NextRows* ahead = nullptr) {
  const int64_t g_count = s.group, d = s.head_dim;
  const float* qg = q + kvh * g_count * d;
  float* og = out + kvh * g_count * d;
  const auto [lo, hi] = VisibleKeys(s, len, q_pos, window);
  const int64_t n = hi - lo;
  if (n <= 0) {  // padding row, or nothing visible: zeros, as the reference gives
    std::memset(og, 0, sizeof(float) * g_count * d);
    return;
  }
  thread_local std::vector<float> scores;
  scores.resize(g_count * n);
  const int64_t* rows = offsets + lo;
  // Quantized keys: q . (codes * scale + zero) = scale * (q . codes) + zero * sum(q), so the
  // products run over the codes and each key's scale and zero apply to its score.
  thread_local std::vector<float> key_scale, key_zero, value_scale, value_zero;
  if (sz) {
    for (auto* x : {&key_scale, &key_zero, &value_scale, &value_zero}) x->resize(n);
    for (int64_t t = 0; t < n; ++t) {
      if (t + kPrefetchKeys < n) {
        _mm_prefetch(reinterpret_cast<const char*>(sz->k + sz->rows[lo + t + kPrefetchKeys]), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sz->v + sz->rows[lo + t + kPrefetchKeys]), _MM_HINT_T0);
      }
      const int64_t at = sz->rows[lo + t];
      key_scale[t] = sz->k[at] * scale;
      key_zero[t] = sz->k[at + 1] * scale;
      value_scale[t] = sz->v[at];
      value_zero[t] = sz->v[at + 1];
    }
  }
  for (int64_t g0 = 0; g0 < g_count; g0 += kHeadsAtOnce) {
    const int64_t heads = std::min(kHeadsAtOnce, g_count - g0);
    float* sg = scores.data() + g0 * n;
    const float* qh = qg + g0 * d;
    const float unit = sz ? 1.0f : scale;
    switch (heads) {
      case 1: ScoresOf<1>(qh, k, rows, n, d, unit, sg, ahead); break;
      case 2: ScoresOf<2>(qh, k, rows, n, d, unit, sg, ahead); break;
      case 3: ScoresOf<3>(qh, k, rows, n, d, unit, sg, ahead); break;
      default: ScoresOf<4>(qh, k, rows, n, d, unit, sg, ahead); break;
    }
  }
  if (sz) {
    for (int64_t g = 0; g < g_count; ++g) {
      V16 q_sum = V16::Zero();
      for (int64_t i = 0; i < d; i += 16) q_sum = q_sum + V16::Load(d - i, qg + g * d + i);
      const V16 qs = V16::Set1(q_sum.ReduceAdd());
      float* sg = scores.data() + g * n;
      for (int64_t i = 0; i < n; i += 16)
        V16::Fma(V16::Load(n - i, key_scale.data() + i), V16::Load(n - i, sg + i),
                 V16::Load(n - i, key_zero.data() + i) * qs).Store(n - i, sg + i);
    }
  }
  thread_local std::vector<float> total, shift;
  total.resize(g_count);
  shift.resize(g_count);
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    V16 top = V16::Set1(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) top = V16::Max(top, V16::Load(n - i, sg + i, -INFINITY));
    const V16 m = V16::Set1(top.ReduceMax());
    V16 sum = V16::Zero(), zeros = V16::Zero();
    for (int64_t i = 0; i < n; i += 16) {
      V16 e = ExpNonPositive(V16::Load(n - i, sg + i) - m).Keep(n - i);
      sum = sum + e;
      if (sz) {  // sum_t p_t (codes_t * scale_t + zero_t) = sum_t (p_t scale_t) codes_t + sum_t p_t zero_t
        zeros = V16::Fma(e, V16::Load(n - i, value_zero.data() + i), zeros);
        e = e * V16::Load(n - i, value_scale.data() + i);
      }
      e.Store(n - i, sg + i);
    }
    total[g] = sum.ReduceAdd();
    shift[g] = zeros.ReduceAdd();
  }
  for (int64_t g0 = 0; g0 < g_count; g0 += kHeadsAtOnce) {
    const int64_t heads = std::min(kHeadsAtOnce, g_count - g0);
    const float* pg = scores.data() + g0 * n;
    float* o = og + g0 * d;
    const float* t = total.data() + g0;
    const float* add = sz ? shift.data() + g0 : nullptr;
    switch (heads) {
      case 1: WeightedValuesOf<1>(pg, v, rows, n, d, t, add, o, ahead); break;
      case 2: WeightedValuesOf<2>(pg, v, rows, n, d, t, add, o, ahead); break;
      case 3: WeightedValuesOf<3>(pg, v, rows, n, d, t, add, o, ahead); break;
      default: WeightedValuesOf<4>(pg, v, rows, n, d, t, add, o, ahead); break;
    }
  }
}

// Where each of a sequence's first `len` tokens' rows of `width` elements starts in a pool for KV
// head `kvh`, page by page from its block table row (pages clamped into the pool, tokens to the
// table).
inline void TokenOffsets(const Shapes& s, const int32_t* table, int32_t len, int64_t kvh, int64_t width,
                         std::vector<int64_t>& offsets) {
  const int64_t covered = std::clamp<int64_t>(len, 0, s.pages_per_seq * s.page_size);
  offsets.resize(covered);
  for (int64_t p = 0, t = 0; t < covered; ++p) {
    const int64_t page = std::clamp<int64_t>(table[p], 0, s.num_pages - 1);
    const int64_t base = (page * s.kv_heads + kvh) * s.page_size * width;
    for (int64_t o = 0; o < s.page_size && t < covered; ++o, ++t) offsets[t] = base + o * width;
  }
}

// Where one sequence's rows for one KV head start in the pools (and in the scale/zero pools of
// quantized pages), found from its block table row (TokenOffsets).
struct SequenceRows {
  std::vector<int64_t> offsets, sz_offsets;
  ScaleZero sz{};

  void Find(const Shapes& s, const int32_t* table, int32_t len, int64_t kvh, int64_t width, const float* k_sz,
            const float* v_sz) {
    TokenOffsets(s, table, len, kvh, width, offsets);
    sz = {k_sz, v_sz, nullptr};
    if (k_sz) {
      TokenOffsets(s, table, len, kvh, 2, sz_offsets);
      sz.rows = sz_offsets.data();
    }
  }
  const ScaleZero* scale_zero() const { return sz.k ? &sz : nullptr; }
};

// Decode attention (one query row per sequence) of pairs u0 .. u1 - 1, pair u being sequence
// u / kv_heads and KV head u % kv_heads: a run of a step's (sequence, KV head) pairs (RunLength),
// each pair requesting the next one's rows while it computes (NextRows). In a batch-32 step over
// bfloat16 pages the kernel alone ran 1.25-1.41x faster than with one pair per item and only the
// in-loop read-ahead, and 1.25x with each pair's rows requested all at once at its start
// (exploratory, alternated in one process). Sequence b's query row is q + b * q_stride, its output
// out + b * out_stride; width: the elements of T a pool row holds; k_sz, v_sz: the scale/zero
// pools of quantized pages (null for float ones).
template <typename T>
void AttendDecodeRun(const Shapes& s, const float* q, int64_t q_stride, const T* k, const T* v, int64_t width,
                     const float* k_sz, const float* v_sz, const int32_t* tables, const int32_t* lens,
                     const int32_t* positions, float scale, int64_t window, int64_t u0, int64_t u1, float* out,
                     int64_t out_stride) {
  thread_local SequenceRows rows[2];
  thread_local NextRows ahead;
  const auto find = [&](int64_t u) -> SequenceRows& {
    SequenceRows& r = rows[(u - u0) % 2];
    const int64_t b = u / s.kv_heads;
    r.Find(s, tables + b * s.pages_per_seq, lens[b], u % s.kv_heads, width, k_sz, v_sz);
    return r;
  };
  find(u0);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / s.kv_heads;
    NextRows* next = nullptr;
    if (u + 1 < u1) {
      const int64_t nb = (u + 1) / s.kv_heads;
      const Visible later = VisibleKeys(s, lens[nb], positions[nb], window);
      ahead.Plan(k, v, find(u + 1).offsets.data() + later.lo, later.n(), sizeof(T), width * sizeof(T),
                 IssueCalls(s, VisibleKeys(s, lens[b], positions[b], window).n()));
      next = &ahead;
    }
    const SequenceRows& r = rows[(u - u0) % 2];
    AttendGroup(s, q + b * q_stride, k, v, r.offsets.data(), lens[b], positions[b], u % s.kv_heads, scale, window,
                out + b * out_stride, r.scale_zero(), next);
  }
}

}  // namespace jaxinfer

#endif  // JAXINFER_PAGED_ATTENTION_CPU_H_
