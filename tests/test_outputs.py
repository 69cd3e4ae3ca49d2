"""Output paths through the CLI, as a user hits them: nothing hawqtool did not write is replaced, no
input is overwritten, two writers of one output cannot both run (exit 1, one line, disk intact)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_cli_e2e import SMALL, invoke, one_line_error

from hawqtool.locks import lock_path


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama, text_file):
    d = tmp_path_factory.mktemp("plan")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 2,
           "--seqlen", 32, "--max-probes", 2, "--min-probes", 2, "-q")
    # widths the GPTQ export packs (the tests below export it)
    invoke("allocate", d / "sens.json", "--avg-bits", 4.0, "--bits", "2,3,4,8", "-o", d / "plan.json", "-q")
    return d


def quantize(model, plan, calib, out, *extra, ok=True):
    return invoke("quantize", model, "--plan", plan / "plan.json", "--calib", calib, "-o", out, *SMALL,
                  "--method", "rtn", "-q", *extra, ok=ok)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_user_files_is_refused_and_left_intact(plan, tiny_llama, text_file, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("do not lose me")
    before = snapshot(mine)
    one_line_error(quantize(tiny_llama, plan, text_file, mine, ok=False), str(mine), "--overwrite")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporaries, no lock left
    (tmp_path / "file.bin").write_bytes(b"x")
    one_line_error(quantize(tiny_llama, plan, text_file, tmp_path / "file.bin", ok=False), "is a file")
    assert (tmp_path / "file.bin").read_bytes() == b"x"


def test_a_users_files_beside_and_named_like_ours_are_kept(plan, tiny_llama, text_file, tmp_path, monkeypatch):
    """CKPT.partial/ may hold a user's own files: a finished quantize removes only the resume files it wrote.
    A folder holding a user's summary.json is not a run folder (only its artifacts' contents or the run marker
    make one), so `run` refuses it. `-o .` names the current folder."""
    partial = tmp_path / "ck.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("keep")
    quantize(tiny_llama, plan, text_file, tmp_path / "ck")
    assert (tmp_path / "ck" / "hawqtool_manifest.json").is_file()
    assert sorted(p.name for p in partial.iterdir()) == ["mine.txt"]
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "summary.json").write_text('{"my": "results"}')
    one_line_error(invoke("run", tiny_llama, "--calib", text_file, "-o", proj, ok=False), "--overwrite")
    assert sorted(p.name for p in proj.iterdir()) == ["summary.json"]
    from hawqtool.outputs import claim_output, is_own_output

    assert not is_own_output(proj, "run")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert lock_path(".") == tmp_path / ".here.hawqtool-lock"
    claim_output(".", "run")  # an empty folder is free: no "empty name" error
    assert (tmp_path / ".here.hawqtool-lock").is_file()


def test_overwrite_replaces_a_foreign_folder_only_when_asked(plan, tiny_llama, text_file, tmp_path, caplog):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "old.txt").write_text("x")
    quantize(tiny_llama, plan, text_file, mine, "--overwrite")
    assert (mine / "hawqtool_manifest.json").is_file() and not (mine / "old.txt").exists()
    assert "--overwrite" in caplog.text  # logged to stderr by the CLI
    # an earlier checkpoint of ours is replaced without --overwrite, and the user is told
    quantize(tiny_llama, plan, text_file, mine)
    assert "replacing the earlier hawqtool checkpoint" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_outputs_inside_or_above_an_input_are_refused(plan, tiny_llama, text_file, tmp_path):
    model_copy = tmp_path / "models" / "tiny"
    import shutil

    shutil.copytree(tiny_llama, model_copy)
    before = snapshot(model_copy)
    for out in (model_copy.parent, model_copy, model_copy / "ckpt"):
        one_line_error(quantize(model_copy, plan, text_file, out, "--overwrite", ok=False), "input")
    assert snapshot(model_copy) == before
    ck = tmp_path / "ck"
    quantize(model_copy, plan, text_file, ck)
    ck_before = snapshot(ck)
    for out in (tmp_path, ck, ck / "sub"):
        one_line_error(invoke("export", ck, "--format", "gptq", "-o", out, "--overwrite", ok=False), "input")
    assert snapshot(ck) == ck_before and snapshot(model_copy) == before
    invoke("export", ck, "--format", "gptq", "-o", tmp_path / "ex")
    invoke("export", ck, "--format", "gptq", "-o", tmp_path / "ex")  # our own export: replaced
    (tmp_path / "other").mkdir()
    one_line_error(invoke("export", ck, "--format", "gptq", "-o", tmp_path / "other", ok=False), "--overwrite")
    # the calibration text is an input too: --overwrite of the folder holding it is refused, the file kept
    data = tmp_path / "data"
    data.mkdir()
    (data / "c.txt").write_text(text_file.read_text())
    one_line_error(quantize(model_copy, plan, data / "c.txt", data, "--overwrite", ok=False), "input")
    one_line_error(invoke("sensitivity", model_copy, "--calib", data / "c.txt", "-o", data, "--overwrite", ok=False),
                   "input")
    assert sorted(p.name for p in data.iterdir()) == ["c.txt"]


def test_json_outputs_refuse_foreign_files_and_folders(plan, tmp_path):
    foreign = tmp_path / "plan.json"
    foreign.write_text(json.dumps({"my": "data"}))
    one_line_error(invoke("allocate", plan / "sens.json", "--avg-bits", 4, "-o", foreign, ok=False), "--overwrite")
    assert json.loads(foreign.read_text()) == {"my": "data"}
    one_line_error(invoke("allocate", plan / "sens.json", "--avg-bits", 4, "-o", tmp_path, ok=False), "folder")
    invoke("allocate", plan / "sens.json", "--avg-bits", 4, "-o", foreign, "--overwrite", "-q")
    assert json.loads(foreign.read_text())["kind"] == "plan"
    invoke("allocate", plan / "sens.json", "--avg-bits", 3, "-o", foreign, "-q")  # a plan replaces a plan


def _lock_holder(out):
    """A process that holds the lock of `out` (as a running hawqtool command does) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hawqtool.locks import take_lock; "
                               f"take_lock({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_fails_while_the_first_holds_the_lock(plan, tiny_llama, text_file, tmp_path, caplog):
    out = tmp_path / "ck"
    holder = _lock_holder(out)
    try:
        res = quantize(tiny_llama, plan, text_file, out, ok=False)
        one_line_error(res, f"PID {holder.pid}", str(out))
        assert not out.exists() and lock_path(out).read_text().split()[0] == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: the kernel dropped its lock, the next run takes over and removes the file
    assert lock_path(out).is_file()
    quantize(tiny_llama, plan, text_file, out)
    assert "stale lock" in caplog.text and (out / "hawqtool_manifest.json").is_file()
    assert not lock_path(out).exists()


def test_a_lock_file_names_its_holder_and_a_live_pid_without_the_lock_is_not_a_holder(tmp_path):
    from hawqtool.errors import UserError
    from hawqtool.locks import release_lock, take_lock

    out = tmp_path / "ck"
    lock_path(out).write_text(f"{os.getpid()} another-host\n")  # the file alone holds nothing (a crashed run's)
    take_lock(out)
    assert lock_path(out).read_text().split()[0] == str(os.getpid())
    release_lock(out)
    assert not lock_path(out).exists()
    holder = _lock_holder(out)
    try:
        lock_path(out).write_text(f"{holder.pid} another-host\n")  # what a holder on another machine writes
        with pytest.raises(UserError, match=f"PID {holder.pid} on host another-host"):
            take_lock(out)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("stale", [False, True])
def test_two_concurrent_quantize_runs_one_wins_one_fails(plan, tiny_llama, text_file, tmp_path, stale):
    out = tmp_path / "ck"
    if stale:  # both find the lock file of a crashed run: only one may take it over (a PID-only lock let both)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        lock_path(out).write_text(f"{dead.pid}\n")
    cmd = [sys.executable, "-m", "hawqtool", "quantize", str(tiny_llama), "--plan", str(plan / "plan.json"),
           "--calib", str(text_file), "-o", str(out), *SMALL, "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 1], results
    err = next(e for c, e in results if c == 1)
    assert "another hawqtool process" in err and len(err.strip().splitlines()) == 1
    assert (out / "hawqtool_manifest.json").is_file() and not lock_path(out).exists()


def test_a_lock_that_cannot_be_written_is_not_kept(tmp_path, monkeypatch):
    """A failure after the kernel lock is taken (a full disk writing the PID) releases it: the same process can
    take it again once the disk has room."""
    import errno

    from hawqtool import locks
    from hawqtool.errors import UserError

    out = tmp_path / "ck"
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(locks.os, "pwrite", full)
    with pytest.raises(UserError, match="No space left"):
        locks.take_lock(out)
    monkeypatch.setattr(locks.os, "pwrite", real)
    locks.take_lock(out)
    locks.release_lock(out)
    assert not lock_path(out).exists()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno

    from hawqtool import locks

    def nolock(fd, how):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", nolock)
    locks.take_lock(tmp_path / "ck")
    assert "no file locks" in caplog.text and not lock_path(tmp_path / "ck").exists()
