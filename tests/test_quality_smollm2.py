"""Quality guards on the real embedded SmolLM2-135M (small settings, a few minutes; setup in quality_helpers.py): on
the same searched grid GPTQ beats RTN (symmetric and asymmetric), and a mixed plan is no worse than uniform
quantization at equal bytes beyond the spread of its sensitivity draw. Block tuning's guard is
test_quality_tuning.py (apart, so two pytest workers share the work)."""
from __future__ import annotations

import pytest

from hawqtool.allocate.plan import allocate_bits, fixed_plan, plan_specs
from hawqtool.data import calibration_windows
from hawqtool.quantize.driver import QuantizeOptions
from hawqtool.stages import compute_sensitivity, layer_weights
from quality_helpers import ONLY, ppl_after, subset, uniform_ppl


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_gptq_beats_rtn_on_the_same_searched_grid(smollm2, symmetric):
    rtn, gptq = uniform_ppl(smollm2, symmetric, "rtn"), uniform_ppl(smollm2, symmetric, "gptq")
    assert gptq < 0.95 * rtn, (gptq, rtn)


def test_mixed_plan_holds_against_uniform_at_equal_bytes(smollm2):
    loaded = smollm2[0]
    shapes = subset(loaded.model)
    sens_ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    report = compute_sensitivity(loaded, sens_ids, max_probes=16, min_probes=16, qerror_bits=(2, 3, 4, 8),
                                 qerror_groups=(128,), qerror_sym=(False,), first_token_weight=QuantizeOptions().first_token_weight,
                                 only=ONLY)
    assert {ls.name for ls in report.layers} == set(shapes)
    weights = layer_weights(loaded)
    mixed = allocate_bits(report, lambda: weights, avg_bits=3.0, bit_choices=(2, 3, 4, 8))
    assert mixed.total_bytes <= fixed_plan(shapes, 3).total_bytes * (1 + 1e-9)
    assert len({lp.bits for lp in mixed.layers}) > 1
    m, u = ppl_after(smollm2, plan_specs(mixed), "gptq"), uniform_ppl(smollm2, False, "gptq")
    # At these small settings the plan depends on the sensitivity draw: uniform 23.57, mixed 23.96 with these
    # windows (seed 1), 23.66 with 16 windows, 23.29 with seed 2 (2026-12-07, transformers 5.25). Strictly below
    # uniform on one draw of three, so the guard allows that spread: a broken signal (sensitive layers at 2 bits)
    # costs far more. The full-size comparison over three seeds is in benchmarks/RESULTS.md.
    assert m < 1.03 * u, (m, u)
