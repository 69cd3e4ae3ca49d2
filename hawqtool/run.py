"""`hawqtool run`: the whole chain with resumable, fingerprinted stages.

OUT/ holds sensitivity.json, plan.json, plan_uniform.json, mixed/ and uniform/
checkpoints, eval_*.json and summary.json. A stage whose artifact exists with the same
fingerprint (model files, data, options, tool version) is skipped, which is also how a
killed run resumes; quantize additionally resumes inside a checkpoint at the last block.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import artifacts
from .allocate.plan import allocate_bits, uniform_bytes, uniform_plan, omega_table
from .artifacts import fingerprint, write_atomic
from .checkpoint import is_checkpoint, read_manifest
from .data import calibration_windows, data_fingerprint, eval_windows
from .errors import UserError
from .evaluate import perplexity
from .models import load_model
from .progress import Reporter
from .report import write_sensitivity_report
from .quantize.driver import QuantizeOptions
from .runtime import load_quantized
from .stages import (compute_sensitivity, layer_weights, model_digest, quantize_stage, sensitivity_fingerprint,
                     sensitivity_settings)

log = logging.getLogger("hawqtool")


@dataclass
class RunConfig:
    """Everything `hawqtool run` needs; the defaults are the embedded default job."""

    model: str | None = None
    out: Path = Path("out")
    calib: str = "wiki"
    data: str = "wiki"
    avg_bits: float = 3.0
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    symmetric: bool = False
    nsamples: int = 32
    seqlen: int = 512
    sens_samples: int = 8
    sens_seqlen: int = 256
    sens_max_probes: int = 32
    sens_min_probes: int = 8
    sens_target: float = 0.10
    eval_seqlen: int = 512
    eval_windows: int = 40
    seed: int = 0
    method: str = "gptq"
    act_order: bool = False
    trust_remote_code: bool = False
    stage_seconds: dict = field(default_factory=dict)


def _current(path: Path, fp: str, kind: str | None = None) -> bool:
    """True if the artifact at path exists and carries fingerprint fp."""
    try:
        if kind == "checkpoint":
            return is_checkpoint(path) and read_manifest(path, verify=False).get("fingerprint") == fp
        return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fp
    except (OSError, ValueError, artifacts.UserError):
        return False


def run_pipeline(cfg: RunConfig, rep: Reporter) -> dict:
    """Run load → sensitivity → allocate → quantize (mixed and uniform) → eval; returns the summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    secs: dict[str, float] = {}

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        r = fn()
        secs[stage] = round(secs.get(stage, 0.0) + time.perf_counter() - t0, 2)
        return r

    loaded = timed("load", lambda: load_model(cfg.model, trust_remote_code=cfg.trust_remote_code))
    if loaded.task != "causal-lm":
        raise UserError(f"`hawqtool run` scores perplexity, and {loaded.source} is an encoder; run the stages "
                        "instead: sensitivity --objective output-mse, allocate, quantize, eval")
    mdig = timed("load", lambda: model_digest(loaded))
    tok = loaded.tokenizer
    ckey = fingerprint(data_fingerprint(cfg.calib), cfg.seed)
    windows = timed("data", lambda: eval_windows(tok, cfg.data, cfg.eval_seqlen, cfg.eval_windows))
    eval_key = fingerprint(data_fingerprint(cfg.data), cfg.eval_seqlen, cfg.eval_windows)

    def evaluate(name: str, model_fp: str, get_model) -> dict:
        path, fp = out / f"eval_{name}.json", fingerprint("eval", model_fp, eval_key)
        if _current(path, fp):
            rep.skip(f"eval {name}")
            return json.loads(path.read_text())
        with rep.bar(f"eval {name}", len(windows)) as adv:
            res = perplexity(get_model(), windows, progress=adv)
        d = {**asdict(res), "fingerprint": fp}
        write_atomic(path, json.dumps(d, indent=1))
        return d

    base = timed("eval", lambda: evaluate("baseline", mdig, lambda: loaded.model))

    sens_path = out / "sensitivity.json"
    sens_settings = sensitivity_settings(objective="self-kl", batch_size=2, qerror_bits=cfg.bit_choices,
                                         qerror_groups=(cfg.group_size,), n_samples=cfg.sens_samples,
                                         seqlen=cfg.sens_seqlen, target_rel_se=cfg.sens_target,
                                         min_probes=cfg.sens_min_probes, max_probes=cfg.sens_max_probes, seed=cfg.seed,
                                         estimator="fisher")  # what compute_sensitivity's "auto" picks for self-kl
    sens_fp = sensitivity_fingerprint(mdig, ckey, sens_settings)
    if _current(sens_path, sens_fp):
        rep.skip("sensitivity")
        report = artifacts.load(sens_path, "sensitivity")
    else:
        sens_ids = calibration_windows(tok, cfg.calib, cfg.sens_samples, cfg.sens_seqlen, seed=cfg.seed + 1)
        with rep.probe_bar(cfg.sens_max_probes) as cb:
            report = timed("sensitivity", lambda: compute_sensitivity(
                loaded, sens_ids, batch_size=2, target_rel_se=cfg.sens_target, min_probes=cfg.sens_min_probes,
                max_probes=cfg.sens_max_probes, seed=cfg.seed, progress=cb, data_key=ckey,
                qerror_bits=tuple(cfg.bit_choices), qerror_groups=(cfg.group_size,),
                resume_path=Path(str(sens_path) + ".partial")))
        artifacts.save(report, sens_path)

    layer_w = layer_weights(loaded)  # views of the loaded model's weights, no copy

    def weights() -> dict:
        return layer_w
    plan = timed("allocate", lambda: allocate_bits(report, weights, avg_bits=cfg.avg_bits,
                                                   bit_choices=cfg.bit_choices, group_size=cfg.group_size,
                                                   symmetric=cfg.symmetric))
    artifacts.save(plan, out / "plan.json")
    timed("report", lambda: write_sensitivity_report(report, out, plan))
    _, nbytes = omega_table(report, weights, list(cfg.bit_choices), cfg.group_size, cfg.symmetric)
    ubits = max(b for b in cfg.bit_choices
                if uniform_bytes(nbytes, sorted(cfg.bit_choices), b) <= plan.budget["max_bytes"] * (1 + 1e-9))
    uplan = uniform_plan(report, weights, ubits, group_size=cfg.group_size, symmetric=cfg.symmetric)
    artifacts.save(uplan, out / "plan_uniform.json")

    calib_ids = timed("data", lambda: calibration_windows(tok, cfg.calib, cfg.nsamples, cfg.seqlen, seed=cfg.seed))
    opts = QuantizeOptions(method=cfg.method, act_order=cfg.act_order)
    results = {}
    for name, p in (("mixed", plan), ("uniform", uplan)):
        ck = out / name
        qfp = fingerprint("quantize", mdig, ckey, p.fingerprint, asdict(opts), [asdict(lp) for lp in p.layers])
        if _current(ck, qfp, "checkpoint"):
            rep.skip(f"quantize {name}")
        else:
            fresh = timed("load", lambda: load_model(cfg.model, trust_remote_code=cfg.trust_remote_code))
            with rep.bar(f"quantize {name}", len(p.layers)) as adv:
                timed("quantize", lambda: quantize_stage(fresh, p, calib_ids, opts, ck, data_key=ckey,
                                                         progress=lambda _n: adv(1)))
            del fresh
        results[name] = timed("eval", lambda: evaluate(name, qfp, lambda: load_quantized(ck)))
        results[name]["quantize_seconds"] = read_manifest(ck, verify=False).get("quantize_seconds", 0.0)

    summary = {
        "model": loaded.source, "method": cfg.method, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
        "baseline_ppl": base["ppl"],
        "uniform_bits": ubits, "uniform_ppl": results["uniform"]["ppl"], "uniform_bytes": uplan.total_bytes,
        "uniform_avg_bits": uplan.avg_bits,
        "mixed_avg_bits": plan.avg_bits, "mixed_ppl": results["mixed"]["ppl"], "mixed_bytes": plan.total_bytes,
        "mixed_bits_histogram": {str(b): sum(1 for lp in plan.layers if lp.bits == b) for b in plan.bit_choices},
        "seconds": {"baseline_eval": base["seconds"], "uniform_quantize": results["uniform"]["quantize_seconds"],
                    "uniform_eval": results["uniform"]["seconds"], "mixed_quantize": results["mixed"]["quantize_seconds"],
                    "mixed_eval": results["mixed"]["seconds"]},
        "budget": plan.budget, "eval_tokens": base["tokens"], "eval_windows": base["windows"],
        "eval_seqlen": base["seqlen"], "calib_samples": cfg.nsamples, "calib_seqlen": cfg.seqlen,
        "sensitivity_probes": max(ls.probes for ls in report.layers),
        "stage_seconds": secs, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
