// Activation codes and convolution kernels with int8 activations (AVX2): the fused quantizers that feed
// every int8 kernel, the direct depthwise kernel and the short-K GEMM of 1×1 convs (see int8_ops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "qk_common.h"

using qk::check;
using qk::optional_bias;
using qk::quantize_row;
using qk::row_absmax;

namespace {
// one output row of a depthwise tap: acc[ox] += x[ox·S]·w (S = stride; S = 1 vectorizes)
template <int S>
inline void tap_row(const int8_t* x, int32_t w, int32_t* acc, int64_t OW, int64_t stride) {
  const int64_t st = S > 0 ? S : stride;
  for (int64_t ox = 0; ox < OW; ++ox) acc[ox] += static_cast<int32_t>(x[ox * st]) * w;
}

}  // namespace

// Depthwise convolution (one input channel per output channel) of already padded int8 codes, direct:
//   y[b, c, oy, ox] = sx[b]·sw[c]·Σ_{ky,kx} x[b, c, oy·sh + ky·dh, ox·sw + kx·dw]·w[c, ky·kw + kx] (+ bias[c])
// x int8 [B, C, Hp, Wp], w int16 [C, kh·kw] (q − zero), sx [B] (or [B·C]: per image and channel), sw [C];
// exact int32 sums; fp32 [B, C, OH, OW].
torch::Tensor dw_a8(torch::Tensor x, torch::Tensor sx, torch::Tensor w, torch::Tensor sw,
                    c10::optional<torch::Tensor> bias, int64_t kh, int64_t kw, int64_t sh, int64_t sww,
                    int64_t dh, int64_t dw) {
  check(x, at::kChar, "x"); check(sx, at::kFloat, "sx"); check(w, at::kShort, "w"); check(sw, at::kFloat, "sw");
  TORCH_CHECK(x.dim() == 4 && kh > 0 && kw > 0 && sh > 0 && sww > 0 && dh > 0 && dw > 0, "bad depthwise geometry");
  const int64_t B = x.size(0), C = x.size(1), Hp = x.size(2), Wp = x.size(3);
  const int64_t OH = (Hp - dh * (kh - 1) - 1) / sh + 1, OW = (Wp - dw * (kw - 1) - 1) / sww + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "input smaller than the kernel");
  TORCH_CHECK((sx.numel() == B || sx.numel() == B * C) && w.size(0) == C && w.size(1) == kh * kw &&
              sw.numel() == C, "inconsistent depthwise operands");
  const bool per_channel = sx.numel() == B * C && C > 1;  // one activation scale per (image, channel)
  const float* b = optional_bias(bias, C);
  auto y = torch::empty({B, C, OH, OW}, sx.options());
  const int8_t* xp = x.data_ptr<int8_t>();
  const int16_t* wp = w.data_ptr<int16_t>();
  const float *sxp = sx.data_ptr<float>(), *swp = sw.data_ptr<float>();
  float* yo = y.data_ptr<float>();
  at::parallel_for(0, B * C, qk::grain(OH * OW * kh * kw, 4), [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> acc(OH * OW);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % C;
      const int8_t* xc = xp + i * Hp * Wp;
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int32_t wt = wp[c * kh * kw + ky * kw + kx];
          for (int64_t oy = 0; oy < OH; ++oy) {
            const int8_t* xr = xc + (oy * sh + ky * dh) * Wp + kx * dw;
            if (sww == 1) tap_row<1>(xr, wt, acc.data() + oy * OW, OW, 1);
            else if (sww == 2) tap_row<2>(xr, wt, acc.data() + oy * OW, OW, 2);
            else tap_row<0>(xr, wt, acc.data() + oy * OW, OW, sww);
          }
        }
      const float sc = sxp[per_channel ? i : i / C] * swp[c], bc = b ? b[c] : 0.f;
      float* yc = yo + i * OH * OW;
      for (int64_t j = 0; j < OH * OW; ++j) yc[j] = static_cast<float>(acc[j]) * sc + bc;
    }
  });
  return y;
}

// Dynamic symmetric b-bit codes of each row, as quant_kernels.activation.quantize_per_token:
// s = max|x|/(2^(b−1)−1) (1 for an all-zero row), q = round-half-even(x/s) clamped; int8 [R, K] and fp32 [R].
std::tuple<torch::Tensor, torch::Tensor> quant_dynamic(torch::Tensor x, int64_t bits) {
  check(x, at::kFloat, "x");
  TORCH_CHECK(x.dim() == 2 && bits >= 2 && bits <= 8, "quant_dynamic takes [R, K] rows and 2..8 bits");
  const int64_t R = x.size(0), K = x.size(1);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  auto q = torch::empty({R, K}, x.options().dtype(at::kChar));
  auto s = torch::empty({R}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, R, qk::grain(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float sc = row_absmax(xp + r * K, K) / qmax;
      sc = sc > 0.f ? sc : 1.f;
      sp[r] = sc;
      quantize_row(xp + r * K, K, sc, qp + r * K, qmax);
    }
  });
  return {q, s};
}

// Static asymmetric codes of a calibrated range, minus an offset so they fit int8:
// c = clamp(round-half-even(x/s) + z, 0, qhi) − offset (x̂ = s·(c + offset − z)); same shape as x.
torch::Tensor quant_static(torch::Tensor x, double scale, double zero, int64_t qhi, int64_t offset) {
  check(x, at::kFloat, "x");
  TORCH_CHECK(scale > 0 && qhi >= 1 && qhi <= 255 && qhi - offset <= 127 && -offset >= -128, "bad static range");
  auto c = torch::empty_like(x, x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  const float* xp = x.data_ptr<float>();
  int8_t* cp = c.data_ptr<int8_t>();
  const float sc = static_cast<float>(scale), z = static_cast<float>(zero), hi = static_cast<float>(qhi),
              off = static_cast<float>(offset);
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      cp[i] = static_cast<int8_t>(std::min(hi, std::max(0.f, std::nearbyint(xp[i] / sc) + z)) - off);
  });
  return c;
}

// Short-K GEMM for convolutions (1×1 convs have K = 16…1152 and ~10^5 pixel rows): output channels across
// SIMD lanes, so no horizontal sums. w int16 pairs [K2][Np][2] (Np = N rounded up to 32; (q − zero) of
// per-channel weights), x int8 [M, K] codes, y[m, n] = sx[m]·sw[n]·Σ_k x[m,k]·w[n,k] (+ bias[n]).
// madd_epi16 of a broadcast (x[2j], x[2j+1]) pair with 8 channels' weight pairs: exact int32 sums.
torch::Tensor gemm_vert_a8(torch::Tensor x, torch::Tensor sx, torch::Tensor w, torch::Tensor sw, int64_t N,
                           c10::optional<torch::Tensor> bias) {
  check(x, at::kChar, "x"); check(sx, at::kFloat, "sx"); check(w, at::kShort, "w"); check(sw, at::kFloat, "sw");
  const int64_t M = x.size(0), K = x.size(1), K2 = w.size(0), Np = w.size(1);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 2 && K2 == (K + 1) / 2 && Np % 32 == 0 && N <= Np && N > Np - 32 &&
              sx.numel() == M && sw.numel() == N, "inconsistent short-K GEMM operands");
  const float* b = optional_bias(bias, N);
  auto y = torch::empty({M, N}, sx.options());
  const int8_t* xp = x.data_ptr<int8_t>();
  const int32_t* wp = reinterpret_cast<const int32_t*>(w.data_ptr<int16_t>());  // one (w[2j], w[2j+1]) per int32
  const float *sxp = sx.data_ptr<float>(), *swp = sw.data_ptr<float>();
  float* yo = y.data_ptr<float>();
  std::vector<float> swpad(Np, 0.f), bpad(Np, 0.f);
  std::copy(swp, swp + N, swpad.begin());
  if (b) std::copy(b, b + N, bpad.begin());
  constexpr int64_t CHUNK = 128;  // tokens per block: their pairs stay in L1 while the weight blocks stream
  at::parallel_for(0, (M + CHUNK - 1) / CHUNK, qk::grain(CHUNK * K * N), [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> pairs(CHUNK * K2);
    alignas(32) float tmp[32];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t m0 = c * CHUNK, m1 = std::min(M, m0 + CHUNK);
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t j = 0; j < K2; ++j) {
          const int16_t lo = xp[m * K + 2 * j], hi = 2 * j + 1 < K ? xp[m * K + 2 * j + 1] : 0;
          pairs[(m - m0) * K2 + j] = static_cast<int32_t>(static_cast<uint16_t>(lo)) | (static_cast<int32_t>(hi) << 16);
        }
      for (int64_t n0 = 0; n0 < Np; n0 += 32) {
        for (int64_t m = m0; m < m1; m += 2) {
          const bool two = m + 1 < m1;
          __m256i acc[2][4];
          for (int t = 0; t < 2; ++t)
            for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_setzero_si256();
          const int32_t* p0 = pairs.data() + (m - m0) * K2;
          const int32_t* p1 = two ? p0 + K2 : p0;
          for (int64_t j = 0; j < K2; ++j) {
            const __m256i* wv = reinterpret_cast<const __m256i*>(wp + j * Np + n0);
            const __m256i w0 = _mm256_loadu_si256(wv), w1 = _mm256_loadu_si256(wv + 1),
                          w2 = _mm256_loadu_si256(wv + 2), w3 = _mm256_loadu_si256(wv + 3);
            const __m256i b0 = _mm256_set1_epi32(p0[j]), b1 = _mm256_set1_epi32(p1[j]);
            acc[0][0] = _mm256_add_epi32(acc[0][0], _mm256_madd_epi16(b0, w0));
            acc[0][1] = _mm256_add_epi32(acc[0][1], _mm256_madd_epi16(b0, w1));
            acc[0][2] = _mm256_add_epi32(acc[0][2], _mm256_madd_epi16(b0, w2));
            acc[0][3] = _mm256_add_epi32(acc[0][3], _mm256_madd_epi16(b0, w3));
            acc[1][0] = _mm256_add_epi32(acc[1][0], _mm256_madd_epi16(b1, w0));
            acc[1][1] = _mm256_add_epi32(acc[1][1], _mm256_madd_epi16(b1, w1));
            acc[1][2] = _mm256_add_epi32(acc[1][2], _mm256_madd_epi16(b1, w2));
            acc[1][3] = _mm256_add_epi32(acc[1][3], _mm256_madd_epi16(b1, w3));
          }
          for (int t = 0; t < (two ? 2 : 1); ++t) {
            const __m256 s = _mm256_set1_ps(sxp[m + t]);
            for (int v = 0; v < 4; ++v)
              _mm256_store_ps(tmp + 8 * v, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][v]),
                                                           _mm256_mul_ps(s, _mm256_loadu_ps(swpad.data() + n0 + 8 * v)),
                                                           _mm256_loadu_ps(bpad.data() + n0 + 8 * v)));
            std::copy(tmp, tmp + std::min<int64_t>(32, N - n0), yo + (m + t) * N + n0);
          }
        }
      }
    }
  });
  return y;
}
