"""Block activations spilled to disk (hawqtool/spill.py, issue 16) against kept in memory: the quantize stage's peak
anonymous memory (what the kernel cannot drop under pressure), peak RSS and wall time, and that both give the same
weights. Each run is a fresh child process; the configurations alternate, `--repeats` times.

    OMP_NUM_THREADS=1 python scripts/bench_spill.py --blocks 2 --nsamples 1024 --seqlen 64 --tune-iters 2 \
        --repeats 2 --append

The model is the embedded SmolLM2-135M (or --model), quantized 3-bit g128 by GPTQ (+ block tuning, whose float chain
is a second list of activations) on its first `--blocks` blocks; `--offload` streams it. Peaks are sampled from
/proc/self/status every 50 ms (RssAnon, VmRSS)."""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record  # noqa: E402


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            out[key] = int(rest.split()[0])
    return out


def child(a) -> dict:
    """One quantize run in this process: its peaks, wall time and a digest of the weights."""
    import torch

    from hawqtool.allocate.plan import fixed_plan, plan_specs
    from hawqtool.data import calibration_windows
    from hawqtool.models import load_model, quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions, quantize_model
    from hawqtool.spill import Spill, nbytes

    peak = _status_kib()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for k, v in _status_kib().items():
                peak[k] = max(peak[k], v)

    loaded = load_model(a.model, offload=a.offload)
    ids = calibration_windows(loaded.tokenizer, "wiki", a.nsamples, a.seqlen, seed=0)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    prefixes = tuple(f"model.layers.{i}." for i in range(a.blocks))
    specs = {n: s for n, s in plan_specs(fixed_plan(shapes, 3)).items() if n.startswith(prefixes)}
    base = {k: 0 for k in peak}
    base.update(_status_kib())
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=a.spill_dir) as tmp, Spill(Path(tmp), 0 if a.spill else None) as sp:
        res = quantize_model(loaded.model, specs, ids, QuantizeOptions(tune_iters=a.tune_iters), spill=sp)
        spilled = sp.folder is not None
    wall = time.perf_counter() - t0
    done.set()
    h = hashlib.sha256()
    for n in sorted(res):
        h.update(res[n].weight.dequantize().numpy().tobytes())
    hidden = loaded.model.config.hidden_size
    act = nbytes([torch.empty(a.nsamples, a.seqlen, hidden)])
    return dict(spill=a.spill, spilled=spilled, wall=wall, anon_gib=peak["RssAnon"] / 2**20,
                rss_gib=peak["VmRSS"] / 2**20, base_anon_gib=base["RssAnon"] / 2**20, act_gib=act / 2**30,
                digest=h.hexdigest()[:16])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (short windows: the block's own "
                    "temporaries, which grow with the window, are small beside the lists of activations)")
    ap.add_argument("--tune-iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--spill-dir", default=None, help="where the spill folder is made (default: the temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spill", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.model is None:
        from hawqtool.models import default_model_path

        a.model = str(default_model_path())
    argv = [sys.executable, __file__, "--child", "--model", a.model, "--blocks", str(a.blocks), "--nsamples",
            str(a.nsamples), "--seqlen", str(a.seqlen), "--tune-iters", str(a.tune_iters)] + \
        (["--offload"] if a.offload else []) + (["--spill-dir", a.spill_dir] if a.spill_dir else [])
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(a.repeats):
        for spill in (False, True):
            out = subprocess.run(argv + (["--spill"] if spill else []), capture_output=True, text=True, check=True)
            runs[spill].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[spill][-1]), flush=True)
    digests = {d["digest"] for rs in runs.values() for d in rs}
    if len(digests) != 1:
        raise SystemExit(f"the runs' weights differ: {sorted(digests)}")
    if not all(d["spilled"] for d in runs[True]) or any(d["spilled"] for d in runs[False]):
        raise SystemExit("a spill run kept its activations in memory, or a memory run spilled")
    med = {s: {k: statistics.median(d[k] for d in rs) for k in ("wall", "anon_gib", "rss_gib")}
           for s, rs in runs.items()}
    act = runs[False][0]["act_gib"]
    lines = ["| activations | peak anonymous memory (GiB) | peak RSS (GiB) | wall (s) | runs (anon GiB) |",
             "|---|---|---|---|---|"]
    for s, label in ((False, "in memory (the baseline)"), (True, "spilled to disk (limit 0)")):
        lines.append(f"| {label} | {med[s]['anon_gib']:.2f} | {med[s]['rss_gib']:.2f} | {med[s]['wall']:.0f} | "
                     + ", ".join(f"{d['anon_gib']:.2f}" for d in runs[s]) + " |")
    details = (f"machine: {cpu_name()} ({platform.machine()}); model {a.model}{' streamed' if a.offload else ''}, "
               f"blocks 0..{a.blocks - 1} 3-bit g128 GPTQ + {a.tune_iters} tuning steps, {a.nsamples} × {a.seqlen} "
               f"calibration tokens: {act:.2f} GiB per list of block activations; medians of {a.repeats} runs each "
               f"(alternating); every run's weights equal (sha256 {digests.pop()}); load: {load_now()}")
    record("Block activations spilled to disk against in memory (quantize stage)", details, lines, a.append)


if __name__ == "__main__":
    main()
