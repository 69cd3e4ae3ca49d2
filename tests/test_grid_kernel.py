"""The fused CPU grid search (quant_kernels/csrc/grid_search.cpp) against grid.py's tensor loop, its reference.

Both run the same candidates with the same float32 element arithmetic; the kernel sums in double, so it may pick
another candidate only where two candidates' errors tie within float32 rounding."""
from __future__ import annotations

import os

import pytest
import torch

from hawqtool.quantize import grid
from hawqtool.quantize.quantizer import QuantSpec, _range_to_qparams
from quant_kernels import fast_cpu

ext = fast_cpu.extension()
if ext is None and os.environ.get("CI"):
    pytest.fail(f"the CPU extension must build in CI: {fast_cpu.backend_reason()}", pytrace=False)
pytestmark = pytest.mark.skipif(ext is None, reason=f"fast CPU path unavailable: {fast_cpu.backend_reason()}")


def groups(rows: int, width: int, seed: int, shared_d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed groups of varied scale, an all-zero row and an outlier; importances spread over 1e6."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, width, generator=g) ** 3 * torch.rand(rows, 1, generator=g)
    W[3] = 0
    W[7, width // 2] = 20
    d = torch.rand(1 if shared_d else rows, width, generator=g) ** 6
    return W, d


def both(W, d, bits, symmetric):
    maxq = 2**bits - 1
    start = _range_to_qparams(W.min(1).values, W.max(1).values, QuantSpec(bits, W.shape[1], symmetric))
    steps = grid._steps(maxq, symmetric)
    ref = grid._search_torch(W, d, maxq, symmetric, start, steps)
    got = ext.grid_search(W, d.contiguous(), start[0].float(), start[1].float(), torch.tensor(steps), maxq, symmetric)
    dd = d.expand_as(W)
    err = [grid._weighted_err(W, dd, s, z, maxq).double() for s, z in (ref, got, start)]
    return ref, got, err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("width,shared_d", [(32, False), (128, True), (37, False), (576, True)])
def test_kernel_picks_the_reference_candidates(bits, symmetric, width, shared_d):
    W, d = groups(600, width, seed=bits * 1000 + width, shared_d=shared_d)
    (rs, rz), (gs, gz), (e_ref, e_got, e_start) = both(W, d, bits, symmetric)
    same = ((rs == gs) & (rz == gz)).float().mean().item()
    assert same >= 0.99, same
    assert ((gz >= 0) & (gz <= 2**bits - 1) & (gz == gz.round())).all() and (gs > 0).all()
    assert torch.equal(gs, gs.half().float())  # fp16-exact, as stored
    assert (e_got <= e_start * (1 + 1e-6) + 1e-12).all()  # min-max is a candidate: never worse than it
    assert abs(e_got.sum() / e_ref.sum() - 1) < 1e-4
    assert torch.equal(e_got[3], torch.zeros((), dtype=torch.float64))  # the zero row stays exact


def test_search_qparams_uses_the_kernel_on_cpu_and_gives_the_same_params_every_time(monkeypatch):
    W, d = groups(300, 64, seed=1, shared_d=True)
    start = _range_to_qparams(W.min(1).values, W.max(1).values, QuantSpec(3, 64, False))
    a = grid.search_qparams(W, d[0], 3, False, start)
    b = grid.search_qparams(W, d[0], 3, False, start)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # rows are independent: thread count cannot matter
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        c = grid.search_qparams(W, d[0], 3, False, start)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    calls = []
    monkeypatch.setattr(grid, "_search_torch", lambda *args: calls.append(1) or args[4])
    grid.search_qparams(W, d[0], 3, False, start)
    assert not calls  # a CPU tensor went to the kernel
    monkeypatch.setattr(grid, "_kernel", lambda W: None)
    grid.search_qparams(W, d[0], 3, False, start)
    assert calls  # no kernel (another device, or none built): the tensor loop
