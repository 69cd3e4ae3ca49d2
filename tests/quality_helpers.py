"""The real embedded SmolLM2-135M for the quality guards (test_quality_smollm2.py, test_quality_tuning.py), so
a change that makes the quantizer or the plan worse cannot land.

To stay fast only the first blocks are quantized (the blocks after them need not run), on the first `nwin` of the
fixture's 16 × 512 calibration windows, scored by perplexity on 4 × 512 tokens of the validation slice (the
`smollm2` fixture in conftest.py). The full-size figures are in benchmarks/RESULTS.md (scripts/bench_grid.py,
scripts/bench_frontier.py).
"""
from __future__ import annotations

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.evaluate import perplexity
from hawqtool.models import quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model


def only(blocks: int) -> str:
    """A regex for the layers of the first `blocks` blocks (sensitivity's `only`)."""
    return r"^model\.layers\.(" + "|".join(str(i) for i in range(blocks)) + r")\."


def subset(model, blocks: int) -> dict[str, tuple[int, int]]:
    keep = tuple(f"model.layers.{i}." for i in range(blocks))
    return {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items() if n.startswith(keep)}


def ppl_after(smollm2, specs, method: str, *, nwin: int, tune_iters: int = 0) -> float:
    """Perplexity with the layers of `specs` quantized by `method` on the first `nwin` calibration windows (GPTQ
    untuned unless tune_iters: most guards compare quantizers; block tuning's guard tunes)."""
    loaded, calib, windows, state, _ = smollm2
    assert nwin <= len(calib)
    loaded.model.load_state_dict(state)
    quantize_model(loaded.model, specs, calib[:nwin], QuantizeOptions(method=method, tune_iters=tune_iters))
    ppl = perplexity(loaded.model, windows).ppl
    loaded.model.load_state_dict(state)
    return ppl


def uniform_ppl(smollm2, *, blocks: int, bits: int, group_size: int, symmetric: bool, method: str,
                nwin: int) -> float:
    """Perplexity with the first `blocks` blocks at one format (cached: tests of a module share it)."""
    key = (blocks, bits, group_size, symmetric, method, nwin)
    if key not in smollm2[4]:
        plan = fixed_plan(subset(smollm2[0].model, blocks), bits, group_size=group_size, symmetric=symmetric)
        smollm2[4][key] = ppl_after(smollm2, plan_specs(plan), method, nwin=nwin)
    return smollm2[4][key]
