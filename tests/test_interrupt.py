"""Ctrl-C during `hawqtool quantize` (a real SIGINT to a real process): exit code 130, no
checkpoint under the output name, finished blocks kept; the re-run resumes from them and writes the
same bytes as an uninterrupted run (sha256 of every file)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, corpus_text):
    return make_tiny_llama(tmp_path_factory.mktemp("deep"), corpus_text, hidden=64, layers=8)


def test_sigint_during_quantize_then_resume(tmp_path, deep_llama, text_file):
    from hawqtool import artifacts
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import load_model, quantizable_layers, weight_matrix

    model = load_model(str(deep_llama)).model
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    artifacts.save(fixed_plan(shapes, 3), tmp_path / "plan.json")
    out, partial = tmp_path / "ckpt", tmp_path / "ckpt.partial"
    cmd = [sys.executable, "-m", "hawqtool", "quantize", str(deep_llama), "--plan", str(tmp_path / "plan.json"),
           "--calib", str(text_file), "-o", str(out), "--nsamples", "48", "--seqlen", "128", "-q", "-v"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a background job of a non-interactive shell inherits SIGINT ignored (POSIX): give the child the default
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (partial / "block_0000.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "quantize finished before it could be interrupted: make the model larger"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and (partial / "block_0000.json").exists()
    assert not list(tmp_path.glob("ckpt.tmp-*"))
    done = run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "resuming quantization at block" in done.stderr
    assert (out / "hawqtool_manifest.json").exists() and not partial.exists()
    straight = tmp_path / "straight"
    whole = subprocess.run([*cmd[:cmd.index("-o") + 1], str(straight), *cmd[cmd.index("-o") + 2:]],
                           capture_output=True, text=True, env=env, timeout=300)
    assert whole.returncode == 0 and "resuming" not in whole.stderr, whole.stderr
    assert digests(out) == digests(straight)


def digests(folder):
    from hawqtool.checkpoint import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
