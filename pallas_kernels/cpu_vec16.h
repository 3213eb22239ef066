// 16 float32 lanes for jaxinfer's CPU kernels, in whichever instruction set the library is built
// for: one AVX-512 register, or two AVX2 registers. The kernels are written once against V16; a
// partial vector is always its first n lanes (n <= 0: none, n >= 16: all).
#ifndef JAXINFER_CPU_VEC16_H_
#define JAXINFER_CPU_VEC16_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace jaxinfer {

#ifdef __AVX512F__

inline __mmask16 Lanes(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

struct V16 {
  __m512 v;

  static V16 Zero() { return {_mm512_setzero_ps()}; }
  static V16 Set1(float x) { return {_mm512_set1_ps(x)}; }
  static V16 Load(const float* p) { return {_mm512_loadu_ps(p)}; }
  // The first n lanes from p, the rest `fill`; a bfloat16 is the top half of a float32.
  static V16 Load(int64_t n, const float* p, float fill = 0.0f) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), Lanes(n), p)};
  }
  static V16 Load(int64_t n, const uint16_t* p) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(Lanes(n), p)), 16))};
  }
  static V16 Load(int64_t n, const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(Lanes(n), p)))};
  }
  // 16 int4 codes, two per byte (the even lane in the low nibble) from p's first (n + 1) / 2 bytes.
  static V16 LoadNibbles(int64_t n, const uint8_t* p) {
    const __m128i b = _mm_maskz_loadu_epi8(Lanes(n >= 16 ? 8 : (n + 1) / 2), p), low = _mm_set1_epi8(0x0F);
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    const V16 x{_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes))};
    return n >= 16 ? x : x.Keep(n);  // an odd n's last byte holds one lane too many
  }
  void Store(int64_t n, float* p) const { _mm512_mask_storeu_ps(p, Lanes(n), v); }

  friend V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend V16 operator/(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
  static V16 Max(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
  static V16 Min(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
  // a * b + c, one rounding.
  static V16 Fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  // Lanes of the first n kept, the rest zero.
  V16 Keep(int64_t n) const { return {_mm512_maskz_mov_ps(Lanes(n), v)}; }
  float ReduceMax() const { return _mm512_reduce_max_ps(v); }
  float ReduceAdd() const { return _mm512_reduce_add_ps(v); }
  // Round to the nearest integer, and x * 2^n for integral n in [-126, 127].
  static V16 RoundInt(V16 x) { return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static V16 Scale2(V16 x, V16 n) { return {_mm512_scalef_ps(x.v, n.v)}; }

  // Lane j of the result is the sum of the 16 lanes of a[j]: three rounds of pairwise shuffles
  // and adds instead of sixteen full reductions.
  static V16 ReduceEach(const V16 a[16]) {
    __m512 pairs[8], quads[4];
    for (int j = 0; j < 8; ++j)  // per 128-bit lane: (a[2j] lanes 0+2, a[2j+1] 0+2, a[2j] 1+3, a[2j+1] 1+3)
      pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j].v, a[2 * j + 1].v),
                               _mm512_unpackhi_ps(a[2 * j].v, a[2 * j + 1].v));
    for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the sums of a[4j .. 4j + 3] over that lane
      const __m512d x = _mm512_castps_pd(pairs[2 * j]), y = _mm512_castps_pd(pairs[2 * j + 1]);
      quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                               _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // Across the four 128-bit lanes: quads[j]'s lanes summed land in 128-bit lane j.
    auto halves = [](__m512 x, __m512 y) {  // 128-bit lanes (x0 + x1, x2 + x3, y0 + y1, y2 + y3)
      return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd));
    };
    return {halves(halves(quads[0], quads[1]), halves(quads[2], quads[3]))};
  }
};

#else  // AVX2 and FMA

// Lane i of the mask is all ones when i < n - offset.
inline __m256i Lanes8(int64_t n, int offset) {
  const int64_t live = n - offset < 0 ? 0 : n - offset > 8 ? 8 : n - offset;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(live)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct V16 {
  __m256 lo, hi;

  static V16 Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V16 Set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static V16 Load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static V16 Load(int64_t n, const float* p, float fill = 0.0f) {
    if (n >= 16) return Load(p);
    const __m256i m0 = Lanes8(n, 0), m1 = Lanes8(n, 8);
    const __m256 f = _mm256_set1_ps(fill);
    return {_mm256_blendv_ps(f, _mm256_maskload_ps(p, m0), _mm256_castsi256_ps(m0)),
            _mm256_blendv_ps(f, _mm256_maskload_ps(p + 8, m1), _mm256_castsi256_ps(m1))};
  }
  static V16 Load(int64_t n, const uint16_t* p) {
    alignas(32) uint16_t part[16] = {};
    if (n < 16) {  // AVX2 has no 16-bit masked load
      std::memcpy(part, p, sizeof(uint16_t) * static_cast<size_t>(n < 0 ? 0 : n));
      p = part;
    }
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16))};
  }
  static V16 Load(int64_t n, const uint8_t* p) {
    uint8_t part[16] = {};
    if (n < 16) {  // AVX2 has no byte-masked load
      std::memcpy(part, p, static_cast<size_t>(n < 0 ? 0 : n));
      p = part;
    }
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
  }
  // 16 int4 codes, two per byte (the even lane in the low nibble) from p's first (n + 1) / 2 bytes.
  static V16 LoadNibbles(int64_t n, const uint8_t* p) {
    uint8_t part[8] = {};
    std::memcpy(part, p, static_cast<size_t>(n >= 16 ? 8 : n <= 0 ? 0 : (n + 1) / 2));
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(part)), low = _mm_set1_epi8(0x0F);
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    const V16 x{_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)))};
    return n >= 16 ? x : x.Keep(n);  // an odd n's last byte holds one lane too many
  }
  void Store(int64_t n, float* p) const {
    if (n >= 16) {
      _mm256_storeu_ps(p, lo);
      _mm256_storeu_ps(p + 8, hi);
      return;
    }
    _mm256_maskstore_ps(p, Lanes8(n, 0), lo);
    _mm256_maskstore_ps(p + 8, Lanes8(n, 8), hi);
  }

  friend V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  friend V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  friend V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  friend V16 operator/(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
  static V16 Max(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  static V16 Min(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
  static V16 Fma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  V16 Keep(int64_t n) const {
    return {_mm256_and_ps(lo, _mm256_castsi256_ps(Lanes8(n, 0))), _mm256_and_ps(hi, _mm256_castsi256_ps(Lanes8(n, 8)))};
  }
  static float Reduce8(__m256 x, __m128 (*op)(__m128, __m128)) {
    __m128 r = op(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = op(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(op(r, _mm_movehdup_ps(r)));
  }
  float ReduceMax() const { return Reduce8(_mm256_max_ps(lo, hi), [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }); }
  float ReduceAdd() const { return Reduce8(_mm256_add_ps(lo, hi), [](__m128 a, __m128 b) { return _mm_add_ps(a, b); }); }
  static V16 RoundInt(V16 x) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return {_mm256_round_ps(x.lo, kNearest), _mm256_round_ps(x.hi, kNearest)};
  }
  static V16 Scale2(V16 x, V16 n) {  // 2^n built in the exponent field
    auto pow2 = [](__m256 e) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(e), _mm256_set1_epi32(127)), 23));
    };
    return {_mm256_mul_ps(x.lo, pow2(n.lo)), _mm256_mul_ps(x.hi, pow2(n.hi))};
  }

  // Lane j of the result is the sum of the 16 lanes of a[j]: the two halves added, then eight
  // vectors' sums per half by horizontal adds.
  static V16 ReduceEach(const V16 a[16]) {
    auto eight = [](const V16* b) {
      __m256 s[8];
      for (int j = 0; j < 8; ++j) s[j] = _mm256_add_ps(b[j].lo, b[j].hi);
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
      // h0: 128-bit halves hold (s0, s1, s2, s3) over lanes 0-3 and over lanes 4-7; h1 likewise.
      return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
    };
    return {eight(a), eight(a + 8)};
  }
};

#endif

// e^x for x <= 0 (softmax scores minus their maximum): 2^n * p(r), r = x - n ln 2 in
// [-ln2/2, ln2/2], p the degree-6 Taylor polynomial; relative error below 2e-7.
inline V16 ExpNonPositive(V16 x) {
  x = V16::Max(x, V16::Set1(-87.0f));
  const V16 n = V16::RoundInt(x * V16::Set1(1.44269504088896341f));
  V16 r = V16::Fma(n, V16::Set1(-0.693145751953125f), x);
  r = V16::Fma(n, V16::Set1(-1.428606765330187e-06f), r);
  V16 p = V16::Set1(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = V16::Fma(p, r, V16::Set1(c));
  return V16::Scale2(p, n);
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_VEC16_H_
