"""Nothing half-written is left behind. A full disk (an injected ENOSPC) or too little free space is exit 1 with
one line naming the bytes; the temporary is removed, no lock is left and the previous output is intact. Temporaries that killed processes left
are removed by the next run; a previous output they had swapped aside is put back."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from test_cli_e2e import SMALL, invoke, one_line_error

from hawqtool.errors import UserError
from hawqtool.locks import lock_path
from hawqtool.outputs import clean_stale


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama) -> Path:
    from hawqtool import artifacts
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import load_model, quantizable_layers, weight_matrix

    model = load_model(str(tiny_llama)).model
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    artifacts.save(fixed_plan(shapes, 4), path)
    return path


def quantize(tiny_llama, plan, text_file, out, ok=True):
    return invoke("quantize", tiny_llama, "--plan", plan, "--calib", text_file, "-o", out, *SMALL, "--method", "rtn",
                  "-q", ok=ok)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def only(folder: Path, *names: str) -> None:
    """The folder holds exactly these entries: no temporaries, no swapped-aside outputs, no lock."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def full_disk_after(nbytes: int):
    """A save_tensors that puts `nbytes` of the file on disk and then fails as a full disk does (ENOSPC)."""
    def save_tensors(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    return save_tensors


def disk_fills_after(nbytes: int):
    """tensorfile's single write, failing as a full disk does once `nbytes` of the file are written."""
    written = [0]

    def write(f, data):
        data = memoryview(data).cast("B")
        room = max(nbytes - written[0], 0)
        f.write(data[:room])
        written[0] += min(room, len(data))
        if len(data) > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_disk_full_while_saving_the_checkpoint(tiny_llama, plan, text_file, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    quantize(tiny_llama, plan, text_file, out)  # the user's previous output
    before = snapshot(out)
    monkeypatch.setattr("hawqtool.tensorfile._write", disk_fills_after(4096))
    res = quantize(tiny_llama, plan, text_file, out, ok=False)
    one_line_error(res, "no space left", str(out), "bytes", "free some space")
    assert snapshot(out) == before
    only(tmp_path, "ck")  # no temporary, no empty resume folder, no lock


def test_disk_full_at_the_checkpoint_after_the_blocks_were_saved(tiny_llama, plan, text_file, tmp_path, monkeypatch):
    import hawqtool.checkpoint as checkpoint

    out = tmp_path / "ck"
    quantize(tiny_llama, plan, text_file, out)
    before = snapshot(out)
    monkeypatch.setattr(checkpoint, "save_tensors", full_disk_after(1 << 16))
    one_line_error(quantize(tiny_llama, plan, text_file, out, ok=False), "no space left", "bytes")
    assert snapshot(out) == before
    only(tmp_path, "ck", "ck.partial")  # finished blocks are kept for the rerun, the half checkpoint is not
    monkeypatch.undo()
    quantize(tiny_llama, plan, text_file, out)  # space freed: the rerun resumes and finishes
    only(tmp_path, "ck")


def test_disk_full_while_exporting(tiny_llama, plan, text_file, tmp_path, monkeypatch):
    quantize(tiny_llama, plan, text_file, tmp_path / "ck")
    invoke("export", tmp_path / "ck", "--format", "gptq", "-o", tmp_path / "ex", "-q")
    before = snapshot(tmp_path / "ex")
    monkeypatch.setattr("hawqtool.tensorfile._write", disk_fills_after(1 << 12))
    res = invoke("export", tmp_path / "ck", "--format", "gptq", "-o", tmp_path / "ex", ok=False)
    one_line_error(res, "no space left", str(tmp_path / "ex"))
    assert snapshot(tmp_path / "ex") == before
    only(tmp_path, "ck", "ex")


def test_too_little_free_space_is_refused_before_writing(tiny_llama, plan, text_file, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    quantize(tiny_llama, plan, text_file, out)
    before = snapshot(out)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("hawqtool.outputs.shutil.disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 4096, 4096))
    res = quantize(tiny_llama, plan, text_file, out, ok=False)
    one_line_error(res, "not enough free space", "needs about", "4096 are free")
    assert snapshot(out) == before
    only(tmp_path, "ck")
    # room for the resume state, not for the checkpoint (its size is known before writing): refused there
    monkeypatch.setattr("hawqtool.outputs.shutil.disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - (512 << 10), 512 << 10))
    res = quantize(tiny_llama, plan, text_file, out, ok=False)
    one_line_error(res, f"not enough free space for {out}:", "needs about", f"{512 << 10} are free")
    assert snapshot(out) == before
    only(tmp_path, "ck", "ck.partial")  # the finished blocks are kept for the rerun


def test_a_full_disk_writing_a_json_artifact_keeps_the_old_one(tmp_path, monkeypatch):
    from hawqtool.artifacts import write_atomic

    path = tmp_path / "plan.json"
    write_atomic(path, '{"old": 1}')

    def replace(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("hawqtool.artifacts.os.replace", replace)
    with pytest.raises(UserError, match="no space left"):
        write_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'
    only(tmp_path, "plan.json")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_next_run_removes_temporaries_of_killed_runs(tiny_llama, plan, text_file, tmp_path, caplog):
    out = tmp_path / "ck"
    quantize(tiny_llama, plan, text_file, out)
    dead = dead_pid()
    for stale in (f"ck.tmp-{dead}", f".ck.old-{dead}"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / f".ck.tmp-{dead}").write_text("half a json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"ck.tmp-{live.pid}").mkdir()  # a run still writing: not ours to remove
        quantize(tiny_llama, plan, text_file, out)
        only(tmp_path, "ck", f"ck.tmp-{live.pid}")
    finally:
        live.kill()
        live.wait()
    assert "no longer runs" in caplog.text and (out / "hawqtool_manifest.json").is_file()
    assert not lock_path(out).exists()


def test_a_previous_output_a_killed_run_swapped_aside_is_put_back(tiny_llama, plan, text_file, tmp_path):
    out = tmp_path / "ck"
    quantize(tiny_llama, plan, text_file, out)
    before = snapshot(out)
    aside = tmp_path / f".ck.old-{dead_pid()}"
    os.replace(out, aside)  # killed between the two renames of replace_dir
    shutil.copytree(aside, tmp_path / f"ck.tmp-{aside.name.rsplit('-', 1)[1]}")
    clean_stale(out)
    assert snapshot(out) == before
    only(tmp_path, "ck")
