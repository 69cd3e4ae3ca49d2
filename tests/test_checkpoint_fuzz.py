"""Fuzz the checkpoint reader: 10,000 seeded mutated or truncated checkpoints give a model or a clean
UserError, never another exception.

Half the mutations re-seal the manifest's sha256 entries, so they get past the checksum and reach
the manifest/shape/dtype validation behind it (a consistent but hostile file, not just a damaged one).
Mutations of the manifest's `files` list (entries dropped, invented, renamed, mis-hashed, pointing
outside) and symlinks inside the checkpoint (in place of a listed file with the same bytes, or extra,
pointing outside or inside) must always be refused: the reader opens only listed, verified files.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from hawqtool.checkpoint import MANIFEST, WEIGHTS, save_checkpoint, sha256_file
from hawqtool.errors import UserError
from hawqtool.quantize.quantizer import QuantSpec, rtn
from hawqtool.runtime import load_quantized

N_MUTATIONS = 10_000
ODD_VALUES = [-1, 0, 1, 2, 3, 9, 16, 2 ** 40, "4", None, True, 3.5, [], {}, "model.layers.0"]
SPECS = [QuantSpec(2, 16, False), QuantSpec(3, 8, True), QuantSpec(4, -1, False), QuantSpec(8, 16, True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_text) -> Path:
    """A tiny mixed 2/3/4/8-bit checkpoint, symmetric and asymmetric layers, one act-order, one W8A8."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz")
    src = make_tiny_llama(root / "model", corpus_text, hidden=16, layers=1)
    model = AutoModelForCausalLM.from_pretrained(src)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    weights, info = {}, {}
    for i, n in enumerate(names):
        W = model.get_submodule(n).weight.data
        weights[n] = rtn(W, SPECS[i % 4])
        if i == 0:  # an act-order layer: a shuffled column -> group map (structure only; values are not GPTQ's)
            gw = SPECS[0].group_width(W.shape[1])
            weights[n] = replace(weights[n], g_idx=(torch.arange(W.shape[1]) // gw)[torch.randperm(W.shape[1])]
                                 .to(torch.int32))
        info[n] = {"act_bits": 8 if i == 3 else 16}
    return save_checkpoint(root / "ckpt", model, weights, layer_info=info, extra={})


def _reseal(d: Path) -> None:
    mf = json.loads((d / MANIFEST).read_text())
    mf["files"] = {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != MANIFEST}
    (d / MANIFEST).write_text(json.dumps(mf))


def _mutate_files_list(mf: dict, rng: random.Random) -> dict:
    """One change to the manifest's `files` list; every one leaves a file unverified or unlisted."""
    files = mf["files"]
    name = rng.choice(sorted(files))
    kind = rng.randrange(6)
    if kind == 0:
        del files[name]  # the file stays in the folder, unlisted
    elif kind == 1:
        files[rng.choice(["extra.bin", "tokenizer.model", "vocab.json"])] = "0" * 64  # listed, absent
    elif kind == 2:
        files[rng.choice(["../" + name, "/etc/passwd", "sub/" + name, "", ".", ".."])] = files.pop(name)
    elif kind == 3:
        files[name] = rng.choice(["", "0" * 64, files[name][::-1], files[name].upper()[:-1] + "0"])
    elif kind == 4:
        files[name + rng.choice([".bak", " ", "/"])] = files.pop(name)
    else:
        mf["files"] = rng.choice([[name], {name: 1}, {name: None}, {}, None, "model.safetensors"])
    return mf


def _add_symlink(work: Path, outside: Path, rng: random.Random) -> None:
    """A symlink inside the checkpoint: in place of a listed file (same bytes), or extra, to a file
    outside (a secret) or inside."""
    listed = sorted(p.name for p in work.iterdir() if p.name != MANIFEST)
    kind = rng.randrange(3)
    if kind == 0:
        name = rng.choice(listed)
        copy = outside / f"copy-{name}"
        copy.write_bytes((work / name).read_bytes())
        (work / name).unlink()
        (work / name).symlink_to(copy)  # same bytes: the sha256 matches
    elif kind == 1:
        (work / rng.choice(["id_rsa", "tokenizer.json.link", "extra"])).symlink_to(outside / "secret")
    else:
        (work / "weights.link").symlink_to(work / rng.choice(listed))


def _mutate_bytes(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    kind = rng.random()
    if kind < 0.3:  # truncate
        return bytes(b[:rng.randrange(len(b))])
    if kind < 0.4:  # append junk
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    hot = min(len(b), 2048) if rng.random() < 0.7 else len(b)  # safetensors header / JSON head first
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(hot)
        b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


def _mutate_manifest(mf: dict, rng: random.Random) -> dict:
    layers = mf["layers"]
    name = rng.choice(sorted(layers))
    kind = rng.randrange(6)
    if kind == 0:
        layers[name][rng.choice(sorted(layers[name]))] = rng.choice(ODD_VALUES)
    elif kind == 1:
        del layers[name][rng.choice(sorted(layers[name]))]
    elif kind == 2:
        layers[rng.choice(["model.nope", "", "model.layers.0", "model.embed_tokens", "lm_head", name + ".x"])] = \
            layers.pop(name)
    elif kind == 3:
        layers[name] = rng.choice(ODD_VALUES)
    elif kind == 4:
        mf[rng.choice(["tied", "layers", "files", "schema_version"])] = rng.choice(ODD_VALUES)
    else:
        for key in ("in_features", "out_features", "bits", "group_size"):
            if rng.random() < 0.5 and isinstance(layers[name].get(key), int):
                layers[name][key] = layers[name][key] * rng.choice([2, -1]) + rng.choice([0, 1])
    return mf


def test_ten_thousand_mutated_checkpoints_give_a_model_or_a_clean_error(checkpoint, tmp_path):
    rng = random.Random(1234)
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    work = tmp_path / "ckpt"
    outcomes = {"loaded": 0, "rejected": 0}
    x = torch.tensor([[1, 2, 3]])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("PRIVATE KEY")
    for i in range(N_MUTATIONS):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for name, blob in files.items():
            (work / name).write_bytes(blob)
        target = rng.choice([WEIGHTS, WEIGHTS, MANIFEST, MANIFEST, "config.json", "files", "symlink"])
        structured = target == MANIFEST and rng.random() < 0.6
        if target == "files":
            (work / MANIFEST).write_text(json.dumps(_mutate_files_list(json.loads(files[MANIFEST]), rng)))
        elif target == "symlink":
            _add_symlink(work, outside, rng)
            if rng.random() < 0.5:
                _reseal(work)  # the link listed with its target's sha256: still refused
        elif structured:
            mf = _mutate_manifest(json.loads(files[MANIFEST]), rng)
            (work / MANIFEST).write_text(json.dumps(mf))
        else:
            (work / target).write_bytes(_mutate_bytes(files[target], rng))
        if target == WEIGHTS and rng.random() < 0.6:
            _reseal(work)  # consistent checksums: only the reader's own validation can catch it
        try:
            model = load_quantized(work)
            with torch.no_grad():
                model(x)
            outcomes["loaded"] += 1
            assert target not in ("files", "symlink"), f"mutation {i} of the {target} loaded: it must be refused"
        except UserError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "Traceback" not in msg, (i, target, msg)
            outcomes["rejected"] += 1
            outcomes[target] = outcomes.get(target, 0) + 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} of {target} (structured={structured}) raised {type(e).__name__}: {e}")
    assert outcomes["rejected"] > N_MUTATIONS // 2, outcomes  # most mutations must be caught, not silently used
    assert outcomes["loaded"] > 0, outcomes  # data bytes changed under a valid header still load
    assert outcomes["files"] > N_MUTATIONS // 10 and outcomes["symlink"] > N_MUTATIONS // 10, outcomes


def test_unmutated_fixture_loads(checkpoint):
    model = load_quantized(checkpoint)
    assert model(torch.tensor([[1, 2]])).logits.shape[-1] > 0
