"""scripts/bench_peers.py without AutoRound or a model: config parsing, bits accounting, the dequantization
check, and the one-line skip when auto_round cannot be imported."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"

# SmolLM2-135M's decoder Linear shapes, one block (hidden 576, 3 KV heads of 64, MLP 1536) × 30
SMOL_BLOCK = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
              "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
SMOL = {f"{b}.{n}": s for b in range(30) for n, s in SMOL_BLOCK.items()}


def _load():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_parse_config():
    bp = _load()
    c = bp.parse_config("ar:3:128:sym:iters=0")
    assert (c.bits, c.group, c.sym, c.iters, c.rtn, c.fp32) == (3, 128, True, 0, False, False)
    assert bp.parse_config("ar:4:128:asym").iters == bp.DEFAULT_ITERS == 200
    r = bp.parse_config("ar:3:128:sym:rtn:fp32")
    assert (r.rtn, r.iters, r.fp32, r.text) == (True, 0, True, "ar:3:128:sym:rtn:fp32")
    assert bp.parse_config("ar:2:-1:asym:iters=20").group == -1
    assert [c.text for c in bp.parse_configs("ar:3:128:sym:iters=0, ar:4:128:sym:iters=0")] == \
        ["ar:3:128:sym:iters=0", "ar:4:128:sym:iters=0"]
    for bad in ("hawq:3:128:sym", "ar:3:128", "ar:x:128:sym", "ar:3:128:symm", "ar:3:0:sym", "ar:9:128:sym",
                "ar:3:128:sym:iter=5", "ar:3:128:sym:iters=-1", "ar:3:128:sym:rtn:iters=5"):
        with pytest.raises(ValueError):
            bp.parse_config(bad)
    with pytest.raises(ValueError):
        bp.parse_configs(" , ")
    assert bp.parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError):
        bp.parse_seeds("0,a")


def test_bits_per_linear_weight_as_hawqtool_counts():
    bp = _load()
    assert bp.bits_per_linear_weight({"a": (64, 256)}, 3, 128, True) == pytest.approx(3 + 16 / 128)
    assert bp.bits_per_linear_weight({"a": (64, 256)}, 3, 128, False) == pytest.approx(3 + 19 / 128)
    assert bp.bits_per_linear_weight({"a": (64, 256)}, 4, -1, True) == pytest.approx(4 + 16 / 256)
    # 576-wide rows hold ceil(576/128) = 5 groups: 3.135 (sym) / 3.161 (asym, hawqtool's RESULTS) on SmolLM2
    assert bp.bits_per_linear_weight(SMOL, 3, 128, True) == pytest.approx(3 + 16 * 29952 / 3538944)
    assert round(bp.bits_per_linear_weight(SMOL, 3, 128, True), 3) == 3.135
    assert round(bp.bits_per_linear_weight(SMOL, 3, 128, False), 3) == 3.161
    # a layer AutoRound left unquantized counts as fp16
    assert bp.bits_per_linear_weight({"a": (64, 256), "b": (64, 256)}, 4, 128, True, frozenset({"b"})) == \
        pytest.approx((4 + 16 / 128 + 16) / 2)
    scale = torch.ones(576, 5)
    assert bp.autoround_storage_bits((576, 576), 3, scale, 4) == bp.layer_storage_bits((576, 576), 3, 128, True)
    assert bp.autoround_storage_bits((576, 576), 3, scale, torch.ones(576, 5)) == \
        bp.layer_storage_bits((576, 576), 3, 128, False)


@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_recovers_codes_and_checks(sym):
    bp = _load()
    g = torch.Generator().manual_seed(0)
    out, inf, group, bits = 8, 200, 64, 3  # 200 = 3 full groups + a padded one, as 576 with g128
    ng = 4
    q = torch.randint(0, 2**bits, (out, ng * group), generator=g).float()
    scale = (torch.rand(out, ng, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    zp = 4 if sym else torch.randint(0, 2**bits, (out, ng), generator=g).float()
    z = torch.tensor(float(zp)) if sym else zp.reshape(out, ng, 1)
    w = (scale.float().reshape(out, ng, 1) * (q.view(out, ng, group) - z)).reshape(out, -1)[:, :inf]
    deq = bp.dequantize(w.to(torch.bfloat16), scale, zp, bits, group)
    assert deq.dtype == torch.float32 and deq.shape == (out, inf)
    assert torch.allclose(deq, w, rtol=2**-7, atol=1e-7)
    with pytest.raises(AssertionError):
        bp.dequantize(w + 0.3 * scale.float().repeat_interleave(group, 1)[:, :inf], scale, zp, bits, group)


def test_skips_in_one_line_without_auto_round(tmp_path):
    stub = tmp_path / "auto_round"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('auto_round made unimportable by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run([sys.executable, str(SCRIPT), "--configs", "ar:3:128:sym:iters=0"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == [_load().SKIP_MESSAGE]
    assert p.stdout.strip() == ("auto-round is not installed (pip install auto-round==0.16.1 --no-deps after "
                                "torch): AutoRound rows skipped")


def test_bad_configs_exit_1_in_one_line():
    p = subprocess.run([sys.executable, str(SCRIPT), "--configs", "ar:3:128:symm"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "symm" in p.stderr
