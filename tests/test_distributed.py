"""Two ranks under torchrun (gloo, CPU): the single-process sensitivity estimate, and how ranks end (the exit wait
in the store, a user error's status, a failed rank that must not hang the job)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(args, tmp_path, env_extra=None) -> subprocess.CompletedProcess:
    """`python ARGS` in tmp_path with one thread and no hub access; the caller checks the outcome."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def run(args, tmp_path, env_extra=None):
    r = launch(args, tmp_path, env_extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.mark.parametrize("estimator", ["hutchinson", "fisher"])
def test_two_ranks_match_one_process(tiny_llama, text_file, tmp_path, estimator):
    common = ["sensitivity", str(tiny_llama), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16",
              "--min-probes", "6", "--max-probes", "6", "--estimator", estimator, "-q"]
    run(["-m", "hawqtool", *common, "-o", str(tmp_path / "one.json")], tmp_path)
    run([*TORCHRUN_2, "-m", "hawqtool", *common,
         "-o", str(tmp_path / "two.json")], tmp_path)
    run(["-m", "hawqtool", *common, "--nproc", "2", "-o", str(tmp_path / "nproc.json")], tmp_path)
    one, two, via_flag = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json", "nproc.json"))
    assert two["settings"]["ranks"] == 2 and via_flag["settings"]["ranks"] == 2
    for a, b, c in zip(one["layers"], two["layers"], via_flag["layers"]):
        assert a["name"] == b["name"] and a["probes"] == b["probes"] == 6
        # the same probes (seeded per probe) in the same order: equal up to float summation order
        assert b["trace"] == pytest.approx(a["trace"], rel=1e-6, abs=1e-9)
        assert c["trace"] == pytest.approx(a["trace"], rel=1e-6, abs=1e-9)
        assert b["stderr"] == pytest.approx(a["stderr"], rel=1e-6, abs=1e-9)


def test_exit_tears_the_group_down_even_when_the_wait_fails(monkeypatch):
    """A rank whose exit wait fails (its peer gone) must still destroy the process group: left alive, gloo's
    threads abort the process at exit ('terminate called without an active exception'). The wait is the store's,
    never a gloo barrier (one rank closing its sockets while a peer finishes that barrier was the abort's cause)."""
    import torch.distributed as dist

    from hawqtool import distributed

    calls = []

    def arrived(name):
        calls.append(f"wait {name}")
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "all_arrived", arrived)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("gloo barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed._shutdown()
    assert calls == ["wait exit", "destroy"]


LATE_RANK = """
import sys, time
sys.path.insert(0, {root!r})
from hawqtool.distributed import all_arrived, gather_list, world
rank, size = world()
assert gather_list([rank], 2) == [0, 1]
if rank == 1:
    time.sleep(2.0)
t0 = time.monotonic()
all_arrived("test")
print(f"rank {{rank}} waited {{time.monotonic() - t0:.2f}}", flush=True)
"""


def test_ranks_wait_in_the_store_for_the_last_one_and_exit_cleanly(tmp_path):
    """all_arrived holds the early rank until the late one arrives; both then leave through the exit path (the same
    wait, then the teardown) with status 0."""
    (tmp_path / "late.py").write_text(LATE_RANK.format(root=ROOT))
    r = run([*TORCHRUN_2, "--tee=1", str(tmp_path / "late.py")], tmp_path)
    waited = {int(w.split()[1]): float(w.split()[-1]) for w in r.stdout.split("\n") if "waited" in w}
    assert waited.keys() == {0, 1}, r.stdout
    assert waited[0] >= 1.5 and waited[1] < 1.0, waited


def test_a_user_error_under_torchrun_ends_every_rank_with_status_1(tiny_llama, tmp_path):
    """The CLI ends torchrun ranks through distributed.end_rank (exit functions, then os._exit): the command's
    own status must survive that, here a bad input's 1. A failed rank leaves without waiting for the other, which
    torchrun may stop before it prints its own line."""
    r = launch([*TORCHRUN_2, "-m", "hawqtool", "eval", str(tiny_llama), "--data", str(tmp_path / "missing.txt"),
                "--windows", "4", "--seqlen", "16"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("error: data file") >= 1, r.stderr[-3000:]
    assert "exitcode: 1" in r.stderr and "SIGABRT" not in r.stderr


FAILING_RANK = """
import sys
sys.path.insert(0, {root!r})
from hawqtool.distributed import end_rank, gather_list, world
rank, size = world()
if rank == 1:
    end_rank(1)  # what the CLI does with a rank whose command failed
gather_list([rank], 2)  # rank 0 waits here for rank 1, which never comes
"""


def test_a_failed_rank_leaves_at_once_and_the_job_fails(tmp_path):
    """A rank that fails while its peer is blocked in a collective must not wait for that peer at exit (neither
    could move: a job hung until the collective's timeout); it ends, and torchrun stops the peer and fails."""
    (tmp_path / "fail.py").write_text(FAILING_RANK.format(root=ROOT))
    r = launch([*TORCHRUN_2, str(tmp_path / "fail.py")], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "exitcode: 1" in r.stderr and "local_rank: 1" in r.stderr, r.stderr[-3000:]
