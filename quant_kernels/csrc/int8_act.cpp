// Integer kernels with per-token int8 activations (the A8 in W8A8 / W{2,3,4}A8), AVX2.
//
// Activations: x [M, K] fp32 is quantized per token exactly as quant_kernels.activation.quantize_per_token:
//   s_x = max|x_row| / 127 (1 for an all-zero row), q = round-half-even(x / s_x) clamped to ±127.
// W8A8 (w8a8): symmetric per-channel int8 weights, y = s_x·s_w·Σ q_x·q_w, int32-exact via madd_epi16.
// W{2,3,4}A8 (linear_a8): nibble codes in qkernels.cpp's unit layout with per-(row, group) scale s and zs = s·z:
//   y[m, n] = s_x[m] · Σ_g ( s[n,g]·Σ_{k∈g} q[n,k]·q_x[m,k]  −  zs[n,g]·Σ_{k∈g} q_x[m,k] )
// The inner sums are int32-exact: maddubs multiplies unsigned codes (< 16) by signed int8 x into int16 pairs
// (|pair| ≤ 2·15·127 = 3810, no saturation), madd_epi16 with ones widens them to int32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "qk_common.h"

using qk::check;
using qk::hsum;

namespace {

// per-token int8 codes of x[0:K] into out[0:K] (T = int8_t or int16_t); returns the scale
template <typename T>
float quantize_row(const float* x, int64_t K, T* out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float sc = amax / 127.f;
  if (!(sc > 0.f)) sc = 1.f;
  for (int64_t k = 0; k < K; ++k)
    out[k] = static_cast<T>(std::min(127.f, std::max(-127.f, std::nearbyint(x[k] / sc))));
  return sc;
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
}

// int8 x of one token in the order the codes are read: within a group, each run of 4 units (64 columns,
// 32 code bytes) is read as one 256-bit load whose low nibbles are columns 0-7 of the 4 units and whose
// high nibbles are columns 8-15, so x is stored as [u0 c0-7, u1 c0-7, u2 c0-7, u3 c0-7, u0 c8-15, ...];
// leftover units (fewer than 4 at a group's end) keep the natural 16-column order.
void arrange_x(const int8_t* xn, const int32_t* gunit, int64_t G, int8_t* xo) {
  for (int64_t g = 0; g < G; ++g) {
    int64_t u = gunit[g];
    for (; u + 4 <= gunit[g + 1]; u += 4)
      for (int j = 0; j < 4; ++j)
        for (int b = 0; b < 8; ++b) {
          xo[u * 16 + j * 8 + b] = xn[(u + j) * 16 + b];
          xo[u * 16 + 32 + j * 8 + b] = xn[(u + j) * 16 + 8 + b];
        }
    for (; u < gunit[g + 1]; ++u) std::copy(xn + u * 16, xn + u * 16 + 16, xo + u * 16);
  }
}

// R output rows (R ≤ 4) of one token: per group, int32 dot products of codes with x, then s·dot into fp32 lanes
template <int R>
inline void rows_a8(const uint8_t* cr, int64_t row_bytes, const int8_t* xq, const float* s, const float* zs,
                    const int32_t* gunit, const int32_t* xqs, int64_t G, float sx, const float* bias, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m128i m4h = _mm_set1_epi8(0x0F), onesh = _mm_set1_epi16(1);
  __m256 accf[R];
  for (int r = 0; r < R; ++r) accf[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    int64_t u = gunit[g];
    for (; u + 4 <= gunit[g + 1]; u += 4) {
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + u * 16));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + u * 16 + 32));
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr + r * row_bytes + u * 8));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
      }
    }
    for (; u < gunit[g + 1]; ++u) {  // leftover single units: 16 codes in natural order
      const __m128i xv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + u * 16));
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cr + r * row_bytes + u * 8));
        const __m128i c = _mm_unpacklo_epi64(_mm_and_si128(v, m4h), _mm_and_si128(_mm_srli_epi16(v, 4), m4h));
        const __m128i d = _mm_madd_epi16(_mm_maddubs_epi16(c, xv), onesh);
        acc[r] = _mm256_add_epi32(acc[r], _mm256_inserti128_si256(_mm256_setzero_si256(), d, 0));
      }
    }
    for (int r = 0; r < R; ++r) accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(s[r * G + g]),
                                                          accf[r]);
  }
  for (int r = 0; r < R; ++r) {
    float zterm = 0.f;
    for (int64_t g = 0; g < G; ++g) zterm += zs[r * G + g] * static_cast<float>(xqs[g]);
    out[r] = sx * (hsum(accf[r]) - zterm) + (bias ? bias[r] : 0.f);
  }
}

}  // namespace

torch::Tensor w8a8(torch::Tensor x, torch::Tensor w, torch::Tensor sw, c10::optional<torch::Tensor> bias) {
  check(x, at::kFloat, "x"); check(w, at::kChar, "w"); check(sw, at::kFloat, "sw");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1);
  TORCH_CHECK(Kp % 16 == 0 && Kp >= K && Kp < K + 16 && sw.numel() == N, "inconsistent W8A8 operands");
  const float* b = nullptr;
  if (bias.has_value()) {
    check(*bias, at::kFloat, "bias");
    TORCH_CHECK(bias->numel() == N, "bias has the wrong size");
    b = bias->data_ptr<float>();
  }
  std::vector<int16_t> xq(M * Kp, 0);
  std::vector<float> sx(M);
  for (int64_t m = 0; m < M; ++m) sx[m] = quantize_row(x.data_ptr<float>() + m * K, K, xq.data() + m * Kp);
  auto y = torch::empty({M, N}, x.options());
  float* yo = y.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = wp + n * Kp;
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* xm = xq.data() + m * Kp;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t k = 0; k < Kp; k += 16) {
          __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, xv));
        }
        yo[m * N + n] = static_cast<float>(hsum_i32(acc)) * sx[m] * swp[n] + (b ? b[n] : 0.f);
      }
    }
  });
  return y;
}

// W{2,3,4}A8 linear for nibble codes: x [M, K] fp32 (gathered into kernel column order by xidx, as in
// qkernels.cpp's `linear`), quantized per token, then integer group dots; returns y [M, N] fp32 (+ bias).
torch::Tensor linear_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                        torch::Tensor xidx, bool identity, c10::optional<torch::Tensor> bias) {
  check(x, at::kFloat, "x"); check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales");
  check(zs, at::kFloat, "zs"); check(gunit, at::kInt, "gunit"); check(xidx, at::kLong, "xidx");
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), Kp = xidx.numel(), units = Kp / 16;
  TORCH_CHECK(Kp == units * 16 && gunit.numel() == G + 1, "inconsistent kernel operands");
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == units * 8, "codes have the wrong shape (nibble codes only)");
  TORCH_CHECK(!identity || K == Kp, "identity gather needs in_features == padded width");
  const float* b = nullptr;
  if (bias.has_value()) {
    check(*bias, at::kFloat, "bias");
    TORCH_CHECK(bias->numel() == N, "bias has the wrong size");
    b = bias->data_ptr<float>();
  }
  const int32_t* gu = gunit.data_ptr<int32_t>();
  const int64_t* ix = xidx.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  std::vector<int8_t> xn(K), xk(Kp), xq(M * Kp);
  std::vector<int32_t> xqs(M * G);
  std::vector<float> sx(M);
  for (int64_t m = 0; m < M; ++m) {
    sx[m] = quantize_row(xs + m * K, K, xn.data());  // natural column order; padded columns read code 0
    for (int64_t j = 0; j < Kp; ++j) xk[j] = identity ? xn[j] : (ix[j] < K ? xn[ix[j]] : 0);
    arrange_x(xk.data(), gu, G, xq.data() + m * Kp);
    for (int64_t g = 0; g < G; ++g) {
      int32_t t = 0;
      for (int64_t k = gu[g] * 16; k < gu[g + 1] * 16; ++k) t += xk[k];
      xqs[m * G + g] = t;
    }
  }
  auto y = torch::empty({M, N}, x.options());
  float* yo = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = s.data_ptr<float>(), *zp = zs.data_ptr<float>();
  const int64_t row_bytes = units * 8;
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t b0, int64_t b1) {
    float out[4];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xm = xq.data() + m * Kp;
        const int32_t* qs = xqs.data() + m * G;
        if (n0 + 4 <= N) {
          rows_a8<4>(cp + n0 * row_bytes, row_bytes, xm, sp + n0 * G, zp + n0 * G, gu, qs, G, sx[m],
                     b ? b + n0 : nullptr, out);
          std::copy(out, out + 4, yo + m * N + n0);
        } else {
          for (int64_t n = n0; n < N; ++n) {
            rows_a8<1>(cp + n * row_bytes, row_bytes, xm, sp + n * G, zp + n * G, gu, qs, G, sx[m],
                       b ? b + n : nullptr, out);
            yo[m * N + n] = out[0];
          }
        }
      }
    }
  });
  return y;
}
