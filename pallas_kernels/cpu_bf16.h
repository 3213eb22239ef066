// Rounding float32 to bfloat16 for jaxinfer's bfloat16-weight matmul kernels (AVX-512 builds only).
#ifndef JAXINFER_CPU_BF16_H_
#define JAXINFER_CPU_BF16_H_

#include <immintrin.h>

#include <cstdint>

namespace jaxinfer {

// Rounds n floats to bfloat16 to nearest even, bit for bit as XLA's convert (NaNs stay NaN).
// Per value in a scalar loop, this rounding took half of a 32-row AMX product's time.
inline void RoundToBf16(const float* src, int64_t n, uint16_t* dst) {
  const __m512i exp_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
    const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(live, src + i));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, odd)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, exp_mask), inf);
    const __m512i r = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), quiet);
    _mm512_mask_cvtepi32_storeu_epi16(dst + i, live, r);
  }
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_BF16_H_
