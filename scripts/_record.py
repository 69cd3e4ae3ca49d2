"""Shared by the benchmark scripts: the machine line and appending a result block to RESULTS.md."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo ('?' elsewhere)."""
    try:
        return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def load_now() -> str:
    """`uptime` output: the load average a result was measured under."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def record(title: str, details: str, table: list[str], append: bool) -> str:
    """Print (and with `append`, add to RESULTS.md) a block: title with date, the command, details, table."""
    script = Path(sys.argv[0]).name
    text = (f"\n### {title} — {datetime.now():%Y-%m-%d %H:%M}\n\n"
            f"`python scripts/{script} {' '.join(sys.argv[1:])}`  \n{details}\n\n" + "\n".join(table) + "\n")
    print(text)
    if append:
        with open(RESULTS, "a") as f:
            f.write(text)
    return text


def seed_rows(configs, seeds, run) -> list[dict]:
    """run(config, seed) -> result dict with "ppl", for every config and seed (each printed as a JSON line); one
    row per config: its first seed's result plus the per-seed perplexities and their median."""
    import json
    import statistics

    rows = []
    for cfg in configs:
        per_seed = []
        for seed in seeds:
            per_seed.append(run(cfg, seed))
            print(json.dumps(per_seed[-1]), flush=True)
        ppls = [r["ppl"] for r in per_seed]
        rows.append(dict(per_seed[0], ppls=ppls, median=statistics.median(ppls)))
    return rows
