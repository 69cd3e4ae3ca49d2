"""`hawqtool run` in memory and streamed (`--offload`) with the same options: each run's peak RSS (os.wait4) and wall
time, the streamed peak as a share of the in-memory one, and whether the two agree (plan layers, every checkpoint's
model.safetensors sha256, perplexities), appended to benchmarks/RESULTS.md (issue 16: streamed ≤ 35% of in memory).

    OMP_NUM_THREADS=1 python scripts/bench_stream_run.py --work /tmp/sr -- --avg-bits 3.0 --no-uniform

Options after `--` go to both runs unchanged. Memory does not depend on the probe count or the tuning steps (the
same tensors, more often), so `--max-probes 4 --tune-iters 2` give the default run's peaks in a fraction of its
time. `--parallel` runs the two at once (peaks are per process; wall times then share the cores)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record  # noqa: E402
from hawqtool.integrity import sha256_file  # noqa: E402


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, float]:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT), time.perf_counter()


def finish(proc: subprocess.Popen, t0: float) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a started child."""
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024


def outcome(out: Path) -> dict:
    """What a run folder holds that the two runs must agree on."""
    summary = json.loads((out / "summary.json").read_text())
    ppl = {k: v for k, v in summary.items() if "ppl" in k and isinstance(v, (int, float))}
    plan = json.loads((out / "plan.json").read_text())["layers"] if (out / "plan.json").is_file() else None
    ckpts = {p.parent.name: sha256_file(p) for p in sorted(out.glob("*/model.safetensors"))}
    return {"ppl": ppl, "plan": plan, "ckpts": ckpts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the two run folders and their logs (created)")
    ap.add_argument("--parallel", action="store_true", help="run both at once")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then `hawqtool run` options for both")
    a = ap.parse_args()
    extra = a.run_args[1:] if a.run_args[:1] == ["--"] else a.run_args
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hw = [sys.executable, "-m", "hawqtool", "run", "-q"] + extra
    cmds = {"in memory": hw + ["-o", str(work / "mem")], "streamed": hw + ["--offload", "-o", str(work / "offload")]}
    res = {}
    if a.parallel:
        procs = {k: start(c, work / f"{k.replace(' ', '_')}.log") for k, c in cmds.items()}
        res = {k: finish(*p) for k, p in procs.items()}
    else:
        for k, c in cmds.items():
            res[k] = finish(*start(c, work / f"{k.replace(' ', '_')}.log"))
    for k, (code, secs, rss) in res.items():
        print(f"{k}: exit {code}, {secs:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        if code:
            sys.exit(f"{k} run failed (exit {code}): see {work}/{k.replace(' ', '_')}.log")
    mem, off = outcome(work / "mem"), outcome(work / "offload")
    same_ckpt = mem["ckpts"] == off["ckpts"] and bool(mem["ckpts"])
    details = (f"machine: {cpu_name()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
               f"{'both at once' if a.parallel else 'one after the other'}; load: {load_now()}  \n"
               f"plan layers equal: {mem['plan'] == off['plan']}; checkpoints sha256-equal: {same_ckpt} "
               f"({', '.join(f'{k} {v[:12]}' for k, v in mem['ckpts'].items())}); perplexities: in memory "
               f"{mem['ppl']}, streamed {off['ppl']}")
    peak = {k: r[2] for k, r in res.items()}
    table = ["| run | wall s | peak RSS GiB | share of in memory |", "|---|---|---|---|"]
    table += [f"| {k} | {r[1]:.0f} | {r[2] / 2**30:.2f} | {r[2] / peak['in memory']:.0%} |" for k, r in res.items()]
    record("`hawqtool run` streamed against in memory: peak RSS and agreement", details, table,
           append=not a.no_record)


if __name__ == "__main__":
    main()
