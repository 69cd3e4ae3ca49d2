"""Quality guards on the real embedded SmolLM2-135M (small settings, ~2-3 minutes), so a change that
makes the quantizer worse cannot land: on the same searched grid GPTQ beats RTN (symmetric and
asymmetric), and a mixed plan beats uniform quantization at equal bytes.

To stay fast the first 10 of the 30 blocks are quantized (70 layers, 3-bit; the blocks after them
need not run); calibration is 16×512 tokens and the score is perplexity on 4×512 tokens of the
validation slice. Measured when written: asymmetric RTN 25.50 / GPTQ 23.60, symmetric 26.46 / 24.37
(full precision 19.41). The full-size figures
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
ONLY = r"^model\.layers\.[0-9]\."  # blocks 0-9


def _subset(model) -> dict[str, tuple[int, int]]:
    keep = tuple(f"model.layers.{i}." for i in range(BLOCKS))
    return {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items() if n.startswith(keep)}


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)  # real model: both cores (conftest sets one for the tiny ones)
    loaded = load_model(None)
    calib = calibration_windows(loaded.tokenizer, "wiki", 16, 512, seed=0)
    windows = eval_windows(loaded.tokenizer, "wiki", 512, 4, fraction=VALID_FRACTION)
    state = copy.deepcopy(loaded.model.state_dict())
    yield loaded, calib, windows, state, {}
    torch.set_num_threads(1)


def _ppl(smollm2, specs, method: str, tune_iters: int = 0) -> float:
    """Perplexity of the subset quantized with `method` (GPTQ untuned unless tune_iters: the guards below compare
    quantizers, and block tuning has its own)."""
    loaded, calib, windows, state, _ = smollm2
    loaded.model.load_state_dict(state)
    quantize_model(loaded.model, specs, calib, QuantizeOptions(method=method, tune_iters=tune_iters))
    ppl = perplexity(loaded.model, windows).ppl
    loaded.model.load_state_dict(state)
    return ppl


def _uniform(smollm2, symmetric: bool, method: str) -> float:
    """Perplexity with the subset at uniform 3 bits (cached: the mixed test reuses GPTQ asym)."""
    key = (symmetric, method)
    if key not in smollm2[4]:
        specs = plan_specs(fixed_plan(_subset(smollm2[0].model), 3, symmetric=symmetric))
        smollm2[4][key] = _ppl(smollm2, specs, method)
    return smollm2[4][key]


def test_block_tuning_beats_gptq(smollm2):
    """Block tuning on top of GPTQ must not lose on the real model. Here (10 of 30 blocks, 16 calibration windows,
    10 steps a block, 4 scored windows) measured when written: GPTQ 23.603 -> tuned 23.404; the gain compounds over
    blocks, so the full model gains far more (32.89 -> 27.99 on the validation slice, benchmarks/RESULTS.md)."""
    specs = plan_specs(fixed_plan(_subset(smollm2[0].model), 3))
    tuned, gptq = _ppl(smollm2, specs, "gptq", tune_iters=10), _uniform(smollm2, False, "gptq")
    assert tuned < gptq, (tuned, gptq)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_gptq_beats_rtn_on_the_same_searched_grid(smollm2, symmetric):
    rtn, gptq = _uniform(smollm2, symmetric, "rtn"), _uniform(smollm2, symmetric, "gptq")
    assert gptq < 0.95 * rtn, (gptq, rtn)


def test_mixed_plan_beats_uniform_at_equal_bytes(smollm2):
    loaded = smollm2[0]
    shapes = _subset(loaded.model)
    sens_ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    report = compute_sensitivity(loaded, sens_ids, max_probes=16, min_probes=16, qerror_bits=(2, 3, 4, 8),
                                 qerror_groups=(128,), qerror_sym=(False,), first_token_weight=QuantizeOptions().first_token_weight,
                                 only=ONLY)
    assert {ls.name for ls in report.layers} == set(shapes)
    weights = layer_weights(loaded)
    mixed = allocate_bits(report, lambda: weights, avg_bits=3.0)
    assert mixed.total_bytes <= fixed_plan(shapes, 3).total_bytes * (1 + 1e-9)
    assert len({lp.bits for lp in mixed.layers}) > 1
    m, u = _ppl(smollm2, plan_specs(mixed), "gptq"), _uniform(smollm2, False, "gptq")
    assert m < u, (m, u)
