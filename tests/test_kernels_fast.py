"""The AVX2 CPU extension against the float64 dequantized reference, on fresh random inputs.

Covers every width, symmetric/asymmetric, group sizes with partial and non-16-multiple groups,
act-order g_idx, GEMV (M <= 4) and GEMM rows, bias, bf16 inputs, and the dispatch rules.
"""
from __future__ import annotations

import pytest
import torch

from quant_kernels import PackedWeight, backend_info, matmul_reference, qmatmul
from quant_kernels import fast_cpu
from quant_kernels.fast_cpu import matmul_fast, repack

ext = fast_cpu.extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"fast CPU path unavailable: {fast_cpu.backend_reason()}")


def random_packed(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, act_order: bool,
                  seed: int) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, n_groups, generator=g) * 0.1 + 0.01
    zeros = None if symmetric else torch.randint(0, 2**bits, (out_f, n_groups), generator=g)
    g_idx = None
    if act_order:  # act-order: a column permutation with group = rank // group_size
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // (in_f if group_size == -1 else group_size)).to(torch.int32)
    return PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric,
                                   g_idx=g_idx)


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(y).all()
    scale = ref.abs().max().item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= 2e-5 * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_f, group_size", [(576, 128), (100, 32), (90, 20), (64, -1), (37, 16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_fast_matches_reference(bits, symmetric, in_f, group_size, act_order):
    seed = hash((bits, symmetric, in_f, group_size, act_order)) % 10_000
    pw = random_packed(45, in_f, bits, group_size, symmetric, act_order, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in (1, 3, 4, 5, 17):  # GEMV (<= 4 rows) and GEMM paths
        x = torch.randn(m, in_f, generator=g)
        assert_close(matmul_fast(x, pw), matmul_reference(x, pw))


def test_bias_leading_dims_bf16_and_empty():
    pw = random_packed(30, 128, 4, 64, False, False, 3)
    bias = torch.randn(30)
    x = torch.randn(2, 3, 128)
    assert_close(matmul_fast(x, pw, bias).reshape(6, 30), matmul_reference(x.reshape(6, 128), pw, bias))
    xb = torch.randn(2, 128).to(torch.bfloat16)
    yb = matmul_fast(xb, pw)
    assert yb.dtype == torch.bfloat16
    ref = matmul_reference(xb.float(), pw)
    assert (yb.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 output rounding
    assert matmul_fast(torch.randn(0, 128), pw).shape == (0, 30)


def test_repack_is_cached_and_leaves_the_packed_weight_alone():
    pw = random_packed(16, 64, 3, 32, False, True, 5)
    before = pw.qweight.clone()
    assert repack(pw) is repack(pw)
    assert torch.equal(pw.qweight, before)


def test_dispatch_uses_the_extension_and_says_so(monkeypatch):
    assert "AVX2" in backend_info()["cpu"]
    pw = random_packed(8, 32, 4, 32, False, False, 7)
    called = []
    monkeypatch.setattr("quant_kernels.dispatch.matmul_fast", lambda *a: called.append(1) or matmul_fast(*a))
    qmatmul(torch.randn(1, 32), pw)
    assert called


def test_forced_portable_path_is_reported(monkeypatch):
    monkeypatch.setattr(fast_cpu, "_STATE", {})
    monkeypatch.setenv("HAWQTOOL_KERNELS", "torch")
    assert fast_cpu.extension() is None and "HAWQTOOL_KERNELS" in backend_info()["cpu"]
    pw = random_packed(8, 32, 4, 32, False, False, 8)
    x = torch.randn(2, 32)
    assert_close(qmatmul(x, pw), matmul_reference(x, pw))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_blas_tile_path_spans_several_row_tiles(bits):
    """M >= BLAS_MIN_ROWS decodes 256-row tiles; N = 600 spans three of them, the last partial."""
    pw = random_packed(600, 200, bits, 64, bits == 8, bits == 3, 11)
    g = torch.Generator().manual_seed(12)
    x, bias = torch.randn(fast_cpu.BLAS_MIN_ROWS + 3, 200, generator=g), torch.randn(600, generator=g)
    assert_close(matmul_fast(x, pw, bias), matmul_reference(x, pw, bias))


def w8a8_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 s_x·s_w·Σ q_x·(q_w − 128) from independently quantized activations (activation.py)."""
    from quant_kernels.activation import quantize_per_token
    from quant_kernels.packing import unpack

    qx, sx = quantize_per_token(x, 8)
    qw = unpack(pw.qweight, 8, pw.in_features).double() - 128
    y = (qx.double() @ qw.T) * sx.double() * pw.scales[:, 0].double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("in_f", [16, 37, 576])
@pytest.mark.parametrize("m", [1, 3, 20, 67])
def test_w8a8_int8_kernel_matches_the_integer_reference(in_f, m):
    from quant_kernels import qmatmul_w8a8
    from quant_kernels.fast_cpu import w8a8_supported

    pw = random_packed(70, in_f, 8, -1, True, False, in_f + m)
    assert w8a8_supported(pw)
    g = torch.Generator().manual_seed(m)
    x, bias = torch.randn(m, in_f, generator=g) * 3, torch.randn(70, generator=g)
    x[0, :5] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero token: scale 1, output = bias
    y = qmatmul_w8a8(x, pw, bias)
    ref = w8a8_reference(x, pw, bias)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if m > 2:
        assert torch.allclose(y[2], bias)


def test_w8a8_falls_back_to_the_same_arithmetic_for_other_weights():
    from quant_kernels import qmatmul_w8a8
    from quant_kernels.activation import fake_quant_per_token

    pw = random_packed(30, 64, 4, 32, False, False, 5)  # not a W8A8 weight: fake-quantized x through qmatmul
    x = torch.randn(4, 64)
    assert_close(qmatmul_w8a8(x, pw), matmul_reference(fake_quant_per_token(x, 8), pw))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_f, group_size", [(576, 128), (100, 32), (90, 20), (64, -1), (37, 16), (1000, 200)])
@pytest.mark.parametrize("act_order", [False, True])
def test_a8_int8_kernel_matches_the_integer_reference(bits, symmetric, in_f, group_size, act_order):
    """W{2,3,4}A8: s_x·Σ q_x·dequant(W) in float64 from independently quantized activations; covers
    groups of 1..15 units (full 4-unit runs and leftover units), padding, act-order, ragged row counts."""
    from quant_kernels import qmatmul_w8a8
    from quant_kernels.activation import quantize_per_token

    seed = hash((bits, symmetric, in_f, group_size, act_order, "a8")) % 10_000
    pw = random_packed(43, in_f, bits, group_size, symmetric, act_order, seed)
    assert fast_cpu.a8_supported(pw)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(43, generator=g)
    for m in (1, 3, 6, 17, 70):  # GEMV tiles, 4×2 tiles with odd token counts, several token chunks
        x = torch.randn(m, in_f, generator=g) * 3
        x[0, : in_f // 3] = 0.0
        if m > 2:
            x[2] = 0.0  # an all-zero token: scale 1, output = bias
        y = qmatmul_w8a8(x, pw, bias)
        qx, sx = quantize_per_token(x, 8)
        ref = matmul_reference(qx.float(), pw) * sx.double() + bias.double()
        assert torch.isfinite(y).all()
        assert (y.double() - ref).abs().max() <= 2e-5 * ref.abs().max()
        if m > 2:
            assert torch.allclose(y[2], bias)


def test_int8_kernels_serve_every_row_count(monkeypatch):
    """Decode- and prompt-sized inputs both take the integer kernels (the tiled kernel beats the
    fake-quant + BLAS tile path at every shape of bench_kernels.py)."""
    from quant_kernels import dispatch

    pw = random_packed(32, 64, 4, 32, False, False, 9)
    calls = []
    monkeypatch.setattr(dispatch, "linear_int8", lambda *a: calls.append("int8") or torch.zeros(1, 32))
    dispatch.qmatmul_w8a8(torch.randn(1, 64), pw)
    dispatch.qmatmul_w8a8(torch.randn(300, 64), pw)
    assert calls == ["int8", "int8"]
