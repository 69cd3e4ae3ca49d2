"""Triton kernels under the Triton CPU interpreter vs. the float64 reference, plus AOT PTX checks."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede importing triton and quant_kernels.triton_kernels

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from quant_kernels import PackedWeight, dispatch, matmul_reference  # noqa: E402
from quant_kernels import triton_kernels as tk  # noqa: E402
from quant_kernels.activation import quantize_per_token  # noqa: E402

BITS = [2, 3, 4, 8]
# (M, N, K, group_size, act_order, dtype, bias): ragged M/N/K, partial groups, several tiles per axis
CASES = [
    (3, 37, 80, 32, False, torch.float32, False),
    (3, 37, 96, 32, True, torch.float16, True),
    (4, 20, 96, 64, False, torch.float16, False),
    (2, 70, 80, -1, True, torch.float32, True),
    (70, 16, 64, 64, True, torch.float32, False),
    (5, 24, 80, -1, False, torch.float16, True),
    (3, 24, 200, 16, False, torch.float32, False),  # 13 groups: 3-bit zeros straddle words
]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def _packed(bits: int, symmetric: bool, n: int, k: int, gs: int, act_order: bool, seed: int) -> PackedWeight:
    """Random PackedWeight; act-order g_idx maps a random permutation of the columns to groups."""
    g = torch.Generator().manual_seed(seed)
    n_g = 1 if gs == -1 else math.ceil(k / gs)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, n_g), generator=g, dtype=torch.int32)
    scales = (torch.rand(n, n_g, generator=g) * 0.05 + 1e-3).to(torch.float16)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g) // (k if gs == -1 else gs)).to(torch.int32)
    return PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=gs, symmetric=symmetric, g_idx=g_idx)


def _assert_matches(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element within tol * max|ref| of the reference (NaN/inf or poison fails)."""
    assert y.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0
    err = (y.double() - ref).abs()
    assert bool((err <= tol * scale).all()), f"max rel err {err.max().item() / scale:.3g} > {tol}"


def test_available_under_interpreter() -> None:
    assert tk.available()
    assert tk._interpreting()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}g{c[3]}{'act' if c[4] else ''}"
                         f"-{str(c[5])[6:]}{'-bias' if c[6] else ''}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
def test_matmul_matches_reference(bits: int, symmetric: bool, case: tuple) -> None:
    m, n, k, gs, act, dtype, with_bias = case
    seed = 1000 * bits + 10 * CASES.index(case) + symmetric
    pw = _packed(bits, symmetric, n, k, gs, act, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    y = tk.matmul_triton(x, pw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    _assert_matches(y, matmul_reference(x, pw, bias), TOL[dtype])


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
def test_matmul_other_widths(bits: int) -> None:
    pw = _packed(bits, False, 29, 112, 16, True, bits)
    x = torch.randn(6, 112, generator=torch.Generator().manual_seed(bits))
    _assert_matches(tk.matmul_triton(x, pw), matmul_reference(x, pw), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_poisoned_out_and_batch_dims(dtype: torch.dtype) -> None:
    pw = _packed(3, False, 70, 96, 32, False, 7)
    x = torch.randn(2, 35, 96, generator=torch.Generator().manual_seed(7)).to(dtype)  # 70 rows -> 2 M tiles
    out = torch.full((2, 35, 70), float("nan"), dtype=dtype)
    y = tk.matmul_triton(x, pw, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (2, 35, 70)
    assert bool(torch.isfinite(out).all())
    _assert_matches(out, matmul_reference(x, pw), TOL[dtype])


def test_matmul_rejects_bad_arguments() -> None:
    pw = _packed(4, True, 8, 32, 32, False, 0)
    with pytest.raises(ValueError, match="input features"):
        tk.matmul_triton(torch.randn(2, 31), pw)
    with pytest.raises(ValueError, match="bias"):
        tk.matmul_triton(torch.randn(2, 32), pw, torch.randn(9))
    with pytest.raises(ValueError, match="out must be"):
        tk.matmul_triton(torch.randn(2, 32), pw, out=torch.empty(2, 8, dtype=torch.float16))


@pytest.mark.parametrize("m,n,k,with_bias", [(3, 37, 80, False), (70, 70, 96, True), (1, 16, 32, False)])
def test_w8a8_matches_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen)
    xq, sx = quantize_per_token(x)
    wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    sw = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = torch.full((m, n), float("nan"))
    y = tk.w8a8_triton(xq, sx, wq, sw, bias, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == torch.float32
    acc = xq.double() @ wq.double().T  # exact integers
    ref = acc * sx.double() * sw.double()[None, :]
    if bias is not None:
        ref = ref + bias.double()
    _assert_matches(y, ref, 1e-6)
    if bias is None:  # int32 accumulation is exact: the integer accumulator is recoverable
        rec = torch.round(y.double() / (sx.double() * sw.double()[None, :]))
        assert torch.equal(rec, acc)


def test_w8a8_extreme_codes_accumulate_exactly() -> None:
    k = 96
    xq = torch.full((3, k), 127, dtype=torch.int8)
    wq = torch.full((5, k), -127, dtype=torch.int8)
    y = tk.w8a8_triton(xq, torch.ones(3, 1), wq, torch.ones(5))
    assert torch.equal(y, torch.full((3, 5), -127.0 * 127 * k))


def test_dispatch_registers_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_BACKENDS", {"cpu": dispatch._BACKENDS["cpu"]})
    assert dispatch._backend("cuda") is tk.matmul_triton  # imported and registered on first GPU use
    assert dispatch._BACKENDS["cuda"] is tk.matmul_triton
    assert "Triton" in dispatch.backend_info()["cuda"]
    with pytest.raises(NotImplementedError, match="no GPU kernel"):
        dispatch.qmatmul(torch.randn(2, 32, device="meta"), _packed(4, True, 8, 32, 32, False, 0))


def test_module_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("quant_kernels._triton_kernels_probe", tk.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.triton is None and not mod.available()
    with pytest.raises(RuntimeError, match="needs triton"):
        mod.matmul_triton(torch.randn(2, 32), _packed(4, True, 8, 32, 32, False, 0))


def _nvidia_backend() -> bool:
    """True if this triton has its CUDA compiler backend (ptxas ships in the wheel)."""
    from triton.backends import backends
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend(), reason="triton has no nvidia backend here: cannot AOT-compile for CUDA")
def test_aot_ptx_uses_tensor_cores() -> None:
    w4_80 = tk.ptx_for("matmul", 80)
    assert ".target sm_80" in w4_80
    assert re.search(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.f32\.f16\.f16\.f32", w4_80)
    assert "shr.u32" in w4_80 or "shr.b32" in w4_80  # in-kernel unpacking of the int32 words
    w8_80 = tk.ptx_for("w8a8", 80)
    assert re.search(r"mma\.sync\.aligned\.\S*s32\.s8\.s8\.s32", w8_80)
    w8_90 = tk.ptx_for("w8a8", 90)
    assert ".target sm_90a" in w8_90 or ".target sm_90" in w8_90
    assert re.search(r"wgmma\.mma_async\.\S*\.s32\.s8\.s8", w8_90)
    w4_90 = tk.ptx_for("matmul", 90)
    assert re.search(r"wgmma\.mma_async\.\S*\.f32\.f16\.f16", w4_90)
