"""Block tuning's memory on one large block: peak RSS above the resident block while tune_block runs, with the
tuner's one-node weight (quantize/tune.py) against the plain-autograd weight it replaced (the baseline, measured in
the same run: the tuner as it was at --baseline REV). Each measurement is a fresh child process (ru_maxrss is a per-process high-water mark).

    python scripts/bench_tune_memory.py --size 3b --tokens 64 --batches 2 --iters 3 --repeats 3 --baseline a9e26d0

The block is one decoder layer of make_big_model.py's SIZES (3b: hidden 3072, MLP 8192, 113 M weights), random
fp32, every linear layer RTN 3-bit g128 with U = W (GPTQ's compensated weights would be the same size).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tune_module(rev: str):
    """hawqtool.quantize.tune as it is, or (rev) as it was at that git revision, loaded inside the package."""
    import importlib.util

    from hawqtool.quantize import tune

    if rev == "current":
        return tune
    src = subprocess.run(["git", "show", f"{rev}:hawqtool/quantize/tune.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    with tempfile.TemporaryDirectory() as tmp:  # outside the source tree; the module name places it in the package
        path = Path(tmp) / f"_tune_{rev}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"hawqtool.quantize._tune_{rev}", path)
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _rss_kib() -> int:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmRSS"))


def child(a) -> dict:
    """One measurement: build the block, capture its inputs, tune; the peak and the RSS before tuning."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from make_big_model import SIZES
    from hawqtool.blocks import capture_block_inputs, find_blocks, run_block
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.quantize.quantizer import QuantSpec, rtn

    tune = _tune_module(a.tuner)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SIZES[a.size], "num_hidden_layers": 1, "vocab_size": 1024})
    model = LlamaForCausalLM(cfg).eval()
    block = find_blocks(model)[1][0]
    ids = torch.randint(0, 1024, (a.batches, a.tokens), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(model, block, [{"input_ids": ids[j:j + 1]} for j in range(a.batches)])
    with torch.no_grad():
        targets = [run_block(block, inputs, j) + 0.01 for j in range(a.batches)]
    layers = {n: m for n, m in quantizable_layers(model).items() if n.startswith("model.layers.0.")}
    spec = QuantSpec(bits=3, group_size=128, symmetric=False)
    weights = {n: rtn(weight_matrix(m), spec) for n, m in layers.items()}
    updated = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    before = _rss_kib()
    t0 = time.perf_counter()
    res = tune.tune_block(block, layers, weights, updated, inputs, targets, iters=a.iters, scale_lr=0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_w = sum(weight_matrix(m).numel() for m in layers.values())
    return dict(tuner=a.tuner, before_kib=before, peak_kib=peak, extra_gib=(peak - before) / 2**20,
                seconds=time.perf_counter() - t0, block_weights=n_w, loss_after=res.loss_after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="3b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--baseline", default="a9e26d0", help="git revision of the tuner to compare with")
    ap.add_argument("--tuner", help=argparse.SUPPRESS)  # child mode: "current" or a revision
    a = ap.parse_args()
    if a.tuner:
        print(json.dumps(child(a)))
        return
    from _record import cpu_name, load_now, record

    rows = {}
    for w in (a.baseline, "current"):
        runs = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--tuner", w] + [f"--{k}={getattr(a, k)}" for k in
                                                              ("size", "tokens", "batches", "iters")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
        rows[w] = runs
    assert rows["current"][0]["loss_after"] == rows[a.baseline][0]["loss_after"], "the two tuners differ"
    med = {w: (statistics.median(r["extra_gib"] for r in runs), statistics.median(r["seconds"] for r in runs),
               statistics.median(r["before_kib"] for r in runs) / 2**20) for w, runs in rows.items()}
    n_w = rows["current"][0]["block_weights"]
    table = ["| tuner | RSS before tuning (GiB) | peak above it (GiB), median | tune_block s, median |",
             "|---|---|---|---|"]
    table += [f"| {w} | {b:.2f} | {e:.2f} | {s:.1f} |" for w, (e, s, b) in med.items()]
    record(f"Block tuning memory, one {a.size} block ({n_w / 1e6:.0f} M weights)",
           f"machine: {cpu_name()}, one thread each; load: {load_now()}  \n{a.batches} × {a.tokens} tokens, "
           f"{a.iters} steps, {a.repeats} fresh processes per row; the final loss is equal in both rows "
           f"({rows['current'][0]['loss_after']:.6g}).", table, a.append)


if __name__ == "__main__":
    main()
