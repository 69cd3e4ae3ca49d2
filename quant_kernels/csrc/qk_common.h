// Helpers shared by the CPU kernel sources (qkernels.cpp, int8_act.cpp, int8_conv.cpp).
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace qk {

// at::parallel_for grain for `work` multiply-adds per item: a chunk gets at least 2^19 of them (~20 µs on
// one core), so small layers stay on one thread. A parallel region waits for every thread it starts, and
// on a shared or busy machine a descheduled thread costs a scheduler tick (milliseconds) per region.
inline int64_t grain(int64_t work_per_item, int64_t min_items = 1) {
  constexpr int64_t kMinWork = int64_t(1) << 19;
  return std::max(min_items, (kMinWork + work_per_item - 1) / std::max<int64_t>(work_per_item, 1));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

inline void check(const torch::Tensor& t, c10::ScalarType dt, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of the right dtype");
}

// max |x[0:K]| (AVX2)
inline float row_absmax(const float* x, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  float buf[8], amax = 0.f;
  _mm256_storeu_ps(buf, mx);
  for (float v : buf) amax = std::max(amax, v);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// int8 codes clamp(round-half-even(x / sc), ±127) of x[0:K] (T = int8_t or int16_t); same arithmetic as
// quantize_per_token: an IEEE division (not a multiply by 1/sc), rounding in the default mode
template <typename T>
inline void quantize_row(const float* x, int64_t K, float sc, T* out, float qmax = 127.f) {
  const __m256 s = _mm256_set1_ps(sc), lo = _mm256_set1_ps(-qmax), hi = _mm256_set1_ps(qmax);
  int64_t k = 0;
  alignas(32) int32_t buf[8];
  for (; k + 8 <= K; k += 8) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, q))));
    for (int j = 0; j < 8; ++j) out[k + j] = static_cast<T>(buf[j]);
  }
  for (; k < K; ++k) out[k] = static_cast<T>(std::min(qmax, std::max(-qmax, std::nearbyint(x[k] / sc))));
}

// fp32 bias of N outputs, or nullptr
inline const float* optional_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  check(*bias, at::kFloat, "bias");
  TORCH_CHECK(bias->numel() == N, "bias has the wrong size");
  return bias->data_ptr<float>();
}

}  // namespace qk
