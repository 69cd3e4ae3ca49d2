"""Streamed execution (`--offload`) on a model larger than memory: each stage as its own process, with its wall
time and peak RSS (os.wait4), appended to benchmarks/RESULTS.md (issue 16).

    python scripts/make_big_model.py /tmp/big3b --size 3b
    OMP_NUM_THREADS=1 python scripts/bench_offload.py /tmp/big3b --work /tmp/big3b-work --max-memory 3GiB

Small settings throughout (random weights make perplexity meaningless: the figures are that every stage
completes, its peak RSS, and its seconds per block). `--stages` picks some of sensitivity, allocate,
quantize, eval (the baseline, streamed), eval_ckpt (quantize's checkpoint, streamed) and eval_ckpt_whole (the same,
loaded whole)."""
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


def timed(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of one command run as a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--work", required=True, help="folder for the stages' outputs (created)")
    ap.add_argument("--max-memory", default="3GiB")
    ap.add_argument("--stages", default="sensitivity,allocate,quantize,eval")
    ap.add_argument("--bits", default="4", help="widths measured and allocated (the searched-grid error of each "
                                                "option costs ~0.16 s per million weights on one core)")
    ap.add_argument("--avg-bits", default="3.5")
    ap.add_argument("--grid", default="minmax", help="quantize's grid (search costs as much again per layer)")
    ap.add_argument("--ckpt", default=None, help="the checkpoint eval_ckpt* score (default: WORK/ckpt, quantize's)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hw = [sys.executable, "-m", "hawqtool"]
    ckpt = Path(a.ckpt) if a.ckpt else work / "ckpt"
    mem = ["--max-memory", a.max_memory]
    cmds = {
        "sensitivity": hw + ["sensitivity", a.model, "-o", str(work / "sens.json"), "--nsamples", "1", "--seqlen", "64",
                             "--batch-size", "1", "--min-probes", "2", "--max-probes", "2", "--bits", a.bits,
                             "--overwrite", "-q"] + mem,
        "allocate": hw + ["allocate", str(work / "sens.json"), "--bits", a.bits, "--avg-bits", a.avg_bits,
                          "-o", str(work / "plan.json"), "--overwrite", "-q"],
        "quantize": hw + ["quantize", a.model, "--plan", str(work / "plan.json"), "-o", str(work / "ckpt"),
                          "--nsamples", "2", "--seqlen", "64", "--grid", a.grid, "--overwrite", "-q"] + mem,
        "eval": hw + ["eval", a.model, "--windows", "2", "--seqlen", "64", "--json"] + mem,
        # the quantized checkpoint: streamed (its blocks' packed tensors read while each runs), and loaded whole
        "eval_ckpt": hw + ["eval", str(ckpt), "--windows", "2", "--seqlen", "64", "--json"] + mem,
        "eval_ckpt_whole": hw + ["eval", str(ckpt), "--windows", "2", "--seqlen", "64", "--json"],
    }
    blocks = json.loads((Path(a.model) / "config.json").read_text()).get("num_hidden_layers", 0)
    rows = []
    for stage in a.stages.split(","):
        print("$", " ".join(cmds[stage]), flush=True)
        code, secs, rss = timed(cmds[stage])
        rows.append((stage, code, secs, rss))
        print(f"{stage}: exit {code}, {secs:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        if code:
            break
    size = sum(f.stat().st_size for f in Path(a.model).glob("*.safetensors"))
    details = (f"machine: {cpu_name()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load: {load_now()}  \n"
               f"model: {a.model}, {size / 1e9:.2f} GB of safetensors, {blocks} blocks; --max-memory {a.max_memory}; "
               f"commands: " + "; ".join(f"`{' '.join(cmds[s][2:])}`" for s, *_ in rows))
    table = ["| stage | exit | wall s | s per block | peak RSS GiB |", "|---|---|---|---|---|"]
    table += [f"| {s} | {c} | {t:.0f} | {t / blocks:.1f} | {r / 2**30:.2f} |" for s, c, t, r in rows]
    record("Streamed stages (--offload) on a model larger than memory", details, table, append=not a.no_record)


if __name__ == "__main__":
    main()
