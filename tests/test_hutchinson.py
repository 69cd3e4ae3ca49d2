"""Hutchinson per-layer traces against exact Hessian diagonal-block traces (tiny MLP, tiny Llama),
plus objectives, PSD-ness of self-KL, the stopping rule, determinism and SDPA attention."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hawqtool.sensitivity import get_objective, hutchinson_traces, model_logits
from hawqtool.sensitivity.ggn import math_attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add sync overhead (large under CPU contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLP(nn.Module):
    """6 → 5 → 4 with tanh; takes the batch key `x`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP().double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [{"x": torch.randn(16, 6, generator=g, dtype=torch.float64),
                "labels": torch.randint(0, 4, (16,), generator=g)} for _ in range(2)]
    params = {"fc1": model.fc1.weight, "fc1.bias": model.fc1.bias, "fc2": model.fc2.weight}
    return model, params, batches


def tiny_llama(attn: str = "eager", hidden: int = 16, layers: int = 1, heads: int = 2, inter: int = 32,
               vocab: int = 32, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def llama_setup():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 32, (2, 8), generator=g)} for _ in range(2)]
    layer = model.model.layers[0]
    params = {"q_proj": layer.self_attn.q_proj.weight, "v_proj": layer.self_attn.v_proj.weight,
              "down_proj": layer.mlp.down_proj.weight, "up_proj": layer.mlp.up_proj.weight}
    return model, params, batches


def exact_traces(model, params, batches, objective, which) -> dict[str, float]:
    """Exact Tr(H_ll) = Σ_i e_iᵀ H e_i, averaged over the batches (the estimator cycles through them)."""
    obj = get_objective(objective)
    plist = list(params.values())
    out = {n: 0.0 for n in which}
    for batch in batches:
        with torch.no_grad():
            ref = obj.prepare(model, batch)
        with math_attention():
            loss = obj.loss(model, batch, ref)
            gs = dict(zip(params, torch.autograd.grad(loss, plist, create_graph=True)))
            for n in which:
                gf = gs[n].reshape(-1)
                for i in range(gf.numel()):
                    out[n] += float(torch.autograd.grad(gf[i], params[n], retain_graph=True)[0].reshape(-1)[i])
    return {n: v / len(batches) for n, v in out.items()}


CASES = {"mlp-labels": (mlp_setup, "labels", ["fc1", "fc1.bias", "fc2"]),
         "llama-self-kl": (llama_setup, "self-kl", ["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    setup, objective, which = CASES[request.param]
    model, params, batches = setup()
    return model, params, batches, objective, exact_traces(model, params, batches, objective, which)


def test_estimate_brackets_exact_trace(case):
    model, params, batches, objective, exact = case
    tr = hutchinson_traces(model, params, batches, objective, target_rel_se=0.0, min_probes=200, max_probes=200,
                           seed=0)
    for n, t in exact.items():
        est = tr[n]
        assert est.probes == 200 and len(est.samples) == 200 and est.n_params == params[n].numel()
        assert abs(est.mean - t) <= 3 * est.stderr, (n, est.mean, est.stderr, t)


def test_interval_coverage_over_seeds(case):
    """Across 20 seeds, ≥ 85% of the ±1.96·s.e. intervals contain the exact trace."""
    model, params, batches, objective, exact = case
    hits = total = 0
    for seed in range(20):
        tr = hutchinson_traces(model, params, batches, objective, target_rel_se=0.0, min_probes=24,
                               max_probes=24, seed=seed)
        for n, t in exact.items():
            hits += abs(tr[n].mean - t) <= 1.96 * tr[n].stderr
            total += 1
    assert hits >= 0.85 * total, f"{hits}/{total}"


def test_self_kl_hessian_is_psd_and_traces_nonnegative():
    """At the own point self-KL's Hessian is Gauss-Newton: PSD, so layer traces and vᵀHv are ≥ 0."""
    model, params, batches = mlp_setup()
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    batch = {"x": batches[0]["x"]}
    obj = get_objective("self-kl")
    with torch.no_grad():
        ref = obj.prepare(model, batch)

    def f(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return obj.loss(lambda **kw: torch.func.functional_call(model, ps, kwargs=kw), batch, ref)

    assert float(f(flat0)) == pytest.approx(0.0, abs=1e-12)
    H = torch.autograd.functional.hessian(f, flat0)
    assert torch.allclose(H, H.T, atol=1e-10)
    assert float(torch.linalg.eigvalsh(H).min()) >= -1e-6
    exact = exact_traces(model, params, [batch], "self-kl", list(params))
    assert min(exact.values()) > 0  # diagonal blocks of a PSD matrix
    tr = hutchinson_traces(model, params, [batch], "self-kl", min_probes=16, max_probes=16)
    # per-layer samples carry cross-layer terms v_lᵀH_lm v_m (zero mean, any sign); their sum is vᵀHv ≥ 0
    per_probe = [sum(t.samples[k] for t in tr.values()) for k in range(16)]
    assert min(per_probe) >= -1e-10 and all(t.mean > 0 for t in tr.values())


def test_stopping_rule_and_progress():
    model, params, batches = mlp_setup()
    calls = []
    loose = hutchinson_traces(model, params, batches, "labels", target_rel_se=0.5, min_probes=4, max_probes=64,
                              progress=lambda d, m, w: calls.append((d, m, w)))
    probes = {t.probes for t in loose.values()}
    assert len(probes) == 1 and 4 <= probes.pop() < 64
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1)) and all(c[1] == 64 for c in calls)
    assert calls[-1][2] <= 0.5
    tight = hutchinson_traces(model, params, batches, "labels", target_rel_se=1e-6, min_probes=2, max_probes=10)
    assert all(t.probes == 10 for t in tight.values())
    timed = hutchinson_traces(model, params, batches, "labels", target_rel_se=0.0, max_probes=1000, max_seconds=0.0)
    assert all(t.probes == 2 for t in timed.values())


def test_deterministic_and_restores_state():
    model, params, batches = mlp_setup()
    model.train()
    model.fc2.bias.requires_grad_(True)
    model.fc1.weight.requires_grad_(False)
    a = hutchinson_traces(model, params, batches, "labels", min_probes=8, max_probes=8, seed=3)
    b = hutchinson_traces(model, params, batches, "labels", min_probes=8, max_probes=8, seed=3)
    c = hutchinson_traces(model, params, batches, "labels", min_probes=8, max_probes=8, seed=4)
    assert {n: t.mean for n, t in a.items()} == {n: t.mean for n, t in b.items()}
    assert a["fc1"].samples != c["fc1"].samples
    assert model.training and model.fc2.bias.requires_grad and not model.fc1.weight.requires_grad


def test_sdpa_attention_matches_eager():
    """Default SDPA attention has no CPU double backward; the estimate runs in the math backend."""
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)}]
    res = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llama(attn, hidden=32, layers=2, heads=4, inter=64, vocab=64, dtype=torch.float32)
        params = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
        res[attn] = hutchinson_traces(model, params, batches, "self-kl", min_probes=3, max_probes=3, seed=7)
    for n, t in res["eager"].items():
        assert res["sdpa"][n].mean == pytest.approx(t.mean, rel=1e-4), n


def test_ggn_product_gives_the_same_estimate():
    model, params, batches = llama_setup()
    for objective in ("self-kl", "output-mse"):
        a = hutchinson_traces(model, params, batches, objective, min_probes=3, max_probes=3)
        b = hutchinson_traces(model, params, batches, objective, min_probes=3, max_probes=3, hvp="ggn")
        for n in params:
            assert b[n].samples == pytest.approx(a[n].samples, rel=1e-5), (objective, n)


def test_objectives():
    """labels = HF's own shifted loss; self-kl and output-mse ignore masked positions and vanish at θ_ref."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (2, 8), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    hf = model(input_ids=ids, labels=labels).loss
    ours = get_objective("labels").loss(model, {"input_ids": ids, "labels": labels}, None)
    assert float(ours.detach()) == pytest.approx(float(hf.detach()), rel=1e-6)  # HF computes its loss in float32
    assert model_logits(model, {"input_ids": ids, "labels": labels}).shape == (2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, 5:] = 0
    padded = ids.clone()
    padded[:, 5:] = 7
    for name in ("self-kl", "output-mse"):
        obj = get_objective(name)
        with torch.no_grad():
            ref_full = obj.prepare(model, {"input_ids": padded, "attention_mask": mask})
            ref_cut = obj.prepare(model, {"input_ids": ids[:, :5]})
            assert float(obj.loss(model, {"input_ids": ids[:, :5]}, ref_cut)) == pytest.approx(0.0, abs=1e-12)
            model.model.layers[0].mlp.up_proj.weight.add_(0.3)
            full = obj.loss(model, {"input_ids": padded, "attention_mask": mask}, ref_full)
            cut = obj.loss(model, {"input_ids": ids[:, :5]}, ref_cut)
            model.model.layers[0].mlp.up_proj.weight.sub_(0.3)
        # rel 1e-6: transformers 5.24 builds the padding mask in float32 even for a float64 model (4e-8 here);
        # a masked position that leaked into the loss would change it by O(1)
        assert float(full) > 0 and float(full) == pytest.approx(float(cut), rel=1e-6), name
    with pytest.raises(ValueError):
        get_objective("nope")


def test_major_layers_fall_back_to_the_largest_half_when_none_holds_one_percent():
    from hawqtool.sensitivity.hutchinson import major_layers

    sizes = {f"l{i}": 100 + i for i in range(200)}  # each < 1% of the total
    major, rule = major_layers(sizes, 0.01)
    assert "half" in rule and sum(sizes[n] for n in major) >= sum(sizes.values()) / 2
    assert min(sizes[n] for n in major) >= max(sizes[n] for n in sizes if n not in major)
    big = {"a": 1000, "b": 5, "c": 5}
    assert major_layers(big, 0.01) == (["a"], "layers holding ≥ 1% of the parameters")


def test_convergence_error_judges_near_zero_traces_against_the_typical_size():
    from hawqtool.sensitivity.hutchinson import convergence_error

    assert convergence_error(10.0, 1.0, 0.5) == pytest.approx(0.1)  # ordinary relative s.e.
    assert convergence_error(0.01, 1.0, 20.0) == pytest.approx(0.05)  # tiny trace: judged against the floor
    assert convergence_error(0.0, 0.0, 0.0) == 0.0


def test_stop_info_names_the_reason_and_the_unconverged():
    from hawqtool.sensitivity.hutchinson import adaptive_probes

    params = {"big": torch.zeros(1000), "noisy": torch.zeros(1000)}
    vals = iter([(1.0 + 0.001 * (k % 2), 5.0 * (-1) ** k) for k in range(100)])
    info: dict = {}
    adaptive_probes(params, lambda k: list(next(vals)), target_rel_se=0.1, min_probes=4, max_probes=6,
                    max_seconds=None, major_fraction=0.01, progress=None, info=info)
    assert info["stop_reason"] == "max_probes" and info["probes"] == 6
    assert set(info["not_converged"]) == {"noisy"}


def test_interrupted_probes_resume_to_the_uninterrupted_result(tmp_path):
    from hawqtool.sensitivity.hutchinson import ProbeLog

    model, params, batches = mlp_setup()
    kw = dict(objective="labels", min_probes=10, max_probes=10, target_rel_se=1e-9, seed=3)
    full = hutchinson_traces(model, params, batches, **kw)
    log = ProbeLog(tmp_path / "s.json.partial", key="fp")

    def stop_after_4(done, total, worst):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hutchinson_traces(model, params, batches, progress=stop_after_4, resume=log, **kw)
    assert len(log.load(list(params))["fc1"]) == 4
    seen = []
    resumed = hutchinson_traces(model, params, batches, resume=log, progress=lambda d, t, w: seen.append(d), **kw)
    assert seen[0] == 5  # probes 1-4 came from the log
    for n in params:
        assert resumed[n].samples == full[n].samples
    assert ProbeLog(tmp_path / "s.json.partial", key="other").load(list(params)) is None  # other settings: ignored
