// The importance-weighted grid search of hawqtool/quantize/grid.py (search_qparams), one group per row, fused:
// the torch loop makes ~35 passes over the whole weight per candidate step count; here each group stays in
// registers/L1 for all candidates. Same formulas and float32 element arithmetic (IEEE division, round-half-even,
// fp16-exact scales); sums are accumulated in double, so a result can differ from the torch loop's only where two
// candidates' errors tie within float32 rounding (tests/test_grid_kernel.py checks it against that loop).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "qk_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float fp16(float s) {  // grid.py's _fp16: the scale as stored, kept positive
  s = std::min(std::max(s, 6.103515625e-05f), 65504.0f);  // torch.clamp keeps NaN; so does this (comparisons)
  return static_cast<float>(c10::Half(s));
}

inline double hsum_pd(__m256d v) {
  __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  lo = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

// A double sum of float lanes in two independent accumulators (the halves of each 8-float vector), so
// consecutive adds do not wait on each other.
struct Acc {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  inline void add(__m256 v) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  inline double sum() const { return hsum_pd(_mm256_add_pd(lo, hi)); }
};

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

struct Group {
  const float* w;
  const float* d;
  int64_t n;
  float maxq;

  // clamp(round(w / s) + z, 0, maxq) - z, the integer offsets of the codes (grid.py's _codes minus the zero)
  inline __m256 offs(__m256 w8, __m256 s, __m256 z, __m256 hi) const {
    __m256 q = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(w8, s), kRound), z);
    return _mm256_sub_ps(_mm256_min_ps(hi, _mm256_max_ps(_mm256_setzero_ps(), q)), z);
  }
  inline float offs1(float w1, float s, float z) const {
    return std::min(maxq, std::max(0.f, std::nearbyint(w1 / s) + z)) - z;
  }

  // Σ d (w − s c)², c the offsets of (s, z): grid.py's _weighted_err
  double err(float s, float z) const {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), hi = _mm256_set1_ps(maxq);
    Acc acc;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 w8 = _mm256_loadu_ps(w + j);
      __m256 r = _mm256_sub_ps(w8, _mm256_mul_ps(vs, offs(w8, vs, vz, hi)));
      acc.add(_mm256_mul_ps(_mm256_loadu_ps(d + j), _mm256_mul_ps(r, r)));
    }
    double e = acc.sum();
    for (; j < n; ++j) {
      float r = w[j] - s * offs1(w[j], s, z);
      e += d[j] * (r * r);
    }
    return e;
  }

  // argmin_s Σ d (w − s c)² for the offsets c of (s0, z), `fallback` where it is not positive: grid.py's _ls_scale
  float ls_scale(float s0, float z, float fallback) const {
    const __m256 vs = _mm256_set1_ps(s0), vz = _mm256_set1_ps(z), hi = _mm256_set1_ps(maxq);
    Acc num, den;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 w8 = _mm256_loadu_ps(w + j), d8 = _mm256_loadu_ps(d + j);
      __m256 c = offs(w8, vs, vz, hi);
      num.add(_mm256_mul_ps(_mm256_mul_ps(d8, w8), c));
      den.add(_mm256_mul_ps(_mm256_mul_ps(d8, c), c));
    }
    double nu = num.sum(), de = den.sum();
    for (; j < n; ++j) {
      float c = offs1(w[j], s0, z);
      nu += (d[j] * w[j]) * c;
      de += (d[j] * c) * c;
    }
    float s = de > 0 ? static_cast<float>(nu / std::max(de, 1e-30)) : fallback;
    return s > 0 ? s : fallback;
  }

  // Σ d L, Σ d L², Σ d L w for the codes L = clamp(round((w − m0) / s0), 0, maxq)
  void level_sums(float s0, float m0, double& sl, double& sll, double& slx) const {
    const __m256 vs = _mm256_set1_ps(s0), vm = _mm256_set1_ps(m0), hi = _mm256_set1_ps(maxq);
    Acc a, b, c;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 w8 = _mm256_loadu_ps(w + j);
      __m256 L = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(w8, vm), vs), kRound);
      L = _mm256_min_ps(hi, _mm256_max_ps(_mm256_setzero_ps(), L));
      __m256 dL = _mm256_mul_ps(_mm256_loadu_ps(d + j), L);
      a.add(dL);
      b.add(_mm256_mul_ps(dL, L));
      c.add(_mm256_mul_ps(dL, w8));
    }
    sl = a.sum(), sll = b.sum(), slx = c.sum();
    for (; j < n; ++j) {
      float L = std::min(maxq, std::max(0.f, std::nearbyint((w[j] - m0) / s0)));
      float dL = d[j] * L;
      sl += dL, sll += dL * L, slx += dL * w[j];
    }
  }
};

void search_group(const Group& g, const float* steps, int64_t nsteps, bool symmetric, float& best_s,
                  float& best_z) {
  double best_e = g.err(best_s, best_z);
  float wmin = 0.f, wmax = 0.f;  // grid.py clamps min to <= 0 and max to >= 0
  double sw = 0, sx = 0;
  for (int64_t j = 0; j < g.n; ++j) {
    wmin = std::min(wmin, g.w[j]), wmax = std::max(wmax, g.w[j]);
    sw += g.d[j], sx += g.d[j] * g.w[j];
  }
  const float maxq = g.maxq;
  for (int64_t k = 0; k < nsteps; ++k) {
    const float t = steps[k];
    float s, zc;
    if (symmetric) {
      const float amax = std::max(std::max(-wmin, wmax), 1e-12f);
      zc = std::floor((maxq + 1.f) / 2.f);
      const float s0 = amax / t;
      s = fp16(g.ls_scale(s0, zc, s0));
    } else {
      const float span = std::max(wmax - wmin, 1e-12f);
      const float s0 = span / t;
      const float m0 = (wmin + wmax) / 2.f - s0 * maxq / 2.f;
      double sl, sll, slx;
      g.level_sums(s0, m0, sl, sll, slx);
      const double det = sw * sll - sl * sl;
      const bool ok = det > 1e-12 * sw * std::max(sll, 1e-30);
      float s1 = ok ? static_cast<float>((sw * slx - sl * sx) / std::max(det, 1e-30)) : s0;
      const float m1 = ok ? static_cast<float>((sll * sx - sl * slx) / std::max(det, 1e-30)) : m0;
      s1 = s1 > 0 ? s1 : s0;
      zc = std::min(maxq, std::max(0.f, std::nearbyint(-m1 / s1)));
      s1 = fp16(s1);
      s = fp16(g.ls_scale(s1, zc, s1));
    }
    const double e = g.err(s, zc);
    if (e < best_e) best_e = e, best_s = s, best_z = zc;
  }
}

}  // namespace

// W [rows, n] float32, d [rows or 1, n] float32 (>= 0, no all-zero row), start scale/zero [rows] (min-max),
// steps [k] the candidate step counts; returns the searched (scale, zero) [rows]
std::vector<torch::Tensor> grid_search(torch::Tensor W, torch::Tensor d, torch::Tensor start_s, torch::Tensor start_z,
                                       torch::Tensor steps, int64_t maxq, bool symmetric) {
  qk::check(W, at::kFloat, "W");
  qk::check(d, at::kFloat, "d");
  qk::check(start_s, at::kFloat, "start_s");
  qk::check(start_z, at::kFloat, "start_z");
  qk::check(steps, at::kFloat, "steps");
  TORCH_CHECK(W.dim() == 2 && d.dim() == 2 && d.size(1) == W.size(1) && (d.size(0) == 1 || d.size(0) == W.size(0)),
              "d must be [1 or rows, cols] of W [rows, cols]");
  const int64_t rows = W.size(0), n = W.size(1), dstride = d.size(0) == 1 ? 0 : n;
  TORCH_CHECK(start_s.numel() == rows && start_z.numel() == rows, "start must have one entry per row");
  auto s = start_s.clone(), z = start_z.clone();
  const float *pw = W.data_ptr<float>(), *pd = d.data_ptr<float>(), *pt = steps.data_ptr<float>();
  float *ps = s.data_ptr<float>(), *pz = z.data_ptr<float>();
  const int64_t nsteps = steps.numel();
  at::parallel_for(0, rows, qk::grain(n * nsteps * 24), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Group g{pw + r * n, pd + r * dstride, n, static_cast<float>(maxq)};
      search_group(g, pt, nsteps, symmetric, ps[r], pz[r]);
    }
  });
  return {s, z};
}
