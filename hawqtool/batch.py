"""`hawqtool batch JOBS.yaml`: many `hawqtool run`s from one file, each in its own process and folder.

A jobs file holds `defaults` (run settings shared by every job: RunConfig keys, as in a recipe) and `jobs`, each
with a `name`, optionally a `recipe` and any run settings; an `avg_bits` list makes the job a sweep whose budgets
share one sensitivity report (computed by the first, copied to the others, where its fingerprint makes `run`
skip the stage). Job J writes OUT/J/ (a sweep: OUT/J/bits-B/) with its settings (job.yaml) and its log
(job.log); `run`'s fingerprints make a rerun resume every job where it stopped, and a failed job stops none of
the others. With --gpus, one job per GPU runs at a time on each (CUDA_VISIBLE_DEVICES); otherwise one after
another. OUT/batch_summary.json has one row per job and budget."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .errors import UserError

@dataclass
class Unit:
    """One `hawqtool run` of the batch: a job, or one budget of a sweep."""

    job: str
    folder: Path
    settings: dict  # RunConfig keys (model, avg_bits, ...) written to folder/job.yaml
    shares_with: Path | None = None  # the sweep's first folder, whose sensitivity.json this one reuses


@dataclass
class Outcome:
    """What one unit did (a row of batch_summary.json)."""

    job: str
    folder: str
    state: str  # done | failed
    exit_code: int
    seconds: float
    error: str = ""
    summary: dict = field(default_factory=dict)


def read_jobs(path: Path) -> tuple[dict, list[dict]]:
    """(defaults, jobs) of a jobs file, every key checked as a recipe's (recipe.load_recipe's rules)."""
    from .recipe import check_settings, load_recipe, read_yaml

    p = Path(path)
    data = read_yaml(p, "jobs file", "pass a YAML file with `jobs:` (see README, Batch jobs)")
    if isinstance(data, dict) and (unknown := sorted(set(data) - {"defaults", "jobs"})):
        raise UserError(f"jobs file {p} has unknown top-level key {unknown[0]!r}; use `defaults:` and `jobs:`")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise UserError(f"jobs file {p} must be a mapping with a non-empty `jobs:` list")
    defaults = check_settings(data.get("defaults") or {}, f"jobs file {p} defaults")
    jobs, names = [], set()
    for k, job in enumerate(data["jobs"]):
        where = f"jobs file {p} job {k + 1}"
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not job["name"].strip():
            raise UserError(f"{where} needs a `name:` (its output folder)")
        name = job["name"]
        if "/" in name or name.startswith(".") or name in names or len(name) > 200 or \
                any(ord(c) < 32 for c in name):
            raise UserError(f"{where}: name {name[:60]!r} must be unique, at most 200 characters, without '/' or "
                            "control characters, and not start with '.'")
        names.add(name)
        settings = dict(defaults)
        if "recipe" in job:
            if not isinstance(job["recipe"], str):
                raise UserError(f"{where} ({name}): recipe must be a path to a YAML recipe, got {job['recipe']!r}")
            recipe = Path(job["recipe"])
            settings.update(load_recipe(recipe if recipe.is_absolute() else p.parent / recipe))
        own = {k_: v for k_, v in job.items() if k_ not in ("name", "recipe")}
        sweep = own.pop("avg_bits", None)
        settings.update(check_settings(own, f"{where} ({name})"))
        budgets = sweep if isinstance(sweep, list) else [sweep] if sweep is not None else [settings.get("avg_bits")]
        for b in budgets:
            check_settings({"avg_bits": b}, f"{where} ({name})") if b is not None else None
        folders = [f"bits-{b:g}" for b in budgets if b is not None]
        if len(set(folders)) < len(folders):  # each budget's run has its own folder, named by the budget
            raise UserError(f"{where} ({name}): avg_bits lists budgets that name the same folder "
                            f"({', '.join(folders)}); give each budget once")
        jobs.append({"name": name, "settings": settings, "budgets": budgets, "sweep": isinstance(sweep, list)})
    return defaults, jobs


def plan_units(jobs: list[dict], out: Path) -> list[list[Unit]]:
    """The runs, grouped: a sweep's budgets run in order in one group (they share its sensitivity)."""
    groups = []
    for job in jobs:
        units, first = [], None
        for b in job["budgets"]:
            folder = out / job["name"] / f"bits-{b:g}" if job["sweep"] else out / job["name"]
            settings = {**job["settings"], **({"avg_bits": float(b)} if b is not None else {})}
            units.append(Unit(job["name"], folder, settings, shares_with=first))
            first = first or folder
        groups.append(units)
    return groups


def run_unit(unit: Unit, gpu: str | None, say: Callable[[str], None]) -> Outcome:
    """`hawqtool run` of one unit in a child process (its own log), which dies with the batch."""
    from .artifacts import write_atomic

    from .outputs import RUN_MARKER

    unit.folder.mkdir(parents=True, exist_ok=True)
    (unit.folder / RUN_MARKER).touch()  # the batch made this folder for `run`: it is a run folder from the start
    recipe = unit.folder / "job.yaml"
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unit.settings.items()}
    write_atomic(recipe, yaml.safe_dump({**settings, "out": str(unit.folder)}, sort_keys=True))
    if unit.shares_with is not None:
        shared, mine = unit.shares_with / "sensitivity.json", unit.folder / "sensitivity.json"
        if shared.is_file() and not mine.exists():  # `run` checks its fingerprint: a stale one is recomputed
            write_atomic(mine, shared.read_text())
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    cmd = [sys.executable, "-m", "hawqtool", "run", str(recipe)]  # progress lines (not a TTY) go to job.log
    say(f"{unit.job} ({unit.folder.name}): started{f' on GPU {gpu}' if gpu is not None else ''}")
    t0 = time.perf_counter()
    with open(unit.folder / "job.log", "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, preexec_fn=_die_with_parent)
        child.wait()
    secs = round(time.perf_counter() - t0, 1)
    if child.returncode == 0:
        try:
            summary = json.loads((unit.folder / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        say(f"{unit.job} ({unit.folder.name}): done in {secs:.0f} s")
        return Outcome(unit.job, str(unit.folder), "done", 0, secs, summary=summary)
    error = _last_error(unit.folder / "job.log")
    say(f"{unit.job} ({unit.folder.name}): failed (exit {child.returncode}): {error}")
    return Outcome(unit.job, str(unit.folder), "failed", child.returncode, secs, error=error)


def _run_unit_or_fail(unit: Unit, gpu: str | None, say: Callable[[str], None]) -> Outcome:
    """run_unit, with anything it raises (its folder unwritable, a disk full) recorded as that unit's failure: a
    worker thread that died would drop the unit from the summary and leave the batch's exit code 0."""
    try:
        return run_unit(unit, gpu, say)
    except Exception as e:  # noqa: BLE001 - reported in the summary and the exit code, not lost
        error = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
        say(f"{unit.job} ({unit.folder.name}): failed before it ran: {error}")
        return Outcome(unit.job, str(unit.folder), "failed", 1 if isinstance(e, (UserError, OSError)) else 2, 0.0,
                       error=error)


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the batch process dies (Linux), so a killed batch leaves no run behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_error(log: Path) -> str:
    """The error line a failed run printed last (its log's last non-empty line otherwise)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    return (errors or lines or ["(no output)"])[-1][:300]


def select(jobs: list[dict], only: str | None) -> list[dict]:
    """The jobs `--only` names (a job's name or its 0-based index, e.g. $SLURM_ARRAY_TASK_ID); all without it."""
    if only is None:
        return jobs
    for k, job in enumerate(jobs):
        if only in (job["name"], str(k)):
            return [job]
    raise UserError(f"--only {only!r} is not a job of the file: give a name ({', '.join(j['name'] for j in jobs)}) "
                    f"or an index 0..{len(jobs) - 1}")


def run_batch(jobs_file: Path, out: Path, *, gpus: list[str] | None = None, only: str | None = None,
              say: Callable[[str], None] = lambda _m: None) -> list[Outcome]:
    """Run every job of the file (see the module doc), or the one `only` names; returns one Outcome per run, in
    the file's order. The summary is OUT/batch_summary.json (with `only`: OUT/JOB/batch_summary.json, so the
    tasks of a Slurm array do not overwrite each other's)."""
    from .outputs import BATCH_MARKER

    _, jobs = read_jobs(jobs_file)
    jobs = select(jobs, only)
    groups = plan_units(jobs, Path(out))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / BATCH_MARKER).touch()
    todo: queue.Queue = queue.Queue()
    for k, g in enumerate(groups):
        todo.put((k, g))
    results: dict[int, list[Outcome]] = {}

    def worker(gpu: str | None) -> None:
        while True:
            try:
                k, group = todo.get_nowait()
            except queue.Empty:
                return
            results[k] = [_run_unit_or_fail(u, gpu, say) for u in group]

    threads = [threading.Thread(target=worker, args=(g,)) for g in (gpus or [None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = [o for k in range(len(groups)) for o in results.get(k, [])]
    write_summary(Path(out) / jobs[0]["name"] if only is not None else Path(out), outcomes)
    return outcomes


def write_summary(out: Path, outcomes: list[Outcome]) -> None:
    from .artifacts import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "batch_summary.json", json.dumps({"kind": "batch_summary", "jobs": [asdict(o) for o in outcomes]},
                                                          indent=1))


def row(o: Outcome) -> dict:
    """The table's view of an outcome: bits, bytes, score, seconds, peak memory."""
    s = o.summary
    kind = next((k for k in ("ppl", "cosine", "top1_agreement") if f"mixed_{k}" in s), None)
    return {"job": o.job, "run": Path(o.folder).name, "state": o.state, "bits": s.get("mixed_avg_bits"),
            "bytes": s.get("mixed_bytes"), "score": s.get(f"mixed_{kind}"),
            "score_kind": {"top1_agreement": "top-1", None: ""}.get(kind, kind),
            "seconds": o.seconds, "peak_rss_gib": (s["peak_rss_bytes"] / 2**30) if "peak_rss_bytes" in s else None,
            "error": o.error}


def check_gpus(spec: str | None) -> list[str] | None:
    """--gpus 0,1,2,3: the CUDA device numbers jobs are spread over (None: one job at a time, default device)."""
    if spec is None:
        return None
    ids = [g.strip() for g in spec.split(",")]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--gpus {spec!r} must list distinct CUDA device numbers like 0,1,2,3")
    return ids

