// What one core's vector units multiply-accumulate per second in a matmul's register tile, by
// arithmetic (for benchmarks/cpu_tiles.py). Each tile is 6 rows x 16 columns over K = 576, its
// operands in L1, as the f32 kernel's AVX2 tile is (pallas_kernels/f32_matmul.cc). Needs AVX2 and
// FMA; prints one line per pass: name=GMAC/s ...
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kK = 576, kRows = 6;

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// float32: w [K][16], one broadcast x value per row and k.
__attribute__((noinline)) void F32(const float* x, const float* w, float* y) {
  __m256 a[kRows][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_ps();
  for (int k = 0; k < kK; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * 16), w1 = _mm256_loadu_ps(w + k * 16 + 8);
    for (int r = 0; r < kRows; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * kK + k);
      a[r][0] = _mm256_fmadd_ps(xr, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(xr, w1, a[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(y + r * 16, a[r][0]);
    _mm256_storeu_ps(y + r * 16 + 8, a[r][1]);
  }
}

// An integer tile's int32 sums into y [kRows][16].
void Store(const __m256i (&a)[kRows][2], int32_t* y) {
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * 16), a[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * 16 + 8), a[r][1]);
  }
}

// int16: pairs of k per 32-bit lane, vpmaddwd then vpaddd; w [K/2][16][2].
__attribute__((noinline)) void I16(const int16_t* x, const int16_t* w, int32_t* y) {
  __m256i a[kRows][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_si256();
  for (int k = 0; k < kK; k += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 16));
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * kK + k, sizeof(pair));
      const __m256i xr = _mm256_set1_epi32(pair);
      a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(xr, w0));
      a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(xr, w1));
    }
  }
  Store(a, y);
}

// int8: quads of k per 32-bit lane, vpmaddubsw (unsigned x signed bytes, adjacent products summed
// into int16, saturating) then vpmaddwd by ones and vpaddd; w [K/4][16][4]. With kSign, llama.cpp's
// AVX2 way to avoid the saturation: |w| times x carrying w's sign (vpsignb), so each int16 pair
// sum stays within 2 x 127 x 127.
template <bool kSign>
__attribute__((noinline)) void I8(const int8_t* x, const int8_t* w, const int8_t* w_abs, int32_t* y) {
  __m256i a[kRows][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int k = 0; k < kK; k += 4) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 32));
    __m256i u0 = w0, u1 = w1;
    if (kSign) {
      u0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_abs + k * 16));
      u1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_abs + k * 16 + 32));
    }
    for (int r = 0; r < kRows; ++r) {
      int32_t quad;
      __builtin_memcpy(&quad, x + r * kK + k, sizeof(quad));
      const __m256i xr = _mm256_set1_epi32(quad);
      const __m256i p0 = kSign ? _mm256_maddubs_epi16(u0, _mm256_sign_epi8(xr, w0)) : _mm256_maddubs_epi16(xr, w0);
      const __m256i p1 = kSign ? _mm256_maddubs_epi16(u1, _mm256_sign_epi8(xr, w1)) : _mm256_maddubs_epi16(xr, w1);
      a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(p0, ones));
      a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  Store(a, y);
}

template <typename Fn>
double GmacPerSecond(int reps, Fn fn) {
  const double t = Now();
  for (int i = 0; i < reps; ++i) fn();
  return double(kRows) * 16 * kK * reps / (Now() - t) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int passes = argc > 1 ? std::atoi(argv[1]) : 5, reps = argc > 2 ? std::atoi(argv[2]) : 100000;
  std::vector<float> xf(kRows * kK, 0.5f), wf(kK * 16, 0.25f), yf(kRows * 16);
  std::vector<int16_t> x16(kRows * kK, 3), w16(kK * 16, -2);
  std::vector<int8_t> x8(kRows * kK, 3), w8(kK * 16, -2), w8_abs(kK * 16, 2);
  std::vector<int32_t> yi(kRows * 16);
  // Every tile's sums are checked (576 x 0.125; 576 x -6), so that none is optimized away.
  for (int p = 0; p < passes; ++p) {
    yf[0] = 0;
    yi[0] = 0;
    const double f32 = GmacPerSecond(reps, [&] { F32(xf.data(), wf.data(), yf.data()); });
    bool right = yf[0] == 72.0f;
    const double i16 = GmacPerSecond(reps, [&] { I16(x16.data(), w16.data(), yi.data()); });
    right = right && yi[0] == -3456;
    yi[0] = 0;
    const double u8 = GmacPerSecond(reps, [&] { I8<false>(x8.data(), w8.data(), nullptr, yi.data()); });
    right = right && yi[0] == -3456;
    yi[0] = 0;
    const double s8 = GmacPerSecond(reps, [&] { I8<true>(x8.data(), w8.data(), w8_abs.data(), yi.data()); });
    right = right && yi[0] == -3456;
    if (!right) return 1;
    std::printf("f32_fma=%.2f i16_madd=%.2f u8s8_maddubs=%.2f s8_sign_maddubs=%.2f\n", f32, i16, u8, s8);
    std::fflush(stdout);
  }
  return 0;
}
