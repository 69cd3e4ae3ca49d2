"""Block activations on disk past a memory limit (spill.py, issue 16): the mapped tensors hold the same bytes, live in
the page cache (file-backed, unlinked) rather than anonymous memory, the folder goes when the Spill closes, and a
quantize run whose every list of activations is spilled gives the same weights as one that keeps them in memory:
in memory and streamed, with the float chain of block tuning, and resumed."""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model
from hawqtool.quantize.quantizer import QuantizedWeight
from hawqtool.quantize.saved_blocks import dequantize_packed
from hawqtool.spill import Spill, mapped, nbytes
from hawqtool.tensorfile import LazyTensor

IDS = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def _maps_under(folder: Path) -> list[str]:
    """This process's memory maps of files in `folder` (unlinked ones end in '(deleted)')."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mapped_tensor_holds_the_bytes_from_an_unlinked_file(tmp_path, dtype):
    t = torch.randn(3, 5, 7).to(dtype)
    m = mapped(t, tmp_path)
    assert m.shape == t.shape and m.dtype == dtype and torch.equal(m, t)
    assert not list(tmp_path.iterdir())  # unlinked at once
    maps = _maps_under(tmp_path)
    assert maps and all(line.endswith("(deleted)") for line in maps)
    m2 = m * 2  # reading and computing on it works like any CPU tensor
    assert torch.equal(m2, t * 2)
    m.add_(1)  # a write copies the page: the tensor changes, nothing else breaks
    assert torch.equal(m, t + 1)


def test_spill_keeps_small_lists_in_memory_and_spills_past_the_limit(tmp_path):
    small = [torch.randn(4, 8) for _ in range(3)]
    limit = nbytes(small)
    with Spill(tmp_path, limit) as sp:
        kept = sp.keep(small)
        assert all(a is b for a, b in zip(kept, small)) and sp.folder is None  # at the limit: in memory
        big = small + [torch.randn(1, 8)]
        out = sp.keep(big)
        assert sp.folder is not None and sp.folder.parent == tmp_path
        assert sp.folder.name.startswith(f"activations-{socket.gethostname()}-{os.getpid()}-")
        assert all(torch.equal(a, b) for a, b in zip(out, big))
        assert len(_maps_under(sp.folder)) >= len(big)
        assert sp.keep(out)[0] is out[0]  # mapped already: not written again
        folder = sp.folder
    assert not folder.exists()  # closed: its folder is gone (the tensors stay readable)
    assert torch.equal(out[-1], big[-1])


def test_spill_without_a_limit_and_off_the_host(tmp_path):
    t = [torch.randn(4, 8)]
    assert Spill(tmp_path, None).keep(t)[0] is t[0]
    meta = [torch.empty(4, 8, device="meta")]
    assert Spill(tmp_path, 0).keep(meta, host=False)[0] is meta[0]  # not on the host: left where it is
    assert not list(tmp_path.iterdir())


def test_a_killed_runs_spill_folders_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has exited
    folders = {"stale": f"activations-{host}-{dead}-ab", "live": f"activations-{host}-{os.getpid()}-cd",
               "other host": f"activations-elsewhere-{dead}-ef", "user's": f"activations-{host}-{dead}-gh"}
    for key, name in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ("notes.txt" if key == "user's" else "act-1.bin")).write_text("x")
    with Spill(tmp_path, 0):
        pass
    assert not (tmp_path / folders["stale"]).exists()
    for key in ("live", "other host", "user's"):  # a rank still running, another machine's, a user's file
        assert (tmp_path / folders[key]).is_dir(), key


def _specs(model):
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    return plan_specs(fixed_plan(shapes, 3, group_size=16))


def _weights(res) -> dict[str, torch.Tensor]:
    return {n: r.weight.dequantize() for n, r in res.items()}


def _dense(w) -> torch.Tensor:
    """A result's float weight: a QuantizedWeight, or a streamed run's PackedLayer (its tensors read from disk)."""
    if isinstance(w, QuantizedWeight):
        return w.dequantize()
    tensors = {k: t.read() if isinstance(t, LazyTensor) else t for k, t in w.tensors.items()}
    return dequantize_packed(dataclasses.replace(w, tensors=tensors))


@pytest.mark.parametrize("tune_iters", [0, 5])
def test_quantize_with_every_activation_spilled_equals_in_memory(tiny_llama, tmp_path, tune_iters):
    opts = QuantizeOptions(tune_iters=tune_iters, batch_size=3)

    def run(spill):
        loaded = load_model(str(tiny_llama))
        return _weights(quantize_model(loaded.model, _specs(loaded.model), IDS, opts, spill=spill))

    ref = run(Spill(None, None))
    with Spill(tmp_path, 0) as sp:
        got = run(sp)
        assert sp.folder is not None  # it did spill
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_streamed_quantize_spilled_and_resumed_equals_in_memory(tmp_path, corpus_text, caplog):
    """A streamed 3-block model, every list spilled, stopped after block 0 and resumed: the weights of the
    in-memory run."""
    folder = make_tiny_llama(tmp_path / "m", corpus_text, layers=3, seed=3)
    opts = QuantizeOptions(tune_iters=3, batch_size=3)

    def run(offload, spill=None, state=None, only0=False):
        loaded = load_model(str(folder), offload=offload)
        specs = _specs(loaded.model)
        if only0:
            specs = {n: s for n, s in specs.items() if n.startswith("model.layers.0.")}
        res = quantize_model(loaded.model, specs, IDS, opts, state_dir=state, state_key="k", spill=spill)
        return {n: _dense(r.weight) for n, r in res.items()}

    ref = run(False)
    state = tmp_path / "state"
    with Spill(state, 0) as sp:
        run(True, sp, state, only0=True)
        with caplog.at_level("INFO", logger="hawqtool"):
            got = run(True, sp, state)
        assert "resuming quantization at block 1 of 3" in caplog.text
        assert sp.folder is not None
    assert not list(state.glob("activations-*"))
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_the_default_spill_goes_to_the_state_folder_and_is_removed(tiny_llama, tmp_path, monkeypatch, caplog):
    from hawqtool.quantize import driver

    monkeypatch.setattr(driver, "default_limit", lambda: 0)  # as if memory were full: every list spills
    loaded = load_model(str(tiny_llama))
    state = tmp_path / "state"
    with caplog.at_level("INFO", logger="hawqtool"):
        quantize_model(loaded.model, _specs(loaded.model), IDS, QuantizeOptions(batch_size=3), state_dir=state,
                       state_key="k")
    assert f"spilled to {state}/activations-" in caplog.text
    assert not list(state.glob("activations-*"))
