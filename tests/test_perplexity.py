"""evaluate.perplexity against an independent float64 reference: exp of the mean next-token NLL over every window,
whatever the batch size (the loss is formed window by window to keep its copies small)."""
from __future__ import annotations

import math

import pytest
import torch

from hawqtool.evaluate import perplexity
from hawqtool.models import load_model


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_equals_a_float64_reference(tiny_llama, batch_size):
    model = load_model(str(tiny_llama)).model
    windows = torch.randint(0, 300, (7, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows, use_cache=False).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).sum() / windows[:, 1:].numel()
    res = perplexity(model, windows, batch_size=batch_size)
    assert res.tokens == 7 * 19 and res.windows == 7
    assert res.nll == pytest.approx(float(nll), rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-6)
