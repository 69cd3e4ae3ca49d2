"""Quality guards on the real embedded SmolLM2-135M (small settings, setup in quality_helpers.py): on the same
searched grid GPTQ beats RTN (asymmetric and symmetric), and a mixed plan beats uniform quantization at equal
bytes. Block tuning's guard is test_quality_tuning.py (apart, so two pytest workers share the work).

Settings: the first 6 of the 30 blocks (42 layers), 8 × 512 calibration tokens (symmetric GPTQ/RTN: below). The mixed guard compares at the
bytes of uniform 2-bit g32, where a plan has room to trade: every layer may take 2, 3 or 4 bits in groups of 32 or
128, and the budget is met by putting the insensitive ones in the coarser groups."""
from __future__ import annotations

import pytest

from hawqtool.allocate.plan import allocate_bits, fixed_plan, plan_specs
from hawqtool.data import calibration_windows
from hawqtool.quantize.driver import QuantizeOptions
from hawqtool.stages import compute_sensitivity, layer_weights
from quality_helpers import only, ppl_after, subset, uniform_ppl

BLOCKS, NWIN = 6, 8
UNIFORM = dict(bits=2, group_size=32)  # the mixed guard's reference, and the asymmetric GPTQ/RTN grid


# (symmetric, blocks, calibration windows, format, GPTQ below this fraction of RTN). Symmetric at 3-bit g128 over
# 10 blocks and 16 windows: symmetric 2-bit RTN is degenerate (818), and over 6 blocks and 8 windows GPTQ's lead
# at 3-bit g128 is 4.4% (24.00 -> 22.94), too close to its threshold.
GRIDS = [(False, BLOCKS, NWIN, UNIFORM, 0.9), (True, 10, 16, dict(bits=3, group_size=128), 0.95)]


@pytest.mark.parametrize("symmetric,blocks,nwin,fmt,ratio", GRIDS, ids=["asym-2g32", "sym-3g128"])
def test_gptq_beats_rtn_on_the_same_searched_grid(smollm2, symmetric, blocks, nwin, fmt, ratio):
    """Measured when written (2026-12-08): asymmetric 2-bit g32 over 6 blocks RTN 38.45 / GPTQ 29.85; symmetric
    3-bit g128 over 10 blocks RTN 26.47 / GPTQ 24.31 (full precision 19.41)."""
    rtn, gptq = (uniform_ppl(smollm2, blocks=blocks, symmetric=symmetric, method=m, nwin=nwin, **fmt)
                 for m in ("rtn", "gptq"))
    assert gptq < ratio * rtn, (gptq, rtn)


def test_mixed_plan_beats_uniform_at_equal_bytes(smollm2):
    """Measured when written (2026-12-08; the draws differ in the sensitivity windows' seed): uniform 29.85, mixed
    26.06 (seed 1, the one used here), 25.98 (seed 2), 26.06 (seed 3): 12.7-13.0% below. The full-size comparison over three seeds is in benchmarks/RESULTS.md."""
    loaded = smollm2[0]
    shapes = subset(loaded.model, BLOCKS)
    sens_ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    report = compute_sensitivity(loaded, sens_ids, max_probes=8, min_probes=8, qerror_bits=(2, 3, 4),
                                 qerror_groups=(32, 128), qerror_sym=(False,),
                                 first_token_weight=QuantizeOptions().first_token_weight, only=only(BLOCKS))
    assert {ls.name for ls in report.layers} == set(shapes)
    weights = layer_weights(loaded)
    budget = fixed_plan(shapes, **UNIFORM).total_bytes
    mixed = allocate_bits(report, lambda: weights, max_bytes=budget, bit_choices=(2, 3, 4), group_sizes=(32, 128))
    assert mixed.total_bytes <= budget * (1 + 1e-9)
    assert len({(lp.bits, lp.group_size) for lp in mixed.layers}) > 2
    m = ppl_after(smollm2, plan_specs(mixed), "gptq", nwin=NWIN)
    u = uniform_ppl(smollm2, blocks=BLOCKS, symmetric=False, method="gptq", nwin=NWIN, **UNIFORM)
    assert m < u, (m, u)
