// AVX2/FMA CPU kernels for hawqtool's packed low-bit weights (see quant_kernels/fast_cpu.py for the layout).
//
// Kernel layout ("unit" = 16 input columns of one output row, already permuted so groups are contiguous):
//   nibble class (bits <= 4): 8 bytes per unit, byte b = code(unit col b) | code(unit col 8+b) << 4
//   byte class   (bits 5..8): 16 bytes per unit, byte b = code(unit col b)
// Groups are ranges of units [gunit[g], gunit[g+1]); per (row, group) fp32 scale s and zs = s * zero, so
//   y[m, n] = sum_g s[n,g] * sum_{k in g} q[n,k] x[m,k]  -  zs[n,g] * sum_{k in g} x[m,k].
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "qk_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {
using qk::hsum;
using qk::check;


// dot of one row's codes over units [u0, u1) with x (16 floats per unit)
template <bool NIBBLE>
inline float unit_dot(const uint8_t* codes, const float* x, int64_t u0, int64_t u1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t u = u0; u < u1; ++u) {
    const float* xu = x + u * 16;
    if (NIBBLE) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + u * 8)));
      __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
      __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xu), a0);
      a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xu + 8), a1);
    } else {
      const uint8_t* c = codes + u * 16;
      __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
      __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8)))) ;
      a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xu), a0);
      a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xu + 8), a1);
    }
  }
  return hsum(_mm256_add_ps(a0, a1));
}

// 16 codes of one unit as two 8-float vectors
template <bool NIBBLE>
inline void decode_unit(const uint8_t* cr, int64_t u, __m256& lo, __m256& hi) {
  if (NIBBLE) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cr + u * 8)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  } else {
    const uint8_t* c = cr + u * 16;
    lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8))));
  }
}

// 4 output rows at once: each x load feeds 4 rows and 8 independent FMA chains hide the FMA latency
template <bool NIBBLE>
inline void gemv_rows4(const uint8_t* cr, int64_t row_bytes, const float* xm, const float* s, const float* zs,
                       const int32_t* gunit, const float* xs, int64_t G, float* out) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t u = gunit[g]; u < gunit[g + 1]; ++u) {
      const __m256 x0 = _mm256_loadu_ps(xm + u * 16), x1 = _mm256_loadu_ps(xm + u * 16 + 8);
      for (int r = 0; r < 4; ++r) {
        __m256 lo, hi;
        decode_unit<NIBBLE>(cr + r * row_bytes, u, lo, hi);
        a[r][0] = _mm256_fmadd_ps(lo, x0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(hi, x1, a[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r)
      acc[r] += s[r * G + g] * hsum(_mm256_add_ps(a[r][0], a[r][1])) - zs[r * G + g] * xs[g];
  }
  for (int r = 0; r < 4; ++r) out[r] = acc[r];
}

template <bool NIBBLE>
void gemv_impl(const float* x, const uint8_t* codes, const float* s, const float* zs, const int32_t* gunit,
               const float* xsum, float* y, int64_t M, int64_t N, int64_t G, int64_t units) {
  const int64_t row_bytes = units * (NIBBLE ? 8 : 16);
  at::parallel_for(0, (N + 3) / 4, qk::grain(4 * units * 16 * M, 4), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * units * 16;
        if (n0 + 4 <= N) {
          float out[4];
          gemv_rows4<NIBBLE>(codes + n0 * row_bytes, row_bytes, xm, s + n0 * G, zs + n0 * G, gunit, xsum + m * G, G,
                             out);
          for (int r = 0; r < 4; ++r) y[m * N + n0 + r] = out[r];
          continue;
        }
        for (int64_t n = n0; n < N; ++n) {  // ragged tail rows
          const uint8_t* cr = codes + n * row_bytes;
          float acc = 0.f;
          for (int64_t g = 0; g < G; ++g) {
            float d = unit_dot<NIBBLE>(cr, xm, gunit[g], gunit[g + 1]);
            acc += s[n * G + g] * d - zs[n * G + g] * xsum[m * G + g];
          }
          y[m * N + n] = acc;
        }
      }
    }
  });
}


// dequantize one row (all groups) into o[units*16]
template <bool NIBBLE>
inline void dequant_row(const uint8_t* cr, const float* s, const float* zs, const int32_t* gunit, int64_t G,
                        float* o) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < G; ++g) {
    __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(zs[g]);
    for (int64_t u = gunit[g]; u < gunit[g + 1]; ++u) {
      __m256 lo, hi;
      if (NIBBLE) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cr + u * 8)));
        lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
        hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      } else {
        const uint8_t* c = cr + u * 16;
        lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
        hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8))));
      }
      _mm256_storeu_ps(o + u * 16, _mm256_fmsub_ps(lo, sv, zv));
      _mm256_storeu_ps(o + u * 16 + 8, _mm256_fmsub_ps(hi, sv, zv));
    }
  }
}

// rows [r0, r1) dequantized into out [r1-r0, units*16]; serial on purpose (see fast_cpu.py)
template <bool NIBBLE>
void dequant_impl(const uint8_t* codes, const float* s, const float* zs, const int32_t* gunit, float* out,
                  int64_t r0, int64_t r1, int64_t G, int64_t units) {
  const int64_t row_bytes = units * (NIBBLE ? 8 : 16);
  for (int64_t n = r0; n < r1; ++n)
    dequant_row<NIBBLE>(codes + n * row_bytes, s + n * G, zs + n * G, gunit, G, out + (n - r0) * units * 16);
}

// y [M, N] for larger M: each thread dequantizes RB output rows into an L1/L2-resident buffer once and
// multiplies them with every input row (one x load feeds RB FMAs), so the codes are decoded once per call.
template <bool NIBBLE>
void gemm_impl(const float* x, const uint8_t* codes, const float* s, const float* zs, const int32_t* gunit,
               float* y, int64_t M, int64_t N, int64_t G, int64_t units) {
  constexpr int RB = 4;
  const int64_t Kp = units * 16, row_bytes = units * (NIBBLE ? 8 : 16);
  const int64_t blocks = (N + RB - 1) / RB;
  at::parallel_for(0, blocks, qk::grain(RB * Kp * M), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(RB * Kp);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * RB, nr = std::min<int64_t>(RB, N - n0);
      for (int64_t r = 0; r < nr; ++r)
        dequant_row<NIBBLE>(codes + (n0 + r) * row_bytes, s + (n0 + r) * G, zs + (n0 + r) * G, gunit, G,
                            buf.data() + r * Kp);
      for (int64_t r = nr; r < RB; ++r) std::fill(buf.begin() + r * Kp, buf.begin() + (r + 1) * Kp, 0.f);
      const float* w0 = buf.data();
      const float* w1 = w0 + Kp;
      const float* w2 = w1 + Kp;
      const float* w3 = w2 + Kp;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * Kp;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < Kp; k += 8) {
          __m256 xv = _mm256_loadu_ps(xm + k);
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
          a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
          a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
        }
        float out[RB] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int64_t r = 0; r < nr; ++r) y[m * N + n0 + r] = out[r];
      }
    }
  });
}


}  // namespace

// y [M, N] = per-group dot products of x [M, units*16] (permuted, padded) with the codes; xsum [M, G]
torch::Tensor gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                   torch::Tensor xsum, bool nibble) {
  check(x, at::kFloat, "x"); check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales");
  check(zs, at::kFloat, "zs"); check(gunit, at::kInt, "gunit"); check(xsum, at::kFloat, "xsum");
  const int64_t M = x.size(0), N = s.size(0), G = s.size(1), units = x.size(1) / 16;
  TORCH_CHECK(x.size(1) == units * 16 && gunit.numel() == G + 1 && xsum.size(0) == M && xsum.size(1) == G,
              "inconsistent kernel operands");
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == units * (nibble ? 8 : 16), "codes have the wrong shape");
  auto y = torch::empty({M, N}, x.options());
  if (nibble)
    gemv_impl<true>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(),
                    gunit.data_ptr<int32_t>(), xsum.data_ptr<float>(), y.data_ptr<float>(), M, N, G, units);
  else
    gemv_impl<false>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(),
                     gunit.data_ptr<int32_t>(), xsum.data_ptr<float>(), y.data_ptr<float>(), M, N, G, units);
  return y;
}

// fp32 dequantized rows [r0, r1) in the kernel's permuted, padded column order: [r1-r0, units*16]
torch::Tensor dequant(torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit, int64_t r0,
                      int64_t r1, bool nibble) {
  check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales"); check(zs, at::kFloat, "zs");
  check(gunit, at::kInt, "gunit");
  const int64_t G = s.size(1), units = codes.size(1) / (nibble ? 8 : 16);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= s.size(0), "row range out of bounds");
  auto out = torch::empty({r1 - r0, units * 16}, s.options());
  if (nibble)
    dequant_impl<true>(codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gunit.data_ptr<int32_t>(),
                       out.data_ptr<float>(), r0, r1, G, units);
  else
    dequant_impl<false>(codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(),
                        gunit.data_ptr<int32_t>(), out.data_ptr<float>(), r0, r1, G, units);
  return out;
}

// y [M, N] = x [M, units*16] (permuted, padded) @ W^T, decoding each weight row once (for M > a few rows)
torch::Tensor gemm(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                   bool nibble) {
  check(x, at::kFloat, "x"); check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales");
  check(zs, at::kFloat, "zs"); check(gunit, at::kInt, "gunit");
  const int64_t M = x.size(0), N = s.size(0), G = s.size(1), units = x.size(1) / 16;
  TORCH_CHECK(x.size(1) == units * 16 && gunit.numel() == G + 1, "inconsistent kernel operands");
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == units * (nibble ? 8 : 16), "codes have the wrong shape");
  auto y = torch::empty({M, N}, x.options());
  if (nibble)
    gemm_impl<true>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(),
                    gunit.data_ptr<int32_t>(), y.data_ptr<float>(), M, N, G, units);
  else
    gemm_impl<false>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(),
                     gunit.data_ptr<int32_t>(), y.data_ptr<float>(), M, N, G, units);
  return y;
}

// The whole layer in one call (no per-call torch ops around the kernel): x [M, K] fp32 is gathered into
// the kernel's column order (xidx[j] = K reads a zero; skipped when `identity`), per-group input sums are
// formed for the GEMV path, then GEMV (M <= gemv_max_rows), the row-decoding GEMM, or (M >= blas_min_rows)
// tile dequantization + BLAS, then + bias. Returns y [M, N] fp32.
torch::Tensor linear(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                     torch::Tensor xidx, bool identity, bool nibble, c10::optional<torch::Tensor> bias,
                     int64_t gemv_max_rows, int64_t blas_min_rows) {
  check(x, at::kFloat, "x"); check(codes, at::kByte, "codes"); check(s, at::kFloat, "scales");
  check(zs, at::kFloat, "zs"); check(gunit, at::kInt, "gunit"); check(xidx, at::kLong, "xidx");
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), Kp = xidx.numel(), units = Kp / 16;
  TORCH_CHECK(Kp == units * 16 && gunit.numel() == G + 1, "inconsistent kernel operands");
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == units * (nibble ? 8 : 16), "codes have the wrong shape");
  TORCH_CHECK(!identity || K == Kp, "identity gather needs in_features == padded width");
  torch::Tensor xp = x;
  if (!identity) {
    xp = torch::empty({M, Kp}, x.options());
    const int64_t* ix = xidx.data_ptr<int64_t>();
    const float* xs = x.data_ptr<float>();
    float* xo = xp.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < Kp; ++j) xo[m * Kp + j] = ix[j] < K ? xs[m * K + ix[j]] : 0.f;
  }
  auto y = torch::empty({M, N}, x.options());
  const int32_t* gu = gunit.data_ptr<int32_t>();
  if (M <= gemv_max_rows) {
    std::vector<float> xsum(M * G);
    const float* xv = xp.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = gu[g] * 16; k < gu[g + 1] * 16; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xv + m * Kp + k));
        xsum[m * G + g] = hsum(a);
      }
    if (nibble)
      gemv_impl<true>(xv, codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu, xsum.data(),
                      y.data_ptr<float>(), M, N, G, units);
    else
      gemv_impl<false>(xv, codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu, xsum.data(),
                       y.data_ptr<float>(), M, N, G, units);
  } else if (M >= blas_min_rows) {
    // prefill-sized M: decode BN weight rows at a time into an fp32 tile (never the whole matrix) and let
    // the BLAS multiply it; the decode is O(N·K) against the product's O(M·N·K)
    const int64_t BN = 256;
    auto buf = torch::empty({std::min<int64_t>(BN, N), Kp}, x.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += BN) {
      const int64_t nb = std::min<int64_t>(BN, N - n0);
      at::parallel_for(0, nb, qk::grain(Kp, 8), [&](int64_t r0, int64_t r1) {
        if (nibble)
          dequant_impl<true>(codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu, bp + r0 * Kp,
                             n0 + r0, n0 + r1, G, units);
        else
          dequant_impl<false>(codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu, bp + r0 * Kp,
                              n0 + r0, n0 + r1, G, units);
      });
      y.narrow(1, n0, nb).copy_(at::mm(xp, buf.narrow(0, 0, nb).t()));
    }
  } else if (nibble) {
    gemm_impl<true>(xp.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu,
                    y.data_ptr<float>(), M, N, G, units);
  } else {
    gemm_impl<false>(xp.data_ptr<float>(), codes.data_ptr<uint8_t>(), s.data_ptr<float>(), zs.data_ptr<float>(), gu,
                     y.data_ptr<float>(), M, N, G, units);
  }
  if (bias.has_value()) {
    check(*bias, at::kFloat, "bias");
    TORCH_CHECK(bias->numel() == N, "bias has the wrong size");
    const float* b = bias->data_ptr<float>();
    float* yo = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yo[m * N + n] += b[n];
  }
  return y;
}

// int8-activation kernels (W8A8, W{2,3,4}A8) live in int8_act.cpp
torch::Tensor w8a8(torch::Tensor x, torch::Tensor w, torch::Tensor sw, c10::optional<torch::Tensor> bias,
                   c10::optional<torch::Tensor> sx);
torch::Tensor linear_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor zs, torch::Tensor gunit,
                        torch::Tensor xidx, bool identity, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> sx);
torch::Tensor dw_a8(torch::Tensor x, torch::Tensor sx, torch::Tensor w, torch::Tensor sw,
                    c10::optional<torch::Tensor> bias, int64_t kh, int64_t kw, int64_t sh, int64_t sww,
                    int64_t dh, int64_t dw);
torch::Tensor gemm_vert_a8(torch::Tensor x, torch::Tensor sx, torch::Tensor w, torch::Tensor sw, int64_t N,
                           c10::optional<torch::Tensor> bias);
std::tuple<torch::Tensor, torch::Tensor> quant_dynamic(torch::Tensor x, int64_t bits);
torch::Tensor quant_static(torch::Tensor x, double scale, double zero, int64_t qhi, int64_t offset);
std::vector<torch::Tensor> grid_search(torch::Tensor W, torch::Tensor d, torch::Tensor start_s, torch::Tensor start_z,
                                       torch::Tensor steps, int64_t maxq, bool symmetric);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "grouped low-bit GEMV/GEMM for small M (AVX2/FMA)");
  m.def("gemm", &gemm, "low-bit GEMM decoding each weight row once (AVX2/FMA)");
  m.def("w8a8", &w8a8, "W8A8 linear: per-token int8 activations x per-channel int8 weights (AVX2)");
  m.def("linear_a8", &linear_a8, "W{2,3,4}A8 linear: per-token int8 activations x nibble codes, maddubs (AVX2)");
  m.def("dw_a8", &dw_a8, "direct depthwise conv of padded int8 codes x int16 weight codes, int32 sums");
  m.def("gemm_vert_a8", &gemm_vert_a8, "short-K int8 GEMM with output channels across lanes (1x1 convs)");
  m.def("quant_dynamic", &quant_dynamic, "per-row symmetric int8 codes and scales of activations");
  m.def("quant_static", &quant_static, "static asymmetric activation codes minus an offset, as int8");
  m.def("linear", &linear, "whole low-bit linear layer: gather, group sums, GEMV/GEMM, bias (AVX2/FMA)");
  m.def("dequant", &dequant, "dequantize a row range to fp32 in kernel column order (AVX2/FMA)");
  m.def("grid_search", &grid_search, "importance-weighted scale/zero search of each row's group (grid.py), fused");
}

// The Linear and int8 conv kernels as torch operators (quant_kernels::NAME), so torch.compile can keep a
// quantized model in whole graphs: a pybind call is opaque to dynamo and would split the graph at every
// layer. Eager callers keep the pybind functions above (fewer µs per call); quant_kernels/torch_ops.py
// gives the ops their shape functions and picks one or the other.
TORCH_LIBRARY(quant_kernels, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor s, Tensor zs, Tensor gunit, Tensor xidx, bool identity, "
        "bool nibble, Tensor? bias, int gemv_max_rows, int blas_min_rows) -> Tensor");
  m.def("linear_a8(Tensor x, Tensor codes, Tensor s, Tensor zs, Tensor gunit, Tensor xidx, bool identity, "
        "Tensor? bias, Tensor? sx) -> Tensor");
  m.def("w8a8(Tensor x, Tensor w, Tensor sw, Tensor? bias, Tensor? sx) -> Tensor");
  m.def("quant_dynamic(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("quant_static(Tensor x, float scale, float zero, int qhi, int offset) -> Tensor");
  m.def("dw_a8(Tensor x, Tensor sx, Tensor w, Tensor sw, Tensor? bias, int kh, int kw, int sh, int sw_, int dh, "
        "int dw) -> Tensor");
  m.def("gemm_vert_a8(Tensor x, Tensor sx, Tensor w, Tensor sw, int N, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(quant_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_a8", &linear_a8);
  m.impl("w8a8", &w8a8);
  m.impl("quant_dynamic", &quant_dynamic);
  m.impl("quant_static", &quant_static);
  m.impl("dw_a8", &dw_a8);
  m.impl("gemm_vert_a8", &gemm_vert_a8);
}
