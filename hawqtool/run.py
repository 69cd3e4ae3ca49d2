"""`hawqtool run`: the whole chain with resumable, fingerprinted stages.

OUT/ holds sensitivity.json, plan.json, plan_uniform.json, mixed/ and uniform/
checkpoints, eval_*.json and summary.json (scores; sizes as bits per linear weight and as
whole-file bits per parameter, with the safetensors file size: sizes.py). A stage whose
artifact exists with the same fingerprint (model files, data, options, tool version) is
skipped, which is also how a killed run resumes; quantize additionally resumes inside a
checkpoint at the last block. `embed_bits` 4/6/8 quantizes the input embedding (and a head
tied to it) in both plans; --avg-bits still counts the linear layers only. `formats` (gguf, or ggml
types) makes the plans choose ggml block types, for `export --format gguf`; --avg-bits is then bits per
linear weight, and the uniform plan is the largest single type within that budget (none if no type fits).

Causal LMs are scored by perplexity on `data`; image classifiers (timm) by top-1 agreement and
mean KL against the full-precision model on the fixed image set `hawqtool eval` uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import artifacts
from .allocate.options import parse_formats
from .allocate.budgets import uniform_bytes
from .allocate.plan import omega_table, uniform_ggml_plan, uniform_plan
from .artifacts import fingerprint, write_atomic
from .checkpoint import is_checkpoint, read_manifest
from .checkpoint_stream import wants_streaming
from .data import calibration_windows, data_fingerprint, eval_windows, with_special_tokens
from .embedding import check_embed_options, embedding_plan
from .device import resolve_device, resolve_dtype
from .outputs import RUN_MARKER
from .streaming import parse_memory, streamer_of
from .errors import UserError
from .evaluate import classification_fidelity, embedding_fidelity, perplexity
from .inputs import calibration_inputs, calibration_key
from .models import LoadedModel, load_model, quantizable_layers
from .hooks import Hooks, Silent
from .report import write_sensitivity_report
from .options import AllocateOptions, EvalOptions, QuantizeOptions, SensitivityOptions
from .quantize.driver import first_token_weight_for, nsamples_for
from .runtime import load_quantized
from .sizes import checkpoint_sizes, model_sizes, predict_file
from .allocate_stage import allocate_stage, budget_inputs, offered_formats, write_sweep_of
from .evaluate_stage import EVAL_IMAGES, EVAL_IMAGE_SEED, vision_eval_images
from .stages import (compute_sensitivity, layer_weights, model_digest, quantize_fingerprint, quantize_stage,
                     report_settings, sensitivity_fingerprint)

log = logging.getLogger("hawqtool")
VISION = "image-classification"
ENCODER = "encoder"  # scored by the embedding cosine against the full-precision model, like `hawqtool eval`
TASKS = ("causal-lm", VISION, ENCODER)


@dataclass
class RunConfig:
    """Everything `hawqtool run` needs; the defaults are the embedded default job."""

    model: str | None = None
    out: Path = Path("out")
    calib: str = "wiki"
    data: str = EvalOptions.data
    avg_bits: float = 3.0
    bit_choices: tuple[int, ...] = SensitivityOptions.bits
    group_size: int | None = None  # one group size for every layer; None: each layer's chosen among the measured ones
    symmetric: bool = False
    nsamples: int | None = None  # GPTQ calibration windows; None: quantize.driver.nsamples_for the model and method
    seqlen: int = QuantizeOptions.seqlen
    sens_samples: int = SensitivityOptions.nsamples
    sens_seqlen: int = SensitivityOptions.seqlen
    sens_max_probes: int = SensitivityOptions.max_probes
    sens_min_probes: int = SensitivityOptions.min_probes
    sens_target: float = SensitivityOptions.target_rel_se
    eval_seqlen: int = EvalOptions.seqlen
    eval_windows: int = EvalOptions.windows
    eval_images: int = EVAL_IMAGES  # vision: Fashion-MNIST images beside the sample photos (as `hawqtool eval`)
    seed: int = 0
    method: str = QuantizeOptions.method
    act_order: bool = QuantizeOptions.act_order
    embed_bits: int = 16  # 4/6/8: the input embedding (and a head tied to it) quantized too; 16 keeps it
    embed_group_size: int = -1  # its scales: one per row (-1) or per group of this many hidden units
    formats: str = ""  # "gguf" or ggml types (Q4_K,Q4_0,...): plans in ggml block types; "" = hawqtool's own grid
    trust_remote_code: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N (device.resolve_device)
    dtype: str = "auto"  # the model's compute dtype: auto = bfloat16 on CUDA, float32 on the CPU
    uniform: bool = True  # also quantize and score the uniform comparison (False: one quantize, for large models)
    offload: bool = False  # stream the model block by block from its files (streaming.py)
    max_memory: str | None = None  # e.g. "3GiB": stream when the weights exceed it
    sensitivity: dict = field(default_factory=dict)  # SensitivityOptions fields (options.NESTED): objective, ...
    allocate: dict = field(default_factory=dict)  # AllocateOptions fields (options.NESTED): pins, ties, ...
    quantize: dict = field(default_factory=dict)  # QuantizeOptions fields (options.NESTED): percdamp, grid, ...
    stage_seconds: dict = field(default_factory=dict)


@dataclass
class _TaskData:
    """A run's task-specific data: calibration inputs and their fingerprints, the eval set and its scorer."""

    sens_key: str  # fingerprint of the sensitivity calibration data
    calib_key: str  # fingerprint of the GPTQ calibration data
    sens_inputs: Callable[[], torch.Tensor]
    calib_inputs: Callable[[], torch.Tensor]
    sens_seqlen: int  # what compute_sensitivity records as `seqlen` (dim 1 of its inputs)
    eval_key: str
    eval_items: int  # eval windows or images (progress bar length)
    score: Callable[[torch.nn.Module, Callable], dict]  # model, progress -> eval result dict


def _current(path: Path, fp: str, kind: str | None = None) -> bool:
    """True if the artifact at path exists and carries fingerprint fp (a checkpoint: and is intact; a
    damaged one is recomputed, never trusted)."""
    try:
        if kind == "checkpoint":
            if not (is_checkpoint(path) and read_manifest(path, verify=False).get("fingerprint") == fp):
                return False
            try:
                read_manifest(path)  # every file listed, no symlinks, sha256 equal
            except artifacts.UserError as e:
                log.warning("%s: it is recomputed", e)
                return False
            return True
        return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fp
    except (OSError, ValueError, artifacts.UserError):
        return False


def _text_data(loaded: LoadedModel, cfg: RunConfig) -> _TaskData:
    """Token windows of `calib`, perplexity on `data` windows (fingerprints as before vision support)."""
    tok = loaded.tokenizer
    ckey = fingerprint(data_fingerprint(cfg.calib), cfg.seed)
    windows = eval_windows(tok, cfg.data, cfg.eval_seqlen, cfg.eval_windows)
    return _TaskData(
        sens_key=ckey, calib_key=ckey, sens_seqlen=cfg.sens_seqlen,
        sens_inputs=lambda: calibration_windows(tok, cfg.calib, cfg.sens_samples, cfg.sens_seqlen, seed=cfg.seed + 1),
        calib_inputs=lambda: calibration_windows(tok, cfg.calib, cfg.nsamples, cfg.seqlen, seed=cfg.seed),
        eval_key=fingerprint(data_fingerprint(cfg.data), cfg.eval_seqlen, cfg.eval_windows), eval_items=len(windows),
        score=lambda model, adv: asdict(perplexity(model, windows, progress=adv)))


def _encoder_data(loaded: LoadedModel, cfg: RunConfig) -> _TaskData:
    """Token windows as for an LM; scored by the mean-pooled embedding's cosine with the unquantized model's (the
    windows wrapped in [CLS] ... [SEP], as `hawqtool eval` does)."""
    td = _text_data(loaded, cfg)
    windows = with_special_tokens(eval_windows(loaded.tokenizer, cfg.data, cfg.eval_seqlen, cfg.eval_windows),
                                  loaded.tokenizer)
    reference = loaded.model  # never modified: sensitivity only reads it, quantize works on a fresh copy
    td.eval_key = fingerprint("eval-encoder", td.eval_key)
    td.score = lambda model, adv: asdict(embedding_fidelity(reference, model, windows, progress=adv))
    return td


def _tensor_digest(x: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (no copy for a contiguous CPU tensor)."""
    return hashlib.sha256(memoryview(x.detach().cpu().contiguous().numpy()).cast("B")).hexdigest()


def _image_data(loaded: LoadedModel, cfg: RunConfig) -> _TaskData:
    """Calibration images (fingerprinted by content, as `hawqtool sensitivity/quantize` do) and the eval images."""
    if cfg.data not in ("wiki", "images"):
        raise UserError(f"--data {cfg.data!r}: image classifiers are scored on the built-in image set; "
                        "use --data images (and --eval-images N)")
    if cfg.eval_images < 0:
        raise UserError(f"--eval-images must be 0 or more, got {cfg.eval_images}")
    sens_x = calibration_inputs(loaded, cfg.calib, cfg.sens_samples, 0, seed=cfg.seed + 1)
    calib_x = calibration_inputs(loaded, cfg.calib, cfg.nsamples, 0, seed=cfg.seed)
    images, _ = vision_eval_images(loaded.model, cfg.eval_images)
    reference = loaded.model  # never modified: sensitivity only reads it, quantize works on a fresh copy
    return _TaskData(
        sens_key=calibration_key(loaded, cfg.calib, sens_x, cfg.seed),
        calib_key=calibration_key(loaded, cfg.calib, calib_x, cfg.seed),
        sens_inputs=lambda: sens_x, calib_inputs=lambda: calib_x, sens_seqlen=int(sens_x.shape[1]),
        eval_key=fingerprint("eval-images", _tensor_digest(images), EVAL_IMAGE_SEED), eval_items=len(images),
        score=lambda model, adv: asdict(classification_fidelity(reference, model, images, progress=adv)))


def run_pipeline(cfg: RunConfig, rep: Hooks | None = None) -> dict:
    """Run load → sensitivity → allocate → quantize (mixed and uniform) → eval; returns the summary. Progress goes
    through `rep`'s callables (the CLI's rich Reporter; nothing by default)."""
    rep = rep or Silent()
    check_embed_options(cfg.embed_bits, cfg.embed_group_size)  # before any work
    fmts = parse_formats(cfg.formats)
    if fmts and cfg.embed_bits != 16:
        raise UserError("--formats keeps the embedding for the GGUF export to write (`export --embed-type`); "
                        "drop --embed-bits")
    if fmts and cfg.allocate.get("sweep"):
        raise UserError("allocate.sweep does not take formats yet; drop one of them from the recipe")
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    mem = dict(offload=cfg.offload, max_memory=parse_memory(cfg.max_memory) if cfg.max_memory is not None else None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()  # a run killed in its first stage resumes in this folder (outputs.is_own_output)
    secs: dict[str, float] = {}

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        r = fn()
        secs[stage] = round(secs.get(stage, 0.0) + time.perf_counter() - t0, 2)
        return r

    loaded = timed("load", lambda: load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=dev, dtype=dt,
                                              **mem))
    if loaded.task not in TASKS:
        raise UserError(f"`hawqtool run` handles causal LMs, encoders and image classifiers, not {loaded.task} "
                        f"({loaded.source}); run the stages instead: sensitivity, allocate, quantize, eval")
    vision = loaded.task == VISION
    if vision and fmts:
        raise UserError("--formats (ggml types) is for language models' Linear layers; drop it for image classifiers")
    mdig = timed("load", lambda: model_digest(loaded))
    encoder = loaded.task == ENCODER
    if cfg.nsamples is None:
        cfg = replace(cfg, nsamples=nsamples_for(loaded, cfg.method))
    td = timed("data", lambda: (_image_data if vision else _encoder_data if encoder else _text_data)(loaded, cfg))

    def evaluate(name: str, model_fp: str, get_model) -> dict:
        path, fp = out / f"eval_{name}.json", fingerprint("eval", model_fp, td.eval_key)
        if _current(path, fp):
            rep.skip(f"eval {name}")
            return json.loads(path.read_text())
        with rep.bar(f"eval {name}", td.eval_items) as adv:
            d = {**td.score(get_model(), adv), "fingerprint": fp}
        write_atomic(path, json.dumps(d, indent=1))
        return d

    # an image classifier's reference is itself (agreement 1, KL 0): only the LM baseline is measured
    base = None if vision or encoder else timed("eval", lambda: evaluate("baseline", mdig, lambda: loaded.model))

    sens_path = out / "sensitivity.json"
    # the attention-sink weighting is for causal LMs (as `hawqtool quantize`); sensitivity weights its
    # ‖Q(W)−W‖² with the same input importance that quantize's H uses
    ftw = first_token_weight_for(loaded)
    # an encoder has no logits for self-KL: its layers are ranked by what its evaluation scores, the cosine of the
    # mean-pooled embedding (unless the recipe says otherwise). Chosen over output-mse on the validation slice
    # (scripts/bench_encoder.py with plans from either report, benchmarks/RESULTS.md 2026-12-07)
    objective = {"objective": "pooled-cosine"} if encoder else {}
    # a recipe's `sensitivity:` section (objective, estimator, ...) plus the run's own settings
    aopts = AllocateOptions(**cfg.allocate)  # a recipe's `allocate:` section
    # the report measures the formats the allocator will offer (ggml types need none of hawqtool's own)
    if fmts:
        groups = {"group_sizes": (), "scale_bits": 16}
    elif aopts.group_sizes:
        groups = {"group_sizes": tuple(aopts.group_sizes)}
    elif cfg.group_size is not None:
        groups = {"group_size": cfg.group_size, "group_sizes": ()}
    else:
        groups = {}
    if not fmts and aopts.scale_bits is not None:
        groups["scale_bits"] = aopts.scale_bits
    sens_opts = SensitivityOptions(**{**objective, **cfg.sensitivity, "bits": tuple(cfg.bit_choices), **groups,
                                      "sym": (cfg.symmetric,), "formats": tuple(fmts), "target_rel_se": cfg.sens_target,
                                      "min_probes": cfg.sens_min_probes, "max_probes": cfg.sens_max_probes,
                                      "first_token_weight": ftw})
    sens_settings = report_settings(loaded, sens_opts, n_samples=cfg.sens_samples, seqlen=td.sens_seqlen,
                                    seed=cfg.seed)
    sens_fp = sensitivity_fingerprint(mdig, td.sens_key, sens_settings)
    if _current(sens_path, sens_fp):
        rep.skip("sensitivity")
        report = artifacts.load(sens_path, "sensitivity")
    else:
        sens_ids = td.sens_inputs()
        with rep.probe_bar(cfg.sens_max_probes) as cb:
            report = timed("sensitivity", lambda: compute_sensitivity(
                loaded, sens_ids, sens_opts, seed=cfg.seed, progress=cb, data_key=td.sens_key,
                resume_path=Path(str(sens_path) + ".partial"),
                qerror_progress=rep.lines("quantization error per layer", len(quantizable_layers(loaded.model)))))
        if report.fingerprint != sens_fp:  # would re-run every time; a bug, not a user error
            log.warning("sensitivity fingerprint differs from the run's; the stage will not be skipped next time")
        artifacts.save(report, sens_path)
    if sens_opts.eigen and "eigen" not in report.settings:  # also when a report without them is reused
        from .stages import add_top_eigenvalues

        timed("sensitivity", lambda: add_top_eigenvalues(report, loaded, td.sens_inputs(), sens_opts.objective,
                                                         max_iters=sens_opts.eigen_iters, seed=cfg.seed))
        artifacts.save(report, sens_path)

    layer_w: dict = {}

    def weights() -> dict:  # read only if the report lacks an option's error (views of the model's weights)
        if not layer_w:
            layer_w.update(layer_weights(loaded))
        return layer_w
    emb = embedding_plan(loaded.model, cfg.embed_bits, cfg.embed_group_size, cfg.symmetric,
                         [ls.name for ls in report.layers])
    ainputs = timed("allocate", lambda: budget_inputs(report, aopts, model=cfg.model, calib=cfg.calib,
                                                      profile_cache=out / "sensitivity.profile.json"))
    plan = timed("allocate", lambda: allocate_stage(
        report, weights, aopts, avg_bits=cfg.avg_bits if aopts.max_bytes is None else None,
        bit_choices=tuple(cfg.bit_choices), group_size=cfg.group_size, symmetric=cfg.symmetric, embedding=emb,
        formats=tuple(fmts), inputs=ainputs))
    plan.file = predict_file(loaded.model, plan)
    artifacts.save(plan, out / "plan.json")
    if aopts.sweep:
        timed("allocate", lambda: write_sweep_of(report, weights, plan, aopts, ainputs,
                                                 bit_choices=tuple(cfg.bit_choices), group_size=cfg.group_size,
                                                 symmetric=cfg.symmetric, output=out / "plan.json"))
    timed("report", lambda: write_sensitivity_report(report, out, plan))
    if fmts:
        uplan = uniform_ggml_plan(report, weights, fmts, plan.budget["max_bytes"])
        ubits = uplan.layers[0].ggml_type if uplan is not None else None
    else:
        # the coarsest group offered: what --avg-bits is measured against (allocate/budgets.py), 128 by default
        offered, codes = offered_formats(report, aopts, cfg.group_size)
        ugroup = max((g for g in offered if g > 0), default=-1)
        _, nbytes = omega_table(report, weights, list(cfg.bit_choices), ugroup, cfg.symmetric)
        ubits = max(b for b in cfg.bit_choices
                    if uniform_bytes(nbytes, list(cfg.bit_choices), b) <= plan.budget["max_bytes"] * (1 + 1e-9))
        uplan = uniform_plan(report, weights, ubits, group_size=ugroup, symmetric=cfg.symmetric, embedding=emb,
                             scale_bits=codes)  # the same quantizer as the mixed plan
    if uplan is not None:
        uplan.file = predict_file(loaded.model, uplan)
        artifacts.save(uplan, out / "plan_uniform.json")
    else:
        log.warning("no single ggml type of %s fits every layer within the budget: no uniform plan to compare",
                    ", ".join(fmts))

    calib_ids = timed("data", td.calib_inputs)
    sizes: dict[str, dict] = {}
    opts = QuantizeOptions(**{"first_token_weight": ftw, **cfg.quantize, "method": cfg.method, "act_order": cfg.act_order})
    results = {}
    with contextlib.ExitStack() as stack:
        st = streamer_of(loaded.model)
        if st is not None and not (vision or encoder):
            # the baseline model's embedding and head (1.2 GB for a 3B Llama in fp32) wait on disk while the
            # checkpoints are made and scored: nothing reads them until the summary
            park = out / ".hawqtool-parked"  # a fixed name: a killed run's files are overwritten, then removed
            stack.callback(lambda: park.rmdir() if park.is_dir() and not any(park.iterdir()) else None)
            stack.enter_context(st.parked(park))
        for name, p in (("mixed", plan), ("uniform", uplan if cfg.uniform else None)):
            if p is None:  # no uniform plan fits (ggml types), or none asked for: every figure None
                results[name], sizes[name] = {k: None for k in ("ppl", "top1_agreement", "mean_kl", "cosine",
                                                                "cosine_min")} | {"seconds": 0.0, "quantize_seconds": 0.0}, {}
                continue
            ck = out / name
            qfp = quantize_fingerprint(mdig, td.calib_key, tuple(calib_ids.shape), p, opts)
            qsecs = 0.0  # this run's; the checkpoint records no timings (same inputs, same bytes)
            if _current(ck, qfp, "checkpoint"):
                rep.skip(f"quantize {name}")
            else:
                fresh = timed("load", lambda: load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=dev,
                                                         dtype=dt, **mem))
                q0 = time.perf_counter()
                with rep.bar(f"quantize {name}", len(p.layers)) as adv:
                    timed("quantize", lambda: quantize_stage(fresh, p, calib_ids, opts, ck, data_key=td.calib_key,
                                                             progress=lambda _n: adv(1)))
                qsecs = round(time.perf_counter() - q0, 2)
                del fresh
            # a checkpoint streams as the model did (--offload, --max-memory); one without a streamed form loads whole
            stream = wants_streaming(ck, dev, **mem, strict=False)
            results[name] = timed("eval", lambda: evaluate(name, qfp, lambda: load_quantized(ck, device=dev, dtype=dt,
                                                                                             offload=stream)))
            results[name]["quantize_seconds"] = qsecs
            sizes[name] = checkpoint_sizes(ck)

    hist = Counter(lp.ggml_type or str(lp.bits) for lp in plan.layers)
    common = {"uniform_bits": ubits, "uniform_bytes": uplan and uplan.total_bytes, "uniform_avg_bits": uplan and uplan.avg_bits,
              "mixed_avg_bits": plan.avg_bits, "mixed_bytes": plan.total_bytes,
              "mixed_bits_histogram": {k: hist[k] for k in sorted(hist)} if fmts else
              {str(b): hist[str(b)] for b in plan.bit_choices},
              "embed_bits": cfg.embed_bits, "baseline_file_bits_per_param": model_sizes(loaded.model)["file_bits_per_param"],
              **{f"{k}_{f}": sizes[k].get(f) for k in ("uniform", "mixed") for f in ("file_bits_per_param", "file_bytes",
                                                                                       "tensor_bytes")}}
    seconds = {f"{k}_{what}": results[k][field_] for k in ("uniform", "mixed")
               for what, field_ in (("quantize", "quantize_seconds"), ("eval", "seconds"))}
    head = {"model": loaded.source, "task": loaded.task, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
            "offload": streamer_of(loaded.model) is not None,
            "method": cfg.method, "group_size": cfg.group_size,  # None: chosen per layer among group_sizes
            "group_sizes": sorted({lp.group_size for lp in plan.layers if not lp.ggml_type}),
            "symmetric": cfg.symmetric, **({"formats": fmts} if fmts else {})}
    tail = {"sensitivity_probes": max(ls.probes for ls in report.layers), "stage_seconds": secs,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if vision:
        u, m = results["uniform"], results["mixed"]
        summary = {**head, **common, "uniform_top1_agreement": u["top1_agreement"], "uniform_mean_kl": u["mean_kl"],
                   "mixed_top1_agreement": m["top1_agreement"], "mixed_mean_kl": m["mean_kl"], "seconds": seconds,
                   "budget": plan.budget, "eval_images": m["images"], "calib_samples": cfg.nsamples,
                   "sens_samples": cfg.sens_samples, **tail}
    elif encoder:
        u, m = results["uniform"], results["mixed"]
        summary = {**head, **common, "uniform_cosine": u["cosine"], "uniform_cosine_min": u["cosine_min"],
                   "mixed_cosine": m["cosine"], "mixed_cosine_min": m["cosine_min"], "seconds": seconds,
                   "budget": plan.budget, "eval_windows": m["windows"], "eval_seqlen": m["seqlen"],
                   "calib_samples": cfg.nsamples, "calib_seqlen": cfg.seqlen, **tail}
    else:
        summary = {**head, "baseline_ppl": base["ppl"], **common, "uniform_ppl": results["uniform"]["ppl"],
                   "mixed_ppl": results["mixed"]["ppl"], "seconds": {"baseline_eval": base["seconds"], **seconds},
                   "budget": plan.budget, "eval_tokens": base["tokens"], "eval_windows": base["windows"],
                   "eval_seqlen": base["seqlen"], "calib_samples": cfg.nsamples, "calib_seqlen": cfg.seqlen, **tail}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
