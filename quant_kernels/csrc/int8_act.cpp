// Integer kernels with per-token int8 activations (the A8 in W8A8 / W{2,3,4}A8), AVX2.
//
// Activations: x [M, K] fp32 is quantized per token exactly as quant_kernels.activation.quantize_per_token:
//   s_x = max|x_row| / 127 (1 for an all-zero row), q = round-half-even(x / s_x) clamped to ±127.
// W8A8 (w8a8): symmetric per-channel int8 weights, y = s_x·s_w·Σ q_x·q_w, int32-exact via madd_epi16.
// W{2,3,4}A8 (linear_a8): nibble codes in qkernels.cpp's unit layout with per-(row, group) scale s and zs = s·z:
//   y[m, n] = s_x[m] · Σ_g ( s[n,g]·Σ_{k∈g} q[n,k]·q_x[m,k]  −  zs[n,g]·Σ_{k∈g} q_x[m,k] )
// The inner sums are int32-exact: maddubs multiplies unsigned codes (< 16) by signed int8 x into int16 pairs
// (|pair| ≤ 2·15·127 = 3810, no saturation); four of them (two 64-column runs) are added in int16
// (≤ 15240) before madd_epi16 with ones widens them to int32.
// Both kernels work on tiles: 4 channels × 1 token for decode, 1 channel × 4 tokens otherwise (each
// unpacked code vector feeds four tokens); tokens are processed in chunks that stay in cache.
// `sx` (optional, [M]) gives each token's scale instead of max|x|/127 (per-image scales of convolutions);
// codes are then round(x/s) clamped to ±127. x may also be int8 codes already (−128..127, with sx): static
// asymmetric ranges are applied by the caller (quant_kernels/static_act.py). With |x| ≤ 128 the int16 sums
// above stay ≤ 4·2·15·128 = 15360.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "qk_common.h"

using qk::check;
using qk::hsum;
using qk::optional_bias;
using qk::quantize_row;
using qk::row_absmax;

namespace {

constexpr int64_t TOKEN_CHUNK = 32;  // tokens per pass over a thread's weight rows (their int8 x stays in L1/L2)

// the scale of token m: given (sx_in) or max|x|/127 (1 for an all-zero row)
inline float token_scale(const float* x, int64_t K, const float* sx_in, int64_t m) {
  if (sx_in) return sx_in[m];
  const float sc = row_absmax(x, K) / 127.f;
  return sc > 0.f ? sc : 1.f;
}

const float* optional_scales(const c10::optional<torch::Tensor>& sx, int64_t M) {
  if (!sx.has_value()) return nullptr;
  check(*sx, at::kFloat, "sx");
  TORCH_CHECK(sx->numel() == M, "sx must hold one scale per input row");
  return sx->data_ptr<float>();
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

// y[t, r] for R code rows (cr + r·row_bytes) × T tokens (xq + t·Kp, arranged): per group, int32 dots of
// codes with x, then s·dot into fp32 lanes; the zero term uses the token's int32 group sums xqs
template <int R, int T>
inline void tile_a8(const uint8_t* cr, int64_t row_bytes, const int8_t* xq, int64_t Kp, const float* s,
                    const float* zs, const int32_t* gunit, const int32_t* xqs, int64_t G, const float* sx,
                    const float* bias, float* out, int64_t ldo) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m128i m4h = _mm_set1_epi8(0x0F), onesh = _mm_set1_epi16(1);
  __m256 accf[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) accf[r][t] = _mm256_setzero_ps();
  auto ld = [](const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    int64_t u = gunit[g];
    const int64_t end = gunit[g + 1];
    for (; u + 8 <= end; u += 8) {  // two runs of 4 units: four maddubs summed in int16 (≤ 15240)
      for (int r = 0; r < R; ++r) {
        const uint8_t* c = cr + r * row_bytes + u * 8;
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32));
        const __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
        const __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
        for (int t = 0; t < T; ++t) {
          const int8_t* xp = xq + t * Kp + u * 16;
          const __m256i p = _mm256_add_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo0, ld(xp)), _mm256_maddubs_epi16(hi0, ld(xp + 32))),
              _mm256_add_epi16(_mm256_maddubs_epi16(lo1, ld(xp + 64)), _mm256_maddubs_epi16(hi1, ld(xp + 96))));
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (; u + 4 <= end; u += 4) {  // one run
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr + r * row_bytes + u * 8));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int t = 0; t < T; ++t) {
          const int8_t* xp = xq + t * Kp + u * 16;
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ld(xp)), _mm256_maddubs_epi16(hi, ld(xp + 32)));
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (; u < end; ++u) {  // leftover single units: 16 codes in natural order
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cr + r * row_bytes + u * 8));
        const __m128i c = _mm_unpacklo_epi64(_mm_and_si128(v, m4h), _mm_and_si128(_mm_srli_epi16(v, 4), m4h));
        for (int t = 0; t < T; ++t) {
          const __m128i xv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + t * Kp + u * 16));
          const __m128i d = _mm_madd_epi16(_mm_maddubs_epi16(c, xv), onesh);
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_inserti128_si256(_mm256_setzero_si256(), d, 0));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sg = _mm256_set1_ps(s[r * G + g]);
      for (int t = 0; t < T; ++t) accf[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][t]), sg, accf[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float zterm = 0.f;
      for (int64_t g = 0; g < G; ++g) zterm += zs[r * G + g] * static_cast<float>(xqs[t * G + g]);
      out[t * ldo + r] = sx[t] * (hsum(accf[r][t]) - zterm) + (bias ? bias[r] : 0.f);
    }
}

// y[t, r] = sx[t]·sw[r]·Σ_k q_x[t,k]·w[r,k] for R int8 weight rows × T int16 token rows (exact int32 dots)
template <int R, int T>
inline void tile_w8(const int8_t* w, const int16_t* xq, int64_t Kp, const float* sx, const float* sw,
                    const float* bias, float* out, int64_t ldo) {
  __m256i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t k = 0; k < Kp; k += 16)
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * Kp + k)));
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(
            wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * Kp + k))));
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[t * ldo + r] = static_cast<float>(hsum_i32(acc[r][t])) * sx[t] * sw[r] + (bias ? bias[r] : 0.f);
}

// Run tile(R, T, n0, m) over all N outputs and M tokens: threads split the output channels (blocks of 4),
// each walks tokens in chunks so the chunk's int8 x stays in cache while its weight rows stream.
// Decode (M < 4): 4 channels × 1 token, four independent code streams. Otherwise 1 channel × 4 tokens:
// each unpacked code vector feeds four tokens (1.4× faster than 4×2 at 16×4096², same-run microbenchmark).
template <typename Tile>
void for_tiles(int64_t M, int64_t N, int64_t K, Tile tile) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  at::parallel_for(0, (N + 3) / 4, qk::grain(4 * K * M, 8), [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += TOKEN_CHUNK) {
      const int64_t m1 = std::min(M, m0 + TOKEN_CHUNK);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * 4, n1 = std::min(N, n0 + 4);
        if (M < 4) {
          for (int64_t m = m0; m < m1; ++m) {
            if (n1 - n0 == 4) tile(I4(), I1(), n0, m);
            else for (int64_t n = n0; n < n1; ++n) tile(I1(), I1(), n, m);
          }
          continue;
        }
        for (int64_t n = n0; n < n1; ++n) {
          int64_t m = m0;
          for (; m + 4 <= m1; m += 4) tile(I1(), I4(), n, m);
          for (; m + 2 <= m1; m += 2) tile(I1(), I2(), n, m);
          for (; m < m1; ++m) tile(I1(), I1(), n, m);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor w8a8(torch::Tensor x, torch::Tensor w, torch::Tensor sw, c10::optional<torch::Tensor> bias,
                   c10::optional<torch::Tensor> sx_in) {
  const bool pre = x.scalar_type() == at::kChar;  // already int8 codes (then sx is required)
  check(x, pre ? at::kChar : at::kFloat, "x"); check(w, at::kChar, "w"); check(sw, at::kFloat, "sw");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1);
  TORCH_CHECK(Kp % 16 == 0 && Kp >= K && Kp < K + 16 && sw.numel() == N, "inconsistent W8A8 operands");
  const float* b = optional_bias(bias, N);
  const float* sxi = optional_scales(sx_in, M);
  TORCH_CHECK(!pre || sxi, "int8 x needs its scales sx");
  std::vector<int16_t> xq(M * Kp, 0);
  std::vector<float> sx(M);
  at::parallel_for(0, M, qk::grain(K, 16), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (pre) {
        sx[m] = sxi[m];
        std::copy(x.data_ptr<int8_t>() + m * K, x.data_ptr<int8_t>() + (m + 1) * K, xq.data() + m * Kp);
      } else {
        const float* xm = x.data_ptr<float>() + m * K;
        sx[m] = token_scale(xm, K, sxi, m);
        quantize_row(xm, K, sx[m], xq.data() + m * Kp);
      }
    }
  });
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* yo = y.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  for_tiles(M, N, Kp, [&](auto R, auto T, int64_t n, int64_t m) {
    tile_w8<decltype(R)::value, decltype(T)::value>(wp + n * Kp, xq.data() + m * Kp, Kp, sx.data() + m, swp + n,
                                                    b ? b + n : nullptr, yo + m * N + n, N);
  });
  return y;
}

// W{2,3,4}A8 linear for nibble codes: x [M, K] fp32 (gathered into kernel column order by xidx, as in
// qkernels.cpp's `linear`), quantized per token (or with the given scales), then integer group dots;
// returns y [M, N] fp32 (+ bias).
torch::Tensor linear_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                        torch::Tensor xidx, bool identity, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> sx_in) {
  const bool pre = x.scalar_type() == at::kChar;  // already int8 codes (then sx is required)
  check(x, pre ? at::kChar : at::kFloat, "x"); check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales");
  check(zs, at::kFloat, "zs"); check(gunit, at::kInt, "gunit"); check(xidx, at::kLong, "xidx");
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), Kp = xidx.numel(), units = Kp / 16;
  TORCH_CHECK(Kp == units * 16 && gunit.numel() == G + 1, "inconsistent kernel operands");
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == units * 8, "codes have the wrong shape (nibble codes only)");
  TORCH_CHECK(!identity || K == Kp, "identity gather needs in_features == padded width");
  const float* b = optional_bias(bias, N);
  const float* sxi = optional_scales(sx_in, M);
  TORCH_CHECK(!pre || sxi, "int8 x needs its scales sx");
  const int32_t* gu = gunit.data_ptr<int32_t>();
  const int64_t* ix = xidx.data_ptr<int64_t>();
  std::vector<int8_t> xq(M * Kp);
  std::vector<int32_t> xqs(M * G);
  std::vector<float> sx(M);
  at::parallel_for(0, M, qk::grain(K, 16), [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> xn(K), xk(Kp);
    for (int64_t m = m0; m < m1; ++m) {
      if (pre) {
        sx[m] = sxi[m];
        std::copy(x.data_ptr<int8_t>() + m * K, x.data_ptr<int8_t>() + (m + 1) * K, xn.data());
      } else {  // natural column order; padded columns read code 0
        const float* xm = x.data_ptr<float>() + m * K;
        sx[m] = token_scale(xm, K, sxi, m);
        quantize_row(xm, K, sx[m], xn.data());
      }
      for (int64_t j = 0; j < Kp; ++j) xk[j] = identity ? xn[j] : (ix[j] < K ? xn[ix[j]] : 0);
      arrange_x(xk.data(), gu, G, xq.data() + m * Kp);
      for (int64_t g = 0; g < G; ++g) {
        int32_t t = 0;
        for (int64_t k = gu[g] * 16; k < gu[g + 1] * 16; ++k) t += xk[k];
        xqs[m * G + g] = t;
      }
    }
  });
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* yo = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = s.data_ptr<float>(), *zp = zs.data_ptr<float>();
  const int64_t row_bytes = units * 8;
  for_tiles(M, N, Kp, [&](auto R, auto T, int64_t n, int64_t m) {
    tile_a8<decltype(R)::value, decltype(T)::value>(cp + n * row_bytes, row_bytes, xq.data() + m * Kp, Kp,
                                                    sp + n * G, zp + n * G, gu, xqs.data() + m * G, G, sx.data() + m,
                                                    b ? b + n : nullptr, yo + m * N + n, N);
  });
  return y;
}
