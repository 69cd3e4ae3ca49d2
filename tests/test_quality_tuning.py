"""Block tuning's quality guard on the real embedded SmolLM2-135M (setup in quality_helpers.py)."""
from __future__ import annotations

from hawqtool.allocate.plan import fixed_plan, plan_specs
from quality_helpers import ppl_after, subset, uniform_ppl

BLOCKS, NWIN = 10, 16


def test_block_tuning_beats_gptq(smollm2):
    """Block tuning on top of GPTQ must not lose on the real model. Here (10 of 30 blocks at 3-bit g128, 16
    calibration windows, 10 steps a block, 4 scored windows) measured 2026-12-08: GPTQ 23.829 -> tuned 23.498; 5 steps
    a block kept GPTQ's weights (23.829), and over 6 blocks and 8 windows at 2-bit g32 10 steps did not gain (29.90
    against 29.85), so this guard keeps its own, costlier setting. The gain compounds over blocks: the full model
    gains far more (32.89 -> 27.99 on the validation slice, benchmarks/RESULTS.md)."""
    specs = plan_specs(fixed_plan(subset(smollm2[0].model, BLOCKS), 3))
    tuned = ppl_after(smollm2, specs, "gptq", nwin=NWIN, tune_iters=10)
    gptq = uniform_ppl(smollm2, blocks=BLOCKS, bits=3, group_size=128, symmetric=False, method="gptq", nwin=NWIN)
    assert tuned < gptq, (tuned, gptq)
