"""scripts/bench_gguf.py's pure helpers (no llama.cpp needed): size accounting on a tiny GGUF, log parsing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gguf.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gguf", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_gguf(path: Path) -> None:
    """token_embd F32 16×64, blk.0.attn_q Q8_0 64×64, blk.0.ffn_down F16 64×64, blk.0.attn_norm F32 64."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", quantize(rng.standard_normal((64, 64)).astype(np.float32), T.Q8_0),
                 raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bits_per_linear_weight_counts_only_linear_weights(tmp_path):
    bg = _load()
    p = tmp_path / "tiny.gguf"
    _tiny_gguf(p)
    s = bg.gguf_stats(p)
    assert s["linear_params"] == 2 * 64 * 64
    assert s["linear_bytes"] == 64 * 64 // 32 * 34 + 64 * 64 * 2  # Q8_0: 34 bytes per 32 weights; F16: 2 bytes
    assert bg.bits_per_linear_weight(s) == pytest.approx((8.5 + 16) / 2)
    assert s["params"] == 16 * 64 + 2 * 64 * 64 + 64
    assert bg.file_bits_per_param(s) == pytest.approx(8 * p.stat().st_size / s["params"])
    assert s["linear_types"] == {"Q8_0": 1, "F16": 1}
    assert bg.types_str(s) == "F16×1 Q8_0×1; embd F32"


def test_parsers():
    bg = _load()
    log = ("perplexity: calculating perplexity over 40 chunks, n_ctx=512, batch_size=512, n_seq=1\n[1]20.1,[2]21.3,\n"
           "Final estimate: PPL = 21.8543 +/- 0.51234\n")
    assert bg.parse_ppl(log) == (21.8543, 0.51234, 40)
    with pytest.raises(RuntimeError):
        bg.parse_ppl("main: error: failed to load model\n")
    rows = [{"n_prompt": 128, "n_gen": 0, "avg_ts": 735.5}, {"n_prompt": 0, "n_gen": 32, "avg_ts": 146.25}]
    assert bg.parse_bench(json.dumps(rows)) == (735.5, 146.25)
    assert bg.speed_str([3.0, 1.0, 2.0]) == "2.0 (1.0–3.0)" and bg.speed_str([5.0]) == "5.0"


def test_missing_tool_exits_1_with_one_line(tmp_path, capsys):
    bg = _load()
    with pytest.raises(SystemExit) as e:
        bg.find_tools(tmp_path)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-quantize" in err and "cmake" in err
