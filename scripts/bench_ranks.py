"""Data parallel `quantize` and `eval` under torchrun: wall time of 1 vs N ranks (one thread each), and that the N-rank
checkpoint and perplexity equal the 1-rank ones (issue 17). Appends to benchmarks/RESULTS.md.

    python scripts/bench_ranks.py PLAN.json [--model M] [--ranks 2] [--nsamples 32] [--windows 40] --work DIR

PLAN.json: a plan for the model (e.g. OUT/plan_uniform.json of `hawqtool run`). Ranks are processes on this
machine (gloo); with as many ranks as free cores the speed-up is what torchrun gives on one node of CPUs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record  # noqa: E402


def hawqtool(args: list[str], ranks: int) -> tuple[float, str]:
    """(wall seconds, stdout) of `hawqtool ARGS` on `ranks` processes (torchrun when more than one)."""
    launch = [sys.executable, "-m", "hawqtool"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "hawqtool"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(launch + args, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"failed ({ranks} ranks): {' '.join(args)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--work", required=True)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = [a.model] if a.model else []
    rows, digests, ppl = [], {}, {}
    for n in (1, a.ranks):
        ck = work / f"ckpt-{n}"
        secs, _ = hawqtool(["quantize", *model, "--plan", a.plan, "-o", str(ck), "--nsamples", str(a.nsamples),
                            "--seqlen", str(a.seqlen), "--overwrite", "-q"], n)
        digests[n] = hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
        esecs, out = hawqtool(["eval", str(ck), "--windows", str(a.windows), "--seqlen", str(a.seqlen), "--json"], n)
        ppl[n] = json.loads(out.strip().splitlines()[-1])["ppl"]
        rows.append((n, secs, esecs))
        print(f"{n} rank(s): quantize {secs:.0f} s, eval {esecs:.0f} s, ppl {ppl[n]:.4f}", flush=True)
    same = digests[1] == digests[a.ranks] and ppl[1] == ppl[a.ranks]
    details = (f"machine: {cpu_name()}, {os.cpu_count()} cores, one thread per rank (gloo); load: {load_now()}  \n"
               f"plan {a.plan}, {a.nsamples} calibration windows of {a.seqlen}, eval {a.windows} windows of {a.seqlen}. "
               f"{a.ranks}-rank checkpoint sha256 {'equals' if digests[1] == digests[a.ranks] else 'DIFFERS from'} "
               f"the 1-rank one ({digests[1][:12]}); perplexity {ppl[1]:.4f} vs {ppl[a.ranks]:.4f}.")
    table = ["| ranks | quantize s | eval s | speed-up (quantize / eval) |", "|---|---|---|---|"]
    table += [f"| {n} | {q:.0f} | {e:.0f} | {rows[0][1] / q:.2f} / {rows[0][2] / e:.2f} |" for n, q, e in rows]
    record("Data parallel quantize and eval under torchrun (1 vs N ranks)", details, table, append=not a.no_record)
    if not same:
        sys.exit("the N-rank results differ from the 1-rank ones")


if __name__ == "__main__":
    main()
