// Helpers shared by the CPU kernel sources (qkernels.cpp, int8_act.cpp).
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>

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

}  // namespace qk
