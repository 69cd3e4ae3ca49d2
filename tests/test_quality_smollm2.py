"""Quality guards on the real embedded SmolLM2-135M (small settings, ~2-3 minutes), so a change that
makes the quantizer worse cannot land: on the same searched grid GPTQ beats RTN (symmetric and
asymmetric), and a mixed plan beats uniform quantization at equal bytes.

To stay fast the first 10 of the 30 blocks are quantized (70 layers, 3-bit); calibration is 8×256
tokens and the score is perplexity on 4×512 tokens of the validation slice. The full-size figures
are in benchmarks/RESULTS.md (scripts/bench_grid.py, scripts/bench_alloc_signal.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from hawqtool.allocate.plan import allocate_bits, fixed_plan, plan_specs
from hawqtool.data import VALID_FRACTION, calibration_windows, eval_windows
from hawqtool.evaluate import perplexity
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model
from hawqtool.stages import compute_sensitivity, layer_weights

BLOCKS = 10


def _subset(model) -> dict[str, tuple[int, int]]:
    keep = tuple(f"model.layers.{i}." for i in range(BLOCKS))
    return {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items() if n.startswith(keep)}


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)  # real model: both cores (conftest sets one for the tiny ones)
    loaded = load_model(None)
    calib = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=0)
    windows = eval_windows(loaded.tokenizer, "wiki", 512, 4, fraction=VALID_FRACTION)
    state = copy.deepcopy(loaded.model.state_dict())
    yield loaded, calib, windows, state
    torch.set_num_threads(1)


def _ppl(smollm2, specs, method: str) -> float:
    loaded, calib, windows, state = smollm2
    loaded.model.load_state_dict(state)
    quantize_model(loaded.model, specs, calib, QuantizeOptions(method=method))
    ppl = perplexity(loaded.model, windows).ppl
    loaded.model.load_state_dict(state)
    return ppl


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_gptq_beats_rtn_on_the_same_searched_grid(smollm2, symmetric):
    specs = plan_specs(fixed_plan(_subset(smollm2[0].model), 3, symmetric=symmetric))
    rtn, gptq = _ppl(smollm2, specs, "rtn"), _ppl(smollm2, specs, "gptq")
    assert gptq < 0.95 * rtn, (gptq, rtn)


def test_mixed_plan_beats_uniform_at_equal_bytes(smollm2):
    loaded, calib, _, _ = smollm2
    shapes = _subset(loaded.model)
    sens_ids = calibration_windows(loaded.tokenizer, "wiki", 4, 128, seed=1)
    report = compute_sensitivity(loaded, sens_ids, max_probes=8, min_probes=8, qerror_groups=(128,),
                                 first_token_weight=QuantizeOptions().first_token_weight)
    report.layers = [ls for ls in report.layers if ls.name in shapes]
    weights = layer_weights(loaded)
    mixed = allocate_bits(report, lambda: weights, avg_bits=3.0)
    uniform = fixed_plan(shapes, 3)
    assert mixed.total_bytes <= uniform.total_bytes * (1 + 1e-9)
    assert len({lp.bits for lp in mixed.layers}) > 1
    m, u = _ppl(smollm2, plan_specs(mixed), "gptq"), _ppl(smollm2, plan_specs(uniform), "gptq")
    assert m < u, (m, u)
