"""Sampled-label Fisher traces against exact self-KL Hessian / Fisher block traces (tiny MLP, tiny
Llama), plus the stopping rule, determinism, unsupported objectives and compute_sensitivity."""
from __future__ import annotations

import pytest
import torch
from test_hutchinson import exact_traces, llama_setup, mlp_setup

from hawqtool.sensitivity import fisher_traces, model_logits
from hawqtool.sensitivity.hutchinson import estimating


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def score_gradients(model, params, batches, which):
    """(p_t(y)/N/len(batches), ∇_l log p_t(y) per layer) for every position t and label y of the tiny vocabulary."""
    plist = [params[n] for n in which]
    with estimating(model, plist):
        for batch in batches:
            flat = torch.log_softmax(model_logits(model, batch), -1)
            flat = flat.reshape(-1, flat.shape[-1])
            for t in range(flat.shape[0]):
                for y in range(flat.shape[1]):
                    gs = torch.autograd.grad(flat[t, y], plist, retain_graph=True)
                    yield float(flat[t, y].detach().exp()) / flat.shape[0] / len(batches), gs


def exact_fisher(model, params, batches, which) -> dict[str, float]:
    """Tr F_ll = (1/N) Σ_t Σ_y p_t(y) ‖∇_l log p_t(y)‖², enumerating the tiny vocabulary; mean over batches."""
    out = {n: 0.0 for n in which}
    for w, gs in score_gradients(model, params, batches, which):
        for n, g in zip(which, gs):
            out[n] += w * float(g.pow(2).sum())
    return out


CASES = {"mlp": (mlp_setup, ["fc1", "fc1.bias", "fc2"]), "llama": (llama_setup, ["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    setup, which = CASES[request.param]
    model, params, batches = setup()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    return model, params, batches, exact_fisher(model, params, batches, which)


def test_exact_fisher_is_the_self_kl_hessian_block():
    """The enumerated Fisher equals the double-backward self-KL Hessian trace (own point)."""
    model, params, batches = mlp_setup()
    batches = [{"x": b["x"]} for b in batches]
    hess = exact_traces(model, params, batches, "self-kl", list(params))
    fish = exact_fisher(model, params, batches, list(params))
    for n in params:
        assert fish[n] == pytest.approx(hess[n], rel=1e-9), n


def test_estimate_brackets_exact_trace(case):
    model, params, batches, exact = case
    tr = fisher_traces(model, params, batches, target_rel_se=0.0, min_probes=200, max_probes=200, seed=0)
    for n, t in exact.items():
        est = tr[n]
        assert est.probes == 200 and len(est.samples) == 200 and est.n_params == params[n].numel()
        assert min(est.samples) >= 0
        assert abs(est.mean - t) <= 3 * est.stderr, (n, est.mean, est.stderr, t)


def test_interval_coverage_over_seeds(case):
    """Across 20 seeds, ≥ 85% of the ±1.96·s.e. intervals contain the exact trace."""
    model, params, batches, exact = case
    hits = total = 0
    for seed in range(20):
        tr = fisher_traces(model, params, batches, target_rel_se=0.0, min_probes=24, max_probes=24, seed=seed)
        for n, t in exact.items():
            hits += abs(tr[n].mean - t) <= 1.96 * tr[n].stderr
            total += 1
    assert hits >= 0.85 * total, f"{hits}/{total}"


def test_more_draws_per_probe_same_mean_less_spread():
    model, params, batches = mlp_setup()
    one = fisher_traces(model, params, batches, target_rel_se=0.0, min_probes=64, max_probes=64, seed=1)
    four = fisher_traces(model, params, batches, target_rel_se=0.0, min_probes=64, max_probes=64, seed=1,
                         samples_per_batch=4)
    for n in params:
        assert four[n].probes == 64
        assert four[n].stderr < one[n].stderr, n
        assert abs(four[n].mean - one[n].mean) <= 3 * (one[n].stderr + four[n].stderr), n


def test_masked_positions_are_not_scored():
    """With attention_mask, padding positions neither count in N nor contribute gradient."""
    model, params, batches = llama_setup()
    ids = batches[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    cut = exact_fisher(model, params, [{"input_ids": ids[:, :5]}], list(params))
    tr = fisher_traces(model, params, [{"input_ids": ids, "attention_mask": mask}], target_rel_se=0.0,
                       min_probes=200, max_probes=200, seed=2)
    for n, t in cut.items():
        assert abs(tr[n].mean - t) <= 3 * tr[n].stderr, (n, tr[n].mean, tr[n].stderr, t)


def test_output_mse_matches_exact_hessian():
    model, params, batches = mlp_setup()
    batches = [{"x": b["x"]} for b in batches]
    exact = exact_traces(model, params, batches, "output-mse", list(params))
    tr = fisher_traces(model, params, batches, "output-mse", target_rel_se=0.0, min_probes=200, max_probes=200)
    for n, t in exact.items():
        assert abs(tr[n].mean - t) <= 3 * tr[n].stderr, (n, tr[n].mean, tr[n].stderr, t)


def test_stopping_rule_and_progress():
    model, params, batches = mlp_setup()
    calls = []
    loose = fisher_traces(model, params, batches, target_rel_se=0.5, min_probes=4, max_probes=64,
                          progress=lambda d, m, w: calls.append((d, m, w)))
    probes = {t.probes for t in loose.values()}
    assert len(probes) == 1 and 4 <= probes.pop() < 64
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1)) and all(c[1] == 64 for c in calls)
    assert calls[-1][2] <= 0.5
    tight = fisher_traces(model, params, batches, target_rel_se=1e-6, min_probes=2, max_probes=10)
    assert all(t.probes == 10 for t in tight.values())
    timed = fisher_traces(model, params, batches, target_rel_se=0.0, max_probes=1000, max_seconds=0.0)
    assert all(t.probes == 2 for t in timed.values())


def test_deterministic_and_restores_state():
    model, params, batches = mlp_setup()
    model.train()
    model.fc2.bias.requires_grad_(True)
    model.fc1.weight.requires_grad_(False)
    a = fisher_traces(model, params, batches, min_probes=8, max_probes=8, seed=3)
    b = fisher_traces(model, params, batches, min_probes=8, max_probes=8, seed=3)
    c = fisher_traces(model, params, batches, min_probes=8, max_probes=8, seed=4)
    assert {n: t.samples for n, t in a.items()} == {n: t.samples for n, t in b.items()}
    assert a["fc1"].samples != c["fc1"].samples
    assert model.training and model.fc2.bias.requires_grad and not model.fc1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_unsupported_objective_and_arguments():
    model, params, batches = mlp_setup()
    with pytest.raises(ValueError, match="per-position"):
        fisher_traces(model, params, batches, "labels")
    with pytest.raises(ValueError):
        fisher_traces(model, params, batches, samples_per_batch=0)
    with pytest.raises(ValueError):
        fisher_traces(model, {}, batches)


def test_compute_sensitivity_estimator():
    from hawqtool.errors import UserError
    from hawqtool.models import LoadedModel
    from hawqtool.stages import compute_sensitivity
    from test_hutchinson import tiny_llama

    loaded = LoadedModel(model=tiny_llama(dtype=torch.float32), tokenizer=None, source="tiny", files=[])
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(min_probes=3, max_probes=3, qerror_bits=(4,), qerror_groups=(16,))
    hut = compute_sensitivity(loaded, ids, estimator="hutchinson", **kw)
    assert compute_sensitivity(loaded, ids, **kw).estimator.startswith("fisher")  # auto picks fisher for self-kl
    fis = compute_sensitivity(loaded, ids, estimator="fisher", **kw)
    assert hut.estimator.startswith("hutchinson") and "estimator" not in hut.settings
    assert fis.estimator == "fisher (sampled labels, one backward per probe)"
    assert fis.settings["estimator"] == "fisher" and fis.fingerprint != hut.fingerprint
    assert [lay.name for lay in fis.layers] == [lay.name for lay in hut.layers]
    assert all(lay.probes == 3 and lay.trace > 0 for lay in fis.layers)
    with pytest.raises(UserError):
        compute_sensitivity(loaded, ids, estimator="fisher", objective="labels", **kw)
    with pytest.raises(UserError):
        compute_sensitivity(loaded, ids, estimator="nope", **kw)


def test_sdpa_attention_matches_eager():
    """First-order only: default SDPA attention needs no math backend."""
    from torch import nn
    from test_hutchinson import tiny_llama

    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}]
    res = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llama(attn, hidden=32, layers=2, heads=4, inter=64, vocab=64, dtype=torch.float32)
        params = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
        res[attn] = fisher_traces(model, params, batches, min_probes=3, max_probes=3, seed=7)
    for n, t in res["eager"].items():
        assert res["sdpa"][n].mean == pytest.approx(t.mean, rel=1e-4), n


def exact_directional(model, params, batches, directions) -> dict:
    """ΔᵀF_llΔ = (1/N) Σ_t Σ_y p_t(y) ⟨∇_l log p_t(y), Δ⟩², enumerating the tiny vocabulary; mean over batches."""
    which = list(directions)
    out = {n: {k: 0.0 for k in directions[n]} for n in which}
    for w, gs in score_gradients(model, params, batches, which):
        for n, g in zip(which, gs):
            for k, d in directions[n].items():
                out[n][k] += w * float((g * d).sum()) ** 2
    return out


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_directional_fisher_matches_the_exact_quadratic_form(name):
    from hawqtool.sensitivity.directional import directional_fisher

    setup, which = CASES[name]
    model, params, batches = setup()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    g = torch.Generator().manual_seed(5)
    dirs = {n: {"rand": torch.randn(params[n].shape, generator=g),
                "sparse": (torch.rand(params[n].shape, generator=g) < 0.3).float()} for n in which}
    exact = exact_directional(model, params, batches, dirs)
    est = directional_fisher(model, params, batches, dirs, probes=240 // len(batches) * len(batches), seed=0)
    for n in which:
        for k in dirs[n]:
            m, se = est[n][k]
            assert se > 0 and abs(m - exact[n][k]) <= 3.5 * se, (n, k, m, se, exact[n][k])
    # directions are independent of each other: an isotropic error and a sparse one differ
    assert est[which[0]]["rand"][0] != est[which[0]]["sparse"][0]


def test_label_draws_in_chunks_are_the_one_call_draws(monkeypatch):
    """sampled_loss draws the self-KL labels a few rows at a time; the labels, and so the loss, are those of one
    multinomial call over every position."""
    from hawqtool.sensitivity import fisher

    z = torch.randn(3, 11, 50, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 11)
    whole = fisher.sampled_loss("self-kl", z, mask, torch.Generator().manual_seed(7))
    monkeypatch.setattr(fisher, "DRAW_CHUNK", 120)  # 2 rows of 50 per call: 17 calls
    chunked = fisher.sampled_loss("self-kl", z, mask, torch.Generator().manual_seed(7))
    logp = torch.log_softmax(z, -1)
    y = torch.multinomial(logp.exp().reshape(-1, 50).double(), 1, generator=torch.Generator().manual_seed(7))
    ref = -logp.reshape(-1, 50).gather(-1, y).sum() / 33
    assert torch.equal(whole, chunked)
    assert torch.allclose(chunked, ref)


def test_pooled_cosine_is_one_minus_the_cosine_of_mean_pooled_outputs():
    """The pooled-cosine objective at perturbed weights equals mean over windows of 1 − cos(mean-pooled outputs),
    computed here directly in float64; masked positions are left out of the mean (= the windows cut there)."""
    from hawqtool.sensitivity.objectives import get_objective

    model, params, batches = llama_setup()
    obj = get_objective("pooled-cosine")
    ids = batches[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    with torch.no_grad():
        refs = [obj.prepare(model, {"input_ids": ids}), obj.prepare(model, {"input_ids": ids, "attention_mask": mask})]
        z0 = model_logits(model, {"input_ids": ids}).double()
        params["v_proj"].add_(0.3 * torch.randn(params["v_proj"].shape, generator=torch.Generator().manual_seed(1)))
        z1 = model_logits(model, {"input_ids": ids}).double()
        got = obj.loss(model, {"input_ids": ids}, refs[0])
        got_masked = obj.loss(model, {"input_ids": ids, "attention_mask": mask}, refs[1])
    want = (1 - torch.nn.functional.cosine_similarity(z1.mean(1), z0.mean(1), dim=-1)).mean()
    want_cut = (1 - torch.nn.functional.cosine_similarity(z1[:, :5].mean(1), z0[:, :5].mean(1), dim=-1)).mean()
    assert float(want) > 1e-4  # the perturbation moved the embedding
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    assert float(got_masked) == pytest.approx(float(want_cut), rel=1e-4)


def test_pooled_cosine_fisher_matches_exact_hessian():
    """The sampled-label Fisher on the pooled embeddings brackets the exact (double-backward) Hessian trace of the
    pooled-cosine objective at the own point, with and without an attention mask."""
    model, params, batches = llama_setup()
    which = ["v_proj", "down_proj"]
    ids = batches[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    for bs in (batches, [{"input_ids": ids, "attention_mask": mask}]):
        exact = exact_traces(model, params, bs, "pooled-cosine", which)
        tr = fisher_traces(model, {n: params[n] for n in which}, bs, "pooled-cosine", target_rel_se=0.0,
                           min_probes=300, max_probes=300, seed=1)
        for n, t in exact.items():
            assert t > 0 and abs(tr[n].mean - t) <= 3 * tr[n].stderr, (n, tr[n].mean, tr[n].stderr, t)
