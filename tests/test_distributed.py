"""Two ranks under torchrun (gloo, CPU) reproduce the single-process sensitivity estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(args, tmp_path, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("estimator", ["hutchinson", "fisher"])
def test_two_ranks_match_one_process(tiny_llama, text_file, tmp_path, estimator):
    common = ["sensitivity", str(tiny_llama), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16",
              "--min-probes", "6", "--max-probes", "6", "--estimator", estimator, "-q"]
    run(["-m", "hawqtool", *common, "-o", str(tmp_path / "one.json")], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hawqtool", *common,
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


def test_exit_tears_the_group_down_even_when_the_last_barrier_fails(monkeypatch):
    """A rank whose exit barrier fails (its peer already closed the connections) must still destroy the process
    group: left alive, gloo's threads abort the process at exit ('terminate called without an active exception')."""
    import torch.distributed as dist

    from hawqtool import distributed

    calls = []

    def barrier():
        calls.append("barrier")
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed._shutdown()
    assert calls == ["barrier", "destroy"]
