"""CPU kernel and dequantize vs. the float64 reference (and vs. codes built by hand)."""
from __future__ import annotations

import math

import pytest
import torch

import quant_kernels.cpu as cpu_mod
from quant_kernels import (PackedWeight, dequantize, dequantize_reference, matmul_cpu, matmul_reference,
                           qmatmul)

BITS = [2, 3, 4, 5, 6, 8]  # 5 and 6: the allocator offers them with --bits 2,3,4,5,6,8
# (in_features, group_size): partial last group (576 / 128 -> 5 groups), odd in with g=32, per-row
SHAPES = [(576, 128), (200, 32), (96, -1), (33, 32)]


def _case(bits: int, symmetric: bool, in_f: int, gs: int, *, out_f: int = 45, act_order: bool = False,
          seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    """Random PackedWeight plus the float64 weight computed directly from the unpacked codes."""
    g = torch.Generator().manual_seed(seed)
    n_g = 1 if gs == -1 else math.ceil(in_f / gs)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    if symmetric:
        zeros = torch.full((out_f, n_g), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2**bits, (out_f, n_g), generator=g, dtype=torch.int32)
    scales = (torch.rand(out_f, n_g, generator=g) * 0.05 + 1e-3).to(torch.float16)
    g_idx = None
    if act_order:
        width = in_f if gs == -1 else gs
        perm = torch.randperm(in_f, generator=g)
        g_idx = (perm // width).to(torch.int32)  # GPTQ act-order: group of the permuted position
    pw = PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=gs, symmetric=symmetric, g_idx=g_idx)
    gi = g_idx.long() if g_idx is not None else (torch.arange(in_f) // (in_f if gs == -1 else gs))
    w = scales.double()[:, gi] * (q.double() - zeros.double()[:, gi])
    return pw, w


def _assert_close_fp32(y: torch.Tensor, ref: torch.Tensor) -> None:
    """No NaN; elementwise rtol 1e-4 with an atol scaled to the output's magnitude (cancellation)."""
    assert not torch.isnan(y).any()
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7)


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make matmul_cpu's output buffer start as NaN so an unwritten tile shows up."""
    def nan_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(cpu_mod, "_alloc", nan_alloc)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_f, gs", SHAPES)
def test_dequantize_matches_reference(bits: int, symmetric: bool, in_f: int, gs: int) -> None:
    pw, w = _case(bits, symmetric, in_f, gs, seed=bits * 7 + in_f)
    ref = dequantize_reference(pw)
    assert ref.dtype == torch.float64 and not torch.isnan(ref).any()
    assert torch.equal(ref, w)
    assert torch.equal(dequantize(pw, torch.float64), w)  # fp32 dequantization is exact
    assert dequantize(pw).dtype == torch.float32
    assert dequantize(pw, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_f, gs", SHAPES)
def test_matmul_cpu_fp32(bits: int, symmetric: bool, in_f: int, gs: int, poisoned: None) -> None:
    pw, w = _case(bits, symmetric, in_f, gs, seed=bits * 11 + in_f)
    x = torch.randn(7, in_f)
    ref = matmul_reference(x, pw)
    torch.testing.assert_close(ref, x.double() @ w.T)
    y = matmul_cpu(x, pw, tile_rows=16)  # 45 rows -> 3 tiles, the last partial
    assert y.dtype == torch.float32
    _assert_close_fp32(y, ref)
    _assert_close_fp32(qmatmul(x, pw), ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_f, gs", [(576, 128), (200, 32), (96, -1)])
def test_act_order_g_idx(bits: int, symmetric: bool, in_f: int, gs: int, poisoned: None) -> None:
    pw, w = _case(bits, symmetric, in_f, gs, act_order=True, seed=bits + in_f)
    assert pw.g_idx is not None and pw.g_idx.dtype == torch.int32
    assert torch.equal(dequantize_reference(pw), w)
    assert torch.equal(dequantize(pw, torch.float64), w)
    x = torch.randn(5, in_f)
    _assert_close_fp32(matmul_cpu(x, pw, tile_rows=8), matmul_reference(x, pw))


@pytest.mark.parametrize("bits", [3, 4])
def test_bias_and_input_ranks(bits: int, poisoned: None) -> None:
    pw, _ = _case(bits, False, 576, 128, out_f=37)
    bias = torch.randn(37)
    x1 = torch.randn(576)
    y1 = qmatmul(x1, pw, bias)
    assert y1.shape == (37,)
    _assert_close_fp32(y1, matmul_reference(x1, pw, bias))
    x3 = torch.randn(2, 3, 576)
    y3 = matmul_cpu(x3, pw, bias, tile_rows=10)
    assert y3.shape == (2, 3, 37)
    _assert_close_fp32(y3, matmul_reference(x3, pw, bias))
    assert matmul_cpu(torch.randn(0, 576), pw).shape == (0, 37)
    torch.testing.assert_close(y3[1, 2], matmul_cpu(x3[1, 2], pw, bias), rtol=1e-5, atol=1e-5)  # rows independent


def test_large_layer_uses_tiles(poisoned: None, monkeypatch: pytest.MonkeyPatch) -> None:
    pw, _ = _case(4, False, 256, 128, out_f=1100)
    seen: list[int] = []
    orig = cpu_mod.dequantize_rows

    def spy(pw_: PackedWeight, start: int, stop: int, gidx: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(stop - start)
        return orig(pw_, start, stop, gidx)
    monkeypatch.setattr(cpu_mod, "dequantize_rows", spy)
    x = torch.randn(3, 256)
    y = matmul_cpu(x, pw)
    assert max(seen) <= cpu_mod.TILE_ROWS and sum(seen) == 1100
    _assert_close_fp32(y, matmul_reference(x, pw))


@pytest.mark.parametrize("bits", BITS)
def test_bf16_input(bits: int, poisoned: None) -> None:
    pw, _ = _case(bits, bits % 2 == 0, 576, 128)
    bias = torch.randn(45).to(torch.bfloat16)
    x = torch.randn(4, 576).to(torch.bfloat16)
    y = qmatmul(x, pw, bias)
    assert y.dtype == torch.bfloat16 and not torch.isnan(y).any()
    ref = matmul_reference(x, pw, bias)  # x's bf16 values are exact in float64
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_rejects_bad_inputs() -> None:
    pw, _ = _case(4, True, 64, 32)
    with pytest.raises(ValueError, match="in_features"):
        matmul_cpu(torch.randn(3, 63), pw)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        matmul_cpu(torch.randn(3, 64, dtype=torch.float64), pw)
    with pytest.raises(ValueError, match="bias"):
        matmul_cpu(torch.randn(3, 64), pw, torch.randn(44))


def test_non_cpu_device_not_implemented() -> None:
    pw, _ = _case(4, True, 64, 32)
    with pytest.raises(NotImplementedError, match="no GPU kernel"):
        qmatmul(torch.randn(2, 64, device="meta"), pw)
