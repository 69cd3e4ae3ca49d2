"""Block checkpointing (a memory option) gives the same Hessian products and traces, and says where it cannot run."""
from __future__ import annotations

import pytest
import torch

from hawqtool.errors import UserError
from hawqtool.models import LoadedModel
from hawqtool.sensitivity import get_objective
from hawqtool.sensitivity.hutchinson import autograd_hvp
from hawqtool.sensitivity.memory import checkpointed_blocks
from hawqtool.stages import compute_sensitivity
from test_hutchinson import tiny_llama


def test_checkpointed_blocks_give_the_same_double_backward_product():
    model = tiny_llama(layers=2)
    params = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 32, (2, 8), generator=g), "labels": torch.randint(0, 32, (2, 8), generator=g)}
    vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    for p in params:
        p.requires_grad_(True)
    plain = autograd_hvp(model, params, batch, None, get_objective("labels"), vs)
    forward = model.model.layers[0].forward
    with checkpointed_blocks(model) as n:
        assert n == 2 and model.model.layers[0].forward is not forward and model.config.use_cache is False
        ck = autograd_hvp(model, params, batch, None, get_objective("labels"), vs)
    assert model.model.layers[0].forward == forward  # restored
    for a, b in zip(plain, ck):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compute_sensitivity_with_checkpointing_matches_and_is_recorded():
    model = tiny_llama(layers=1, dtype=torch.float32)
    loaded = LoadedModel(model=model, tokenizer=None, source="tiny", files=[])
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(objective="labels", estimator="hutchinson", min_probes=3, max_probes=3, qerror_bits=(4,))
    a = compute_sensitivity(loaded, ids, **kw)
    b = compute_sensitivity(loaded, ids, checkpoint_blocks=True, **kw)
    assert b.settings["checkpoint_blocks"] is True and "checkpoint_blocks" not in a.settings
    for x, y in zip(a.layers, b.layers):
        assert x.trace == pytest.approx(y.trace, rel=1e-4, abs=1e-6)
    with pytest.raises(UserError, match="--checkpoint-blocks works with"):
        compute_sensitivity(loaded, ids, objective="self-kl", estimator="hutchinson", checkpoint_blocks=True,
                            min_probes=2, max_probes=2)
