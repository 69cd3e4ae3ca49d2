"""--float-target (GPTAQ's asymmetric calibration): each layer is fitted to the float model's outputs W x_fp from
the quantized chain's inputs x. Checked against an independent float64 ridge least-squares solve on activations
captured from separate float and quantized forwards, and for resume after a stop."""
from __future__ import annotations

import copy

import pytest
import torch

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize import driver
from hawqtool.quantize.driver import QuantizeOptions, quantize_model
from hawqtool.quantize.hessians import float_target


def test_float_target_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    n, i, o = 500, 12, 5
    X = torch.randn(n, i, generator=g, dtype=torch.float64)
    Xf = X + 0.2 * torch.randn(n, i, generator=g, dtype=torch.float64)
    W = torch.randn(o, i, generator=g, dtype=torch.float64)
    V = float_target(W, (Xf - X).t() @ X, X.t() @ X, 0.0)
    assert torch.allclose(V, torch.linalg.lstsq(X, Xf @ W.t()).solution.t(), atol=1e-10)
    assert torch.equal(float_target(W, torch.zeros(i, i, dtype=torch.float64), X.t() @ X, 0.01), W)


def _ridge(W, Xq, Xf, w, percdamp):
    """argmin_V Σ_t w_t ‖W x_f,t − V x_t‖² + λ‖V − W‖², λ = percdamp·mean diag(Σ w x xᵀ): stacked lstsq."""
    S = (Xq * w[:, None]).t() @ Xq
    lam = percdamp * float(S.diagonal().mean())
    A = torch.cat([Xq * w.sqrt()[:, None], lam ** 0.5 * torch.eye(Xq.shape[1], dtype=Xq.dtype)])
    B = torch.cat([(Xf @ W.t()) * w.sqrt()[:, None], lam ** 0.5 * W.t()])
    return torch.linalg.lstsq(A, B).solution.t()


def _inputs(model, names, ids, bs):
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0].detach().double()))
          for n in names]
    with torch.no_grad():
        for k in range(0, len(ids), bs):
            model(input_ids=ids[k:k + bs], use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_layer_fitted_to_float_outputs(tiny_llama, monkeypatch):
    """The weight GPTQ receives for block 1's q/o/down projections equals the ridge least-squares map from the
    inputs the quantized model gives those layers to the float model's outputs (first-token weight applied)."""
    loaded = load_model(str(tiny_llama))
    model = loaded.model
    floats = copy.deepcopy(model)
    ids = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    specs = plan_specs(fixed_plan(shapes, 3, group_size=-1))
    names = [n for n in specs if n.startswith("model.layers.1.") and n.split(".")[-1] in ("q_proj", "o_proj", "down_proj")]
    given = {}
    real = driver.quantize_layer

    def spy(name, W, H, spec, opts):
        given[name] = W.double().clone()
        return real(name, W, H, spec, opts)

    monkeypatch.setattr(driver, "quantize_layer", spy)
    # untuned: block tuning moves q/k/v after o_proj's H is collected, so the final model's inputs would not be GPTQ's
    opts = QuantizeOptions(float_target=True, first_token_weight=4.0, batch_size=3, tune_iters=0)
    quantize_model(model, specs, ids, opts)
    xq, xf = _inputs(model, names, ids, 3), _inputs(floats, names, ids, 3)
    mods = dict(floats.named_modules())
    for n in names:
        w = torch.ones(xq[n].shape[:2], dtype=torch.float64)
        w[:, 0] = 4.0
        ref = _ridge(weight_matrix(mods[n]).double(), xq[n].reshape(-1, xq[n].shape[-1]),
                     xf[n].reshape(-1, xf[n].shape[-1]), w.reshape(-1), opts.percdamp)
        assert not torch.allclose(ref, weight_matrix(mods[n]).double(), atol=1e-4), n  # a real correction
        assert torch.allclose(given[n], ref, rtol=1e-4, atol=1e-5), (n, (given[n] - ref).abs().max())


def test_first_block_inputs_agree_so_no_change(tiny_llama, monkeypatch):
    """Block 0's q/k/v read the same inputs in both chains: their weights reach GPTQ unchanged."""
    loaded = load_model(str(tiny_llama))
    orig = {n: weight_matrix(m).clone() for n, m in quantizable_layers(loaded.model).items()}
    given = {}
    real = driver.quantize_layer
    monkeypatch.setattr(driver, "quantize_layer",
                        lambda name, W, H, spec, opts: (given.setdefault(name, W.clone()), real(name, W, H, spec, opts))[1])
    specs = plan_specs(fixed_plan({n: tuple(w.shape) for n, w in orig.items()}, 4, group_size=-1))
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    quantize_model(loaded.model, specs, ids, QuantizeOptions(float_target=True, batch_size=2))
    for p in ("q_proj", "k_proj", "v_proj"):
        n = f"model.layers.0.self_attn.{p}"
        assert torch.allclose(given[n], orig[n], atol=1e-6), n


def test_resumed_run_equals_whole(tiny_llama, tmp_path):
    """A run stopped after block 0 resumes with the saved float chain and ends with the same weights."""
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))

    def run(state, stop_after=None):
        loaded = load_model(str(tiny_llama))
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
        specs = plan_specs(fixed_plan(shapes, 3, group_size=-1))
        if stop_after is not None:
            specs = {n: s for n, s in specs.items() if n.startswith("model.layers.0.")}
        res = quantize_model(loaded.model, specs, ids, QuantizeOptions(float_target=True, batch_size=2),
                             state_dir=state, state_key="k")
        return {n: r.weight.dequantize() for n, r in res.items()}

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=0)  # block 0 saved (with its float-chain outputs), block 1 not planned
    resumed = run(tmp_path / "b")
    assert whole.keys() == resumed.keys()
    for n in whole:
        assert torch.equal(whole[n], resumed[n]), n
