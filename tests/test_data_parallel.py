"""quantize and eval under torchrun (2 gloo ranks on the CPU) give exactly the 1-process results: the same
checkpoint bytes and the same perplexity (issue 17). Batches are split unevenly (3 over 2 ranks) on purpose."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from cli_helpers import invoke

# PYTHONFAULTHANDLER: a rank that aborts prints where (its Python stack), shown from the head of stderr below
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONFAULTHANDLER": "1"}


def hawqtool(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    """`hawqtool ARGS` in a fresh process, or under torchrun with `ranks` processes."""
    launch = [sys.executable, "-m", "hawqtool"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "hawqtool"]
    res = subprocess.run(launch + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=600)
    err = res.stderr if len(res.stderr) <= 6000 else f"{res.stderr[:3000]}\n[...]\n{res.stderr[-3000:]}"
    assert res.returncode == 0, err
    return res


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama, text_file):
    d = tmp_path_factory.mktemp("dp")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 4, "--seqlen", 32,
           "--max-probes", 4, "-q")
    invoke("allocate", d / "sens.json", "--avg-bits", 3.5, "-o", d / "plan.json", "-q")
    return d / "plan.json"


@pytest.mark.parametrize("act_order", [False, True])
def test_two_ranks_write_the_one_rank_checkpoint(tmp_path, tiny_llama, text_file, plan, act_order):
    args = ["quantize", tiny_llama, "--plan", plan, "--calib", text_file, "--nsamples", 20, "--seqlen", 32, "-q",
            *(["--act-order"] if act_order else [])]
    hawqtool(*args, "-o", tmp_path / "one")
    two = hawqtool(*args, "-o", tmp_path / "two", "-v", ranks=2)
    assert "rank 0 of 2 runs 2 of the 3 calibration batches" in two.stderr
    assert "rank 1 of 2 runs 1 of the 3 calibration batches" in two.stderr
    digest = [hashlib.sha256((tmp_path / k / "model.safetensors").read_bytes()).hexdigest() for k in ("one", "two")]
    assert digest[0] == digest[1]
    manifests = [json.loads((tmp_path / k / "hawqtool_manifest.json").read_text()) for k in ("one", "two")]
    assert manifests[0]["layers"] == manifests[1]["layers"]
    # block tuning (on by default) ran under both, its steps' gradients sent from the rank holding each batch
    notes = [n for layer in manifests[1]["layers"].values() for n in layer["notes"]]
    assert any(n.startswith("block tuned") and "kept" not in n for n in notes), notes
    assert not (tmp_path / "two.partial").exists()


def test_two_ranks_score_the_one_rank_perplexity(tiny_llama, text_file):
    args = ["eval", tiny_llama, "--data", text_file, "--windows", 10, "--seqlen", 32, "--json"]
    one = json.loads(hawqtool(*args).stdout)
    two = hawqtool(*args, ranks=2).stdout.strip().splitlines()
    assert len(two) == 1  # rank 0 alone reports
    two = json.loads(two[0])
    assert two["tokens"] == one["tokens"] and two["nll"] == one["nll"] and two["ppl"] == one["ppl"]
