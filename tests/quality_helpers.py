"""The real embedded SmolLM2-135M for the quality guards (test_quality_smollm2.py, test_quality_tuning.py), so
a change that makes the quantizer worse cannot land.

To stay fast the first 10 of the 30 blocks are quantized (70 layers, 3-bit; the blocks after them need not run);
calibration is 16×512 tokens and the score is perplexity on 4×512 tokens of the validation slice (the `smollm2`
fixture in conftest.py). Measured when written: asymmetric RTN 25.50 / GPTQ 23.60, symmetric 26.46 / 24.37 (full
precision 19.41). The full-size figures are in benchmarks/RESULTS.md (scripts/bench_grid.py,
scripts/bench_alloc_signal.py).
"""
from __future__ import annotations

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.evaluate import perplexity
from hawqtool.models import quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model

BLOCKS = 10
ONLY = r"^model\.layers\.[0-9]\."  # blocks 0-9


def subset(model) -> dict[str, tuple[int, int]]:
    keep = tuple(f"model.layers.{i}." for i in range(BLOCKS))
    return {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items() if n.startswith(keep)}


def ppl_after(smollm2, specs, method: str, tune_iters: int = 0) -> float:
    """Perplexity of the subset quantized with `method` (GPTQ untuned unless tune_iters: most guards compare
    quantizers; block tuning's guard tunes)."""
    loaded, calib, windows, state, _ = smollm2
    loaded.model.load_state_dict(state)
    quantize_model(loaded.model, specs, calib, QuantizeOptions(method=method, tune_iters=tune_iters))
    ppl = perplexity(loaded.model, windows).ppl
    loaded.model.load_state_dict(state)
    return ppl


def uniform_ppl(smollm2, symmetric: bool, method: str) -> float:
    """Perplexity with the subset at uniform 3 bits (cached: the mixed test reuses GPTQ asym)."""
    key = (symmetric, method)
    if key not in smollm2[4]:
        specs = plan_specs(fixed_plan(subset(smollm2[0].model), 3, symmetric=symmetric))
        smollm2[4][key] = ppl_after(smollm2, specs, method)
    return smollm2[4][key]
