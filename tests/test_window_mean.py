"""Each calibration window's mean weighted in GPTQ's H, GPTAQ's cross term and the tuning loss
(QuantizeOptions.window_mean_weight): checked against sums written out window by window in float64."""
from __future__ import annotations

import copy

import pytest
import torch

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.blocks import capture_block_inputs, find_blocks, run_block
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.options import QuantizeOptions
from hawqtool.quantize import driver, tune
from hawqtool.quantize.hessians import collect_hessians, mean_scaled

IDS = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(3))


def _reweighted(x: torch.Tensor, first: float, kappa: float) -> torch.Tensor:
    """Rows whose Gram matrix is Σ_w [Σ_t (a_t − ā)(a_t − ā)ᵀ + κ·T·ā āᵀ], a_t = x_t (position 0 times √first)."""
    a = x.double().clone()
    a[:, 0] *= first ** 0.5
    m = a.mean(dim=1, keepdim=True)
    return (a - m + kappa ** 0.5 * m).reshape(-1, x.shape[-1])


def test_mean_scaled_splits_within_and_between():
    x = torch.randn(3, 50, 4, dtype=torch.float64)
    y = mean_scaled(x, 7.0).reshape(-1, 4)
    m = x.mean(1)
    want = sum((x[b] - m[b]).t() @ (x[b] - m[b]) + 7.0 * 50 * torch.outer(m[b], m[b]) for b in range(3))
    assert torch.allclose(y.t() @ y, want)
    flat = x[0]
    assert mean_scaled(x, 1.0) is x and mean_scaled(flat, 7.0) is flat  # weight 1, or no positions: untouched


def test_hessian_weighs_each_windows_mean(tiny_llama):
    model = load_model(str(tiny_llama)).model
    block = find_blocks(model)[1][1]
    inputs = capture_block_inputs(model, block, [{"input_ids": IDS[:3]}, {"input_ids": IDS[3:]}])
    mlp = {"down": block.mlp.down_proj}
    seen = []
    h = block.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    H = collect_hessians(block, mlp, inputs, early_stop=True, first_weight=4.0, mean_weight=9.0)["down"]
    h.remove()
    rows = torch.cat([_reweighted(x, 4.0, 9.0) for x in seen])
    assert torch.allclose(H._sum, rows.t() @ rows, rtol=1e-5, atol=1e-4)
    plain = collect_hessians(block, mlp, inputs, early_stop=True, first_weight=4.0)["down"]
    assert not torch.allclose(H._sum, plain._sum, rtol=1e-2)  # the weight changes H


def test_tuning_loss_weighs_each_windows_mean_error(tiny_llama):
    model = load_model(str(tiny_llama)).model
    block = find_blocks(model)[1][0]
    inputs = capture_block_inputs(model, block, [{"input_ids": IDS[:3]}])
    with torch.no_grad():
        out = run_block(block, inputs, 0)
        y = out + 0.1 * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        got = float(tune._block_loss(block, inputs, [y], 0, False, mean=16.0))
    e = (out - y).double()
    m = e.mean(1, keepdim=True)
    want = float((e - m).pow(2).sum() + 16.0 * e.shape[1] * m.pow(2).sum())
    assert got == pytest.approx(want, rel=1e-5)
    assert got > 1.5 * float(e.pow(2).sum())


def test_float_target_fits_the_reweighted_least_squares(tiny_llama, monkeypatch):
    """With GPTAQ's float target, the weight GPTQ receives is the ridge fit of the float outputs on rows reweighted as
    H weighs them (first position and each window's mean)."""
    model = load_model(str(tiny_llama)).model
    floats = copy.deepcopy(model)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    specs = plan_specs(fixed_plan(shapes, 3, group_size=-1))
    names = [n for n in specs if n.startswith("model.layers.1.") and n.split(".")[-1] in ("o_proj", "down_proj")]
    given, real = {}, driver.quantize_layer

    def spy(name, W, H, spec, opts):
        given[name] = W.double().clone()
        return real(name, W, H, spec, opts)

    monkeypatch.setattr(driver, "quantize_layer", spy)
    opts = QuantizeOptions(float_target=True, first_token_weight=4.0, window_mean_weight=9.0, batch_size=3, tune_iters=0)
    driver.quantize_model(model, specs, IDS, opts)
    mods, qmods = dict(floats.named_modules()), dict(model.named_modules())
    for n in names:
        xq, xf = [], []
        hq = qmods[n].register_forward_pre_hook(lambda _m, a: xq.append(a[0].detach()))
        hf = mods[n].register_forward_pre_hook(lambda _m, a: xf.append(a[0].detach()))
        with torch.no_grad():
            for k in (0, 3):
                model(input_ids=IDS[k:k + 3], use_cache=False)
                floats(input_ids=IDS[k:k + 3], use_cache=False)
        hq.remove(), hf.remove()
        A = torch.cat([_reweighted(x, 4.0, 9.0) for x in xq])
        W = weight_matrix(mods[n]).double()
        B = torch.cat([_reweighted(x, 4.0, 9.0) for x in xf]) @ W.t()
        lam = opts.percdamp * float((A.t() @ A).diagonal().mean())
        eye = torch.eye(A.shape[1], dtype=A.dtype)
        ref = torch.linalg.lstsq(torch.cat([A, lam ** 0.5 * eye]), torch.cat([B, lam ** 0.5 * W.t()])).solution.t()
        assert torch.allclose(given[n], ref, rtol=1e-4, atol=1e-5), (n, (given[n] - ref).abs().max())


def test_weight_one_keeps_the_fingerprint_and_others_change_it():
    base = QuantizeOptions().fingerprint()
    assert "window_mean_weight" not in base
    assert QuantizeOptions(window_mean_weight=8.0).fingerprint()["window_mean_weight"] == 8.0
