// The machine's read bandwidth right now: two threads sum the two halves of a buffer much larger
// than the caches, with AVX2 loads into four accumulators each (the way a batch-1 decode step
// streams its weights). Prints the median pass in GB/s.
//
//   read_bandwidth MB PASSES
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

float SumRange(const float* p, size_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a = _mm256_add_ps(a, _mm256_load_ps(p + i));
    b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
    c = _mm256_add_ps(c, _mm256_load_ps(p + i + 16));
    d = _mm256_add_ps(d, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  float s = 0;
  for (float x : out) s += x;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: read_bandwidth MB PASSES\n");
    return 2;
  }
  const size_t n = static_cast<size_t>(std::atol(argv[1])) * (1 << 20) / sizeof(float) / 64 * 64;
  const int passes = std::atoi(argv[2]);
  auto* buf = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  for (size_t i = 0; i < n; ++i) buf[i] = 1.0f;  // touch every page before timing
  std::vector<double> gbs;
  float sums[2];
  for (int p = 0; p < passes; ++p) {
    const auto t0 = std::chrono::steady_clock::now();
    std::thread helper([&] { sums[1] = SumRange(buf + n / 2, n / 2); });
    sums[0] = SumRange(buf, n / 2);
    helper.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sums[0] + sums[1] <= 0) std::fprintf(stderr, "unexpected sum\n");  // keeps the reads
    gbs.push_back(n * sizeof(float) / s / 1e9);
  }
  std::sort(gbs.begin(), gbs.end());
  std::printf("%.2f\n", gbs[gbs.size() / 2]);
  std::free(buf);
  return 0;
}
