// Helpers shared by the CPU kernel sources (qkernels.cpp, int8_act.cpp).
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

namespace qk {

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

}  // namespace qk
