"""The Gauss-Newton product equals the true Hessian-vector product of self-KL / output-MSE
at the model's own point (independent reference: double backward through the loss)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hawqtool.sensitivity.ggn import ggn_vector_product, math_attention


def tiny(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval().double()


def double_backward_hvp(model, params, batch, v, objective):
    with torch.no_grad():
        z0 = model(**batch).logits
    with math_attention():
        z = model(**batch).logits
        if objective == "self-kl":
            ref = torch.log_softmax(z0, -1)
            loss = (ref.exp() * (ref - torch.log_softmax(z, -1))).sum(-1).mean()
        else:
            loss = 0.5 * (z - z0).pow(2).sum(-1).mean()
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, params)), list(params.values()))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("objective", ["self-kl", "output-mse"])
def test_ggn_product_equals_hessian_vector_product(attn, objective):
    model = tiny(attn)
    params = {f"{n}.weight": m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    g = torch.Generator().manual_seed(3)
    v = {n: (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).double() for n, p in params.items()}
    batch = {"input_ids": torch.randint(0, 64, (2, 10), generator=g)}
    Hv = ggn_vector_product(model, params, batch, v, objective)
    ref = double_backward_hvp(model, params, batch, v, objective)
    for (name, a), b in zip(Hv.items(), ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7 * b.abs().max()), name


def test_ggn_is_positive_semidefinite():
    """vᵀHv ≥ 0 summed over all layers for any v (Gauss-Newton of a convex output loss)."""
    model = tiny("eager")
    params = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and "lm_head" not in n}
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        Hv = ggn_vector_product(model, params, batch, v)
        assert sum(float((Hv[n] * v[n]).sum()) for n in params) >= -1e-10
