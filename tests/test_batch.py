"""`hawqtool batch` (issue 17): jobs in their own processes and folders, a sweep sharing one sensitivity, a failed
job that stops none of the others, a kill -9 that the rerun resumes, and one-line refusals of bad jobs files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cli_helpers import invoke, one_line_error

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def jobs_file(tmp_path, tiny_llama, text_file, jobs) -> str:
    small = dict(calib=str(text_file), data=str(text_file), nsamples=4, seqlen=32, sens_samples=4, sens_seqlen=32,
                 sens_max_probes=4, sens_min_probes=2, eval_windows=2, eval_seqlen=32, model=str(tiny_llama))
    p = tmp_path / "jobs.yaml"
    p.write_text(yaml.safe_dump({"defaults": small, "jobs": jobs}))
    return str(p)


def test_sweep_shares_sensitivity_and_a_failed_job_stops_nothing(tmp_path, tiny_llama, text_file):
    jf = jobs_file(tmp_path, tiny_llama, text_file, [
        {"name": "tiny", "avg_bits": [3.0, 4.0]},
        {"name": "broken", "model": str(tmp_path / "no-such-model")},
        {"name": "tiny-rtn", "method": "rtn", "avg_bits": 3.5}])
    res = invoke("batch", jf, "-o", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]  # after the progress lines and the table
    assert last.startswith("error: 1 of 4 runs failed") and "broken" in last, last
    rows = json.loads((tmp_path / "out" / "batch_summary.json").read_text())["jobs"]
    assert [(r["job"], r["state"]) for r in rows] == [("tiny", "done"), ("tiny", "done"), ("broken", "failed"),
                                                     ("tiny-rtn", "done")]
    assert "no-such-model" in rows[2]["error"] and rows[2]["exit_code"] == 1
    three, four = (json.loads((tmp_path / "out" / "tiny" / f"bits-{b}" / "summary.json").read_text()) for b in (3, 4))
    assert three["mixed_avg_bits"] < four["mixed_avg_bits"] and rows[0]["summary"]["mixed_ppl"] == three["mixed_ppl"]
    assert "sensitivity: artifact is current, skipped" in (tmp_path / "out" / "tiny" / "bits-4" / "job.log").read_text()
    assert "sensitivity" not in four["stage_seconds"]  # computed once, by bits-3
    assert "hawqtool batch" in res.stderr and "328." not in last  # the table (on stderr, with the progress lines)


def test_kill_9_then_rerun_resumes(tmp_path, tiny_llama, text_file):
    jf = jobs_file(tmp_path, tiny_llama, text_file, [{"name": "a", "avg_bits": 3.0}, {"name": "b", "avg_bits": 4.0}])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hawqtool", "batch", jf, "-o", str(out), "-q"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "a" / "plan.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "a" / "plan.json").exists(), "job a never got past allocation"
    os.kill(proc.pid, signal.SIGKILL)  # mid-job: the run child dies with it
    proc.wait()
    time.sleep(1)
    assert not (out / "a" / "summary.json").exists()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads((out / "batch_summary.json").read_text())["jobs"]
    assert [r["state"] for r in rows] == ["done", "done"]
    assert "sensitivity: artifact is current, skipped" in (out / "a" / "job.log").read_text()  # kept from the kill


@pytest.mark.parametrize("content, words", [
    ({"jobs": [{"name": "x", "avg_bit": 3}]}, ["unknown key 'avg_bit'", "did you mean 'avg_bits'"]),
    ({"jobs": []}, ["non-empty `jobs:`"]),
    ({"jobs": [{"avg_bits": 3}]}, ["needs a `name:`"]),
    ({"jobs": [{"name": "x"}, {"name": "x"}]}, ["must be unique"]),
    ({"jobs": [{"name": "x" * 300}]}, ["at most 200 characters"]),
    ({"jobs": [{"name": "x", "avg_bits": [3, 3.0000001]}]}, ["name the same folder"]),
    ({"jobs": [{"name": "x", "recipe": 5}]}, ["recipe must be a path"]),
    ({"job": [{"name": "x"}]}, ["unknown top-level key 'job'"]),
    ({"defaults": {"nsample": 3}, "jobs": [{"name": "x"}]}, ["defaults has unknown key 'nsample'", "'nsamples'"]),
])
def test_bad_jobs_files_are_one_line(tmp_path, content, words):
    p = tmp_path / "jobs.yaml"
    p.write_text(yaml.safe_dump(content))
    one_line_error(invoke("batch", p, "-o", tmp_path / "out", ok=False), *words)
    assert not (tmp_path / "out").exists()


def test_a_unit_that_raises_is_a_failed_row(tmp_path, tiny_llama, text_file, monkeypatch):
    """Whatever a unit raises before its run (an unwritable folder) is its row, failed, and the batch's exit code
    says so; before, the worker thread died, the row was missing and the batch exited 0."""
    import hawqtool.batch as batch

    def broken(unit, gpu, say):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch, "run_unit", broken)
    jf = jobs_file(tmp_path, tiny_llama, text_file, [{"name": "a"}])
    res = invoke("batch", jf, "-o", tmp_path / "out", "-q", ok=False)
    assert res.exit_code != 0
    rows = json.loads((tmp_path / "out" / "batch_summary.json").read_text())["jobs"]
    assert [(r["job"], r["state"]) for r in rows] == [("a", "failed")] and "No space left" in rows[0]["error"]


def test_bad_gpus_is_one_line(tmp_path, tiny_llama, text_file):
    jf = jobs_file(tmp_path, tiny_llama, text_file, [{"name": "a"}])
    one_line_error(invoke("batch", jf, "-o", tmp_path / "out", "--gpus", "0,x", ok=False), "--gpus")


def test_gpus_runs_jobs_side_by_side(tmp_path, tiny_llama, text_file):
    """--gpus 0,1: one worker per listed device (here CPU runs, CUDA_VISIBLE_DEVICES set per job); both finish."""
    jf = jobs_file(tmp_path, tiny_llama, text_file, [{"name": "a", "avg_bits": 3.0}, {"name": "b", "avg_bits": 4.0}])
    invoke("batch", jf, "-o", tmp_path / "out", "--gpus", "0,1", "-q")
    rows = json.loads((tmp_path / "out" / "batch_summary.json").read_text())["jobs"]
    assert [(r["job"], r["state"]) for r in rows] == [("a", "done"), ("b", "done")]
    assert "started on GPU" not in (tmp_path / "out" / "a" / "job.log").read_text()  # said by the batch, not the run


def test_only_runs_one_job_as_an_array_task(tmp_path, tiny_llama, text_file):
    """--only INDEX|NAME (a Slurm array task): that job alone, its summary in its own folder."""
    jf = jobs_file(tmp_path, tiny_llama, text_file, [{"name": "a", "avg_bits": 3.0}, {"name": "b", "avg_bits": 4.0}])
    invoke("batch", jf, "-o", tmp_path / "out", "--only", "1", "-q")
    rows = json.loads((tmp_path / "out" / "b" / "batch_summary.json").read_text())["jobs"]
    assert [(r["job"], r["state"]) for r in rows] == [("b", "done")]
    assert not (tmp_path / "out" / "a").exists() and not (tmp_path / "out" / "batch_summary.json").exists()
    one_line_error(invoke("batch", jf, "-o", tmp_path / "out", "--only", "c", ok=False), "--only", "a, b")


def test_the_slurm_examples_parse():
    """scripts/slurm: the jobs file is valid (4 + 2 + 1 runs) and the sbatch scripts are valid bash."""
    from pathlib import Path

    from hawqtool.batch import plan_units, read_jobs

    here = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
    _, jobs = read_jobs(here / "jobs.example.yaml")
    assert [len(g) for g in plan_units(jobs, Path("out"))] == [4, 2, 1]
    for script in sorted(here.glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
