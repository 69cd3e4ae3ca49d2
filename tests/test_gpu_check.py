"""scripts/gpu_check.py on the CPU: quick mode (Triton interpreter), the budget, and that a wrong kernel fails it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
SECTIONS = ("env", "kernels_correctness", "kernels_speed", "pipeline_tiny", "pipeline_1b")
sys.path.insert(0, str(REPO / "scripts"))
from _gpu_check_lib import TOL, compare  # noqa: E402


def _check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run gpu_check.py --device cpu in a subprocess (interpreter on, one thread); its result and its JSON."""
    out = tmp_path / "gpu_check.json"
    full_env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_CORRUPT", "OUT")}
    full_env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **env)
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", *args]
    if "OUT" not in env:
        argv += ["--out", str(out)]
    p = subprocess.run(argv, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)
    return p, json.loads(out.read_text())


def test_quick_mode_passes_and_records_every_section(tmp_path: Path) -> None:
    p, r = _check(tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for name in (*SECTIONS, "summary"):
        assert r[name]["status"] in ("pass", "fail", "skipped"), name
    assert r["env"]["status"] == "pass" and r["kernels_correctness"]["status"] == "pass"
    assert "no CUDA" in r["kernels_speed"]["reason"]
    assert r["pipeline_tiny"]["reason"] == "--device cpu without --with-pipeline"
    assert r["summary"]["fail"] == 0 and r["summary"]["pass"] + r["summary"]["skipped"] == len(SECTIONS)
    cases = r["kernels_correctness"]["cases"]
    assert r["kernels_correctness"]["not_run"] == 0
    for bits in (2, 3, 4, 8):
        for dtype in ("float16", "float32"):
            mine = [c for c in cases if c["kernel"] == "matmul" and c["bits"] == bits and c["dtype"] == dtype]
            assert len(mine) == 16 and {c["sym"] for c in mine} == {True, False}  # 4 shapes x 2 M x sym/asym
            assert all(c["status"] == "pass" and c["rel_err"] < c["tol"] for c in mine), (bits, dtype)
    bf16 = [c for c in cases if c["dtype"] == "bfloat16"]
    assert bf16 and all(c["status"] in ("pass", "unsupported") for c in bf16)  # the interpreter's bf16 dot is wrong
    w8a8 = [c for c in cases if c["kernel"] == "w8a8"]
    assert len(w8a8) == 8 and all(c["status"] == "pass" and c["rel_err"] < 1e-6 for c in w8a8)
    assert "| float16 |" in p.stdout and (tmp_path / "gpu_check.md").is_file()


def test_corrupted_kernel_output_fails_the_check(tmp_path: Path) -> None:
    p, r = _check(tmp_path, "--sections", "kernels_correctness", GPU_CHECK_CORRUPT="1")
    assert p.returncode == 1
    corr = r["kernels_correctness"]
    assert corr["status"] == "fail" and r["summary"]["failed"] == ["kernels_correctness"]
    assert corr["counts"]["pass"] == 0 and corr["counts"]["fail"] > 0
    assert r["env"]["reason"] == "not selected (--sections)"


def test_budget_skips_sections_and_out_defaults_to_dollar_out(tmp_path: Path) -> None:
    p, r = _check(tmp_path, "--budget-s", "1", OUT=str(tmp_path))
    assert p.returncode == 0
    assert all(r[s]["status"] == "skipped" and r[s]["reason"].startswith("budget:") for s in SECTIONS)


def test_compare_flags_wrong_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 8, generator=g, dtype=torch.float64)
    assert compare(ref.half(), ref, TOL[torch.float16])["status"] == "pass"
    assert compare(ref.float() * 1.01, ref, TOL[torch.float32])["status"] == "fail"
    assert compare(ref.T.contiguous(), ref.T.contiguous() + 1, 1e-2)["status"] == "fail"
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert compare(nan, ref, 1.0)["status"] == "fail"
    assert compare(ref[:, :4], ref, 1.0)["status"] == "fail"
    assert compare(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64), 1.0)["status"] == "fail"
