"""Same inputs, same options: the same bytes. Two `hawqtool quantize` processes give checkpoints whose
every file has the same sha256; so does a run interrupted and resumed from CK.partial. The resume
state is verified: a flipped byte, a truncated file or an edited record is never used (the blocks are
recomputed and the user is told), and the result still equals the uninterrupted checkpoint."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_e2e import SMALL, invoke, one_line_error

from hawqtool.checkpoint import sha256_file
from hawqtool.quantize.resume_state import BlockState
from hawqtool.tensorfile import save_tensors


def digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama) -> Path:
    from hawqtool import artifacts
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import load_model, quantizable_layers, weight_matrix

    model = load_model(str(tiny_llama)).model
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    artifacts.save(fixed_plan(shapes, 3), path)
    return path


def argv(tiny_llama, plan, text_file, out, *extra) -> list[str]:
    return ["quantize", str(tiny_llama), "--plan", str(plan), "--calib", str(text_file), "-o", str(out), *SMALL, "-q",
            *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, plan, text_file) -> dict[str, str]:
    """sha256 of every file of an uninterrupted GPTQ checkpoint, written by its own process."""
    out = tmp_path_factory.mktemp("ref") / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "hawqtool", *argv(tiny_llama, plan, text_file, out)], check=True, env=env,
                   timeout=600)
    return digests(out)


def test_two_processes_write_byte_identical_checkpoints(tmp_path, tiny_llama, plan, text_file, reference):
    out = tmp_path / "again"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random"}
    subprocess.run([sys.executable, "-m", "hawqtool", *argv(tiny_llama, plan, text_file, out)], check=True, env=env,
                   timeout=600)
    assert digests(out) == reference
    assert {"model.safetensors", "config.json", "hawqtool_manifest.json", "tokenizer.json"} <= set(reference)


def test_safetensors_metadata_order_does_not_change_the_bytes(tmp_path):
    from safetensors import safe_open

    t = {"b": torch.arange(5, dtype=torch.int32), "a": torch.ones(3, 2)}
    save_tensors(t, tmp_path / "x.safetensors", metadata={"format": "hawqtool", "zero_point": "z", "m": "1"})
    save_tensors(t, tmp_path / "y.safetensors", metadata={"m": "1", "zero_point": "z", "format": "hawqtool"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "hawqtool", "zero_point": "z", "m": "1"}
        assert torch.equal(f.get_tensor("b"), t["b"]) and torch.equal(f.get_tensor("a"), t["a"])


def interrupt_after_block_zero(tiny_llama, plan, text_file, out, monkeypatch, *extra) -> Path:
    """Run quantize in this process and Ctrl-C it right after block 0 is committed; returns CK.partial."""
    save = BlockState.save

    def save_then_interrupt(self, i, *a, **kw):
        save(self, i, *a, **kw)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(BlockState, "save", save_then_interrupt)
        assert invoke(*argv(tiny_llama, plan, text_file, out, *extra), ok=False).exit_code == 130
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and (partial / "block_0000.json").is_file() and (partial / "hidden_0000.safetensors").is_file()
    return partial


@pytest.mark.parametrize("extra", [(), ("--offload",)], ids=["in-memory", "streamed"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_llama, plan, text_file, reference, monkeypatch,
                                                      caplog, extra):
    """Also streamed: its finished blocks' results are read back from CKPT.partial/ (resumed ones included)."""
    out = tmp_path / "ck"
    partial = interrupt_after_block_zero(tiny_llama, plan, text_file, out, monkeypatch, *extra)
    caplog.set_level(logging.INFO, logger="hawqtool")
    invoke(*argv(tiny_llama, plan, text_file, out, *extra))
    assert "resuming quantization at block 1" in caplog.text and "damaged" not in caplog.text
    assert digests(out) == reference and not partial.exists()


def flip_a_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2 + 3] ^= 0x10  # inside the tensor data: the file still parses
    path.write_bytes(bytes(b))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_record(path: Path) -> None:
    d = json.loads(path.read_text())
    layer = next(iter(d["record"]["meta"]["layers"].values()))
    layer["error"] = layer["error"] * 0.5  # a plausible, wrong number
    path.write_text(json.dumps(d))


DAMAGE = {"flipped byte in the saved block": ("block_0000.safetensors", flip_a_byte),
          "truncated hidden states": ("hidden_0000.safetensors", truncate),
          "edited record": ("block_0000.json", edit_record),
          "garbage record": ("block_0000.json", lambda p: p.write_text("{not json")),
          "missing block file": ("block_0000.safetensors", lambda p: p.unlink())}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_a_damaged_resume_state_is_recomputed_never_trusted(what, tmp_path, tiny_llama, plan, text_file, reference,
                                                           monkeypatch, caplog):
    out = tmp_path / "ck"
    partial = interrupt_after_block_zero(tiny_llama, plan, text_file, out, monkeypatch)
    name, damage = DAMAGE[what]
    damage(partial / name)
    caplog.set_level(logging.INFO, logger="hawqtool")
    invoke(*argv(tiny_llama, plan, text_file, out))  # exit 0: recomputed, not exit 2 on every rerun
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("damaged" in w and "recomputed" in w and name in w for w in warnings), warnings
    assert "resuming quantization" not in caplog.text
    assert digests(out) == reference and not partial.exists()


def test_state_of_another_run_is_ignored_silently(tmp_path, caplog):
    state = BlockState(tmp_path / "p", "run-a")
    state.save(0, {"x": torch.ones(2)}, {"h0": torch.zeros(3)}, {"layers": {}})
    assert [m for m, _ in BlockState(tmp_path / "p", "run-a").resume()[0]] == [{"layers": {}}]
    assert BlockState(tmp_path / "p", "run-b").resume() == ([], None)
    assert "damaged" not in caplog.text
    assert not list((tmp_path / "p").iterdir())  # the other run's files are gone, nothing half-written is left


def test_damaged_sensitivity_probes_are_recomputed(tmp_path, caplog):
    from hawqtool.sensitivity.hutchinson import ProbeLog

    log = ProbeLog(tmp_path / "s.json.partial", key="fp")
    log.save({"fc1": [1.25, 2.5], "fc2": [3.0, 4.0]})
    assert log.load(["fc1", "fc2"]) == {"fc1": [1.25, 2.5], "fc2": [3.0, 4.0]}
    path = tmp_path / "s.json.partial"
    path.write_text(path.read_text().replace("2.5", "2.6"))  # one digit: a silently different estimate
    assert log.load(["fc1", "fc2"]) is None
    assert "damaged" in caplog.text


def test_killed_error_pass_resumes_after_the_last_saved_layer(tmp_path, tiny_llama, text_file, monkeypatch):
    """The ‖Q(W)−W‖² pass (longer than the probes on a large model) is kept layer by layer: a run killed in it
    resumes with the layers not yet done, and the report's errors equal an uninterrupted run's exactly."""
    from hawqtool.inputs import calibration_inputs
    from hawqtool.models import load_model
    from hawqtool.sensitivity import settings
    from hawqtool.sensitivity.resume import QerrorLog
    from hawqtool.stages import compute_sensitivity

    loaded = load_model(str(tiny_llama))
    ids = calibration_inputs(loaded, str(text_file), 2, 32, seed=0)
    kw = dict(min_probes=2, max_probes=2, bits=(3, 4), data_key="k")
    whole = compute_sensitivity(loaded, ids, **kw)
    monkeypatch.setattr(QerrorLog, "EVERY", 0.0)  # saved after every layer
    calls, kill = [], [True]
    orig = settings._qerrors

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == 3 and kill[0]:
            raise KeyboardInterrupt
        return orig(*a, **k)

    import hawqtool.stages as stages

    monkeypatch.setattr(stages, "_qerrors", counted)
    part = tmp_path / "sens.json.partial"
    with pytest.raises(KeyboardInterrupt):
        compute_sensitivity(loaded, ids, resume_path=part, **kw)
    assert len(QerrorLog(Path(str(part) + ".qerror"), whole.fingerprint).load()) == 2
    calls.clear()
    kill[0] = False
    resumed = compute_sensitivity(loaded, ids, resume_path=part, **kw)
    assert len(calls) == len(whole.layers) - 2  # the two saved layers were not measured again
    assert [(l.name, l.qerror) for l in resumed.layers] == [(l.name, l.qerror) for l in whole.layers]
    assert not part.exists() and not Path(str(part) + ".qerror").exists()


def test_sensitivity_and_plan_files_are_byte_identical_across_runs(tmp_path, tiny_llama, text_file):
    """The same inputs give the same bytes for sensitivity.json (and its .md report) and plan.json: the stage
    timings are shown, not written."""
    outs = []
    for k in range(2):
        d = tmp_path / f"r{k}"
        d.mkdir()
        invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 2,
               "--seqlen", 32, "--max-probes", 2, "--min-probes", 2, "-q")
        invoke("allocate", d / "sens.json", "--avg-bits", 3.5, "-o", d / "plan.json", "-q")
        invoke("report", d / "sens.json", "--plan", d / "plan.json")
        outs.append({p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".json", ".md")})
    assert {"sens.json", "plan.json"} <= set(outs[0]) and any(n.endswith(".md") for n in outs[0])
    assert outs[0] == outs[1]
    assert "seconds" not in json.loads(outs[0]["sens.json"]) and "solve_seconds" not in json.loads(outs[0]["plan.json"])


def test_a_saved_block_damaged_during_a_streamed_run_is_never_used(tmp_path, tiny_llama, plan, text_file, reference,
                                                                   monkeypatch):
    """A streamed run reads its finished blocks back from CKPT.partial/ at the end: one damaged meanwhile is a
    one-line error, no checkpoint is written, and the same command then recomputes it."""
    out = tmp_path / "ck"
    save = BlockState.save

    def save_then_damage_block_zero(self, i, *a, **kw):
        save(self, i, *a, **kw)
        if i == 1:
            flip_a_byte(self.folder / "block_0000.safetensors")

    with monkeypatch.context() as m:
        m.setattr(BlockState, "save", save_then_damage_block_zero)
        res = invoke(*argv(tiny_llama, plan, text_file, out, "--offload"), ok=False)
    one_line_error(res, "damaged during the run", "again")
    assert not out.exists()
    invoke(*argv(tiny_llama, plan, text_file, out, "--offload"))
    assert digests(out) == reference
