"""The pipeline's stages as library calls over plain objects; the CLI wraps these."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from .artifacts import LayerSensitivity, Plan, SensitivityReport, files_digest, fingerprint, layer_records
from .checkpoint import save_checkpoint
from .device import model_device, model_dtype
from .streaming import streamer_of
from .errors import UserError
from .inputs import batches_of
from .models import LoadedModel, quantizable_layers, tied_head_name, untie_head, weight_matrix
from .options import FISHER_OBJECTIVES, SensitivityOptions
from .quantize.driver import QuantizeOptions, quantize_model
from .allocate.plan import plan_specs
from .sensitivity.settings import (ESTIMATORS, _qerrors, convergence_summary,  # noqa: F401
                                  hvp_for, options_settings, sensitivity_fingerprint)

log = logging.getLogger("hawqtool")


def model_digest(loaded: LoadedModel) -> str:
    """Fingerprint of the model's files (or its id when it has no local files), and of its compute dtype when
    that is not float32 (a bfloat16 run measures and quantizes a different model; the device does not count)."""
    digest = files_digest(loaded.files) if loaded.files else loaded.source
    dtype = model_dtype(loaded.model)
    return digest if dtype == torch.float32 else f"{digest}:{str(dtype).replace('torch.', '')}"


def check_finite_ids(ids: torch.Tensor, what: str) -> None:
    if ids.numel() == 0:
        raise UserError(f"{what} is empty; give more text")


# compute_sensitivity's keyword names of before the options object (issue 17), still accepted
_LEGACY = {"qerror_bits": "bits", "qerror_groups": "group_sizes", "qerror_sym": "sym", "qerror_formats": "formats"}


def sensitivity_options(options: SensitivityOptions | None = None, **overrides) -> SensitivityOptions:
    """`options` (default SensitivityOptions()) with `overrides` by field name (or compute_sensitivity's
    former keyword names); an unknown name is a TypeError, as for any function."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(SensitivityOptions)}
    fields = {_LEGACY.get(k, k): v for k, v in overrides.items()}
    bad = sorted(set(fields) - names)
    if bad:
        raise TypeError(f"compute_sensitivity() got unexpected keyword arguments: {', '.join(bad)}")
    for k in ("bits", "group_sizes", "sym", "formats"):
        if k in fields:
            fields[k] = tuple(fields[k])
    return dataclasses.replace(options or SensitivityOptions(), **fields)


def report_settings(loaded: LoadedModel, opts: SensitivityOptions, *, n_samples: int, seqlen: int,
                    seed: int) -> dict:
    """What a sensitivity report of `loaded` with these options records and fingerprints (`run` compares it to
    skip the stage)."""
    settings = options_settings(opts, n_samples=n_samples, seqlen=seqlen, seed=seed)
    head = tied_head_name(loaded.model) if opts.quantize_head else None
    if head is not None:  # only then, so existing fingerprints stay valid
        settings["untied_head"] = head
    if opts.checkpoint_blocks:  # recorded (same estimate, but the report says how it was run)
        settings["checkpoint_blocks"] = True
    if opts.only is not None:
        settings["only"] = opts.only
    return settings


def compute_sensitivity(loaded: LoadedModel, calib_ids: torch.Tensor, options: SensitivityOptions | None = None, *,
                        seed: int = 0, progress: Callable | None = None, data_key: str = "",
                        resume_path: Path | None = None, qerror_progress: Callable[[int], None] | None = None,
                        **overrides) -> SensitivityReport:
    """Per-layer traces of the objective's Hessian over the quantizable layers, plus ‖Q(W)−W‖² for the options'
    widths, group sizes, grids and formats, so `allocate` needs no model. `options` (SensitivityOptions) says
    how; `overrides` replace its fields by name (e.g. max_probes=8).

    `resume_path`: probes done so far are kept there (for this fingerprint) and reused by a re-run, and so are
    the layers whose ‖Q(W)−W‖² is done (RESUME_PATH.qerror).
    `estimator`: "hutchinson" (Hessian-vector products) or "fisher" (sampled labels, one backward per probe;
    self-kl / output-mse / pooled-cosine). `quantize_head`: also measure an output head tied to the input embedding
    (untied first, so the embedding stays full precision). `checkpoint_blocks`: activation checkpointing of the
    blocks; for the double-backward and Fisher paths, not the forward-mode GGN one. `first_token_weight`: weight
    of each sequence's first position in the inputs' importance that weights ‖Q(W)−W‖² (quantize's H uses the
    same). `only`: a regex; measure just the layers it matches. `qerror_progress(1)` after each layer's
    ‖Q(W)−W‖² (minutes on billion-parameter models)."""
    from .sensitivity import fisher_traces, hutchinson_traces

    opts = sensitivity_options(options, **overrides)
    objective, batch_size, only = opts.objective, opts.batch_size, opts.only
    quantize_head, checkpoint_blocks, max_seconds = opts.quantize_head, opts.checkpoint_blocks, opts.max_seconds
    qerror_bits, qerror_groups, qerror_sym, qerror_formats = opts.bits, opts.groups(), tuple(opts.sym), opts.formats
    estimator = opts.resolved_estimator()
    if estimator not in ESTIMATORS:
        raise UserError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if estimator == "fisher" and objective not in FISHER_OBJECTIVES:
        raise UserError(f"estimator 'fisher' supports objectives {', '.join(FISHER_OBJECTIVES)}, not "
                        f"{objective!r} (the empirical Fisher needs per-position gradients); use 'hutchinson'")

    if model_dtype(loaded.model) == torch.float16:  # per-position gradients are ~1/N of the loss's: below fp16's range
        raise UserError("sensitivity backpropagates without loss scaling, so float16 gradients underflow; use "
                        "--dtype bfloat16 (float32's exponent range) or float32")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if objective == "labels" and loaded.task != "causal-lm":
        raise UserError("objective 'labels' needs a causal LM (its labels are the next tokens); use "
                        "--objective output-mse for an encoder")
    if objective == "self-kl" and loaded.task == "encoder":  # its softmax would run over the hidden state
        raise UserError("an encoder has no logits for objective self-kl; use --objective pooled-cosine (its mean-pooled "
                        "embedding, what `eval` scores) or output-mse")
    if objective == "pooled-cosine" and loaded.task != "encoder":
        raise UserError(f"objective 'pooled-cosine' scores an encoder's mean-pooled embedding, and this model is a "
                        f"{loaded.task}; use --objective self-kl (causal LMs) or output-mse")
    if checkpoint_blocks and estimator != "fisher" and hvp_for(objective) == "ggn":
        raise UserError(f"--checkpoint-blocks works with --objective labels or --estimator fisher; objective "
                        f"{objective!r} uses forward-mode products that checkpointing does not support")
    model = loaded.model
    streamed = streamer_of(model) is not None
    if streamed and (objective not in FISHER_OBJECTIVES or quantize_head
                     or (estimator == "hutchinson" and hvp_for(objective) != "ggn")):
        raise UserError("a streamed model (--offload) is measured with objective self-kl or output-mse (--estimator "
                        "fisher or hutchinson) or pooled-cosine (--estimator fisher), and without --quantize-head; "
                        "change those options or load it in memory")
    settings = report_settings(loaded, opts, n_samples=len(calib_ids), seqlen=int(calib_ids.shape[1]), seed=seed)
    if quantize_head:
        untie_head(model)
    layers = quantizable_layers(model)
    if only is not None:
        import re

        layers = {n: m for n, m in layers.items() if re.search(only, n)}
    if not layers:
        raise UserError("the model has no quantizable layers (Linear/Conv/Conv1D)"
                        + (f" matching {only!r}" if only is not None else ""))
    params = {n: m.weight for n, m in layers.items()}
    batches = batches_of(loaded, calib_ids, batch_size)
    if objective == "labels":  # classic HAWQ: cross-entropy on the text's own next tokens
        batches = [{**b, "labels": b["input_ids"]} for b in batches]
    t0 = time.perf_counter()
    info: dict = {}
    fp = sensitivity_fingerprint(model_digest(loaded), data_key, settings)
    log_ = qlog = None
    if resume_path is not None:
        from .sensitivity.distributed import world
        from .sensitivity.resume import ProbeLog, QerrorLog

        log_ = ProbeLog(resume_path, fp, writer=world()[0] == 0)
        qlog = QerrorLog(Path(str(resume_path) + ".qerror"), fp, writer=world()[0] == 0)
    common = dict(target_rel_se=opts.target_rel_se, min_probes=opts.min_probes, max_probes=opts.max_probes,
                  max_seconds=max_seconds, seed=seed, progress=progress, info=info, resume=log_)
    from .sensitivity.memory import checkpointed_blocks

    with checkpointed_blocks(model) if checkpoint_blocks else contextlib.nullcontext():
        if streamed:
            from .sensitivity.streamed import streamed_traces

            common.pop("max_seconds")
            traces = streamed_traces(model, params, batches, objective, estimator, max_seconds=max_seconds,
                                     major_fraction=0.01, **common)
            described = ("fisher (sampled labels, one backward per probe" if estimator == "fisher" else
                         "hutchinson (ggn Hessian-vector products") + "; streamed block by block)"
        elif estimator == "fisher":
            traces = fisher_traces(model, params, batches, objective, **common)
            described = "fisher (sampled labels, one backward per probe)"
        else:
            traces = hutchinson_traces(model, params, batches, objective, hvp=hvp_for(objective), **common)
            described = f"hutchinson ({hvp_for(objective)} Hessian-vector products)"
    bad = [n for n, t in traces.items() if not (t.mean == t.mean)]
    if bad:
        raise UserError(f"calibration produced NaN Hessian traces (e.g. {bad[0]}); check the model and data for NaN")
    from .quantize.importance import input_importance

    if streamed:
        from .sensitivity.streamed import stored_weight, streamed_importance

        imp = streamed_importance(model, layers, batches_of(loaded, calib_ids, batch_size), opts.first_token_weight)
        matrix = lambda n: stored_weight(model, n).to(model_device(model))  # noqa: E731
    else:
        imp = input_importance(model, layers, batches_of(loaded, calib_ids, batch_size), opts.first_token_weight)
        matrix = lambda n: weight_matrix(layers[n])  # noqa: E731
    out = []
    done = qlog.load() if qlog is not None else {}  # a killed run's error pass, layer by layer
    for n, t in traces.items():
        if n not in done:
            done[n] = _qerrors(matrix(n), qerror_bits, qerror_groups, imp.get(n), qerror_sym, tuple(qerror_formats),
                               opts.scale_bits)
            if qlog is not None:
                qlog.save(done)
        out.append(LayerSensitivity(name=n, shape=list(weight_matrix(layers[n]).shape), n_params=t.n_params,
                                    trace=t.mean, stderr=t.stderr, probes=t.probes, samples=list(t.samples),
                                    qerror=done[n]))
        if qerror_progress:
            qerror_progress(1)
    report = SensitivityReport(model=loaded.source, objective=objective,
                               estimator=described,
                               settings=settings, layers=out, seconds=time.perf_counter() - t0,
                               convergence=convergence_summary(info, out))
    report.fingerprint = fp
    if log_ is not None:
        log_.clear()
        qlog.clear()
    return report


def add_top_eigenvalues(report: SensitivityReport, loaded: LoadedModel, calib_ids: torch.Tensor, objective: str,
                        *, batch_size: int = 2, max_iters: int = 20, tol: float = 1e-3, seed: int = 0,
                        progress: Callable | None = None) -> None:
    """Fill each layer's top Hessian eigenvalue (power iteration on its diagonal block) into the report."""
    from .sensitivity.eigen import top_eigenvalues

    layers = quantizable_layers(loaded.model)
    params = {ls.name: layers[ls.name].weight for ls in report.layers}
    batches = batches_of(loaded, calib_ids, batch_size)
    eig = top_eigenvalues(loaded.model, params, batches, objective, max_iters=max_iters, tol=tol, seed=seed,
                          hvp=hvp_for(objective), progress=progress)
    for ls in report.layers:
        ls.top_eigenvalue, ls.eigen_iterations = eig[ls.name].eigenvalue, eig[ls.name].iterations
    report.settings["eigen"] = {"max_iters": max_iters, "tol": tol,
                                "unconverged": [n for n, e in eig.items() if not e.converged]}


def layer_weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """[out, in] weight of every quantizable layer (a streamed model's read from its files)."""
    layers = quantizable_layers(loaded.model, include_tied_head=True)
    if streamer_of(loaded.model) is not None:
        from .sensitivity.streamed import stored_weight

        return {n: stored_weight(loaded.model, n) for n in layers}
    return {n: weight_matrix(m).detach().float() for n, m in layers.items()}


def check_plan_matches(plan: Plan, loaded: LoadedModel) -> None:
    """One-line error unless the plan covers exactly the model's quantizable layers: a planned layer the
    model lacks, or a quantizable layer the plan lacks (a plan made for another model whose names happen to
    be a subset would otherwise leave layers silently in full precision). A tied output head the plan
    quantizes is untied here first; a plan's embedding entry must name the model's (embedding.py)."""
    from .embedding import check_embedding_matches

    untie_head(loaded.model, {lp.name for lp in plan.layers})
    check_embedding_matches(plan.embedding, loaded.model)
    names = set(quantizable_layers(loaded.model))
    planned = {lp.name for lp in plan.layers}
    unknown, missing = sorted(planned - names), sorted(names - planned)
    if unknown:
        raise UserError(f"plan does not match the model: {len(unknown)} planned layers are not in it "
                        f"(e.g. {unknown[0]}); re-run `hawqtool allocate` on this model's sensitivity report")
    if missing:
        raise UserError(f"plan does not match the model: it covers {len(planned)} of the model's {len(names)} "
                        f"quantizable layers (e.g. {missing[0]} is missing); re-run `hawqtool allocate` on this "
                        "model's sensitivity report")


def quantize_fingerprint(model_fp: str, data_key: str, calib_shape: tuple[int, ...], plan: Plan,
                         opts: QuantizeOptions) -> str:
    """What a checkpoint depends on: the model, the calibration data (its source and its shape: windows × length, or
    the images), the plan and the quantizer's options. `run` compares it to decide whether a checkpoint is current."""
    return fingerprint("quantize", model_fp, data_key, list(calib_shape), plan.fingerprint, opts.fingerprint(),
                       layer_records(plan.layers))


def quantize_stage(loaded: LoadedModel, plan: Plan, calib_ids: torch.Tensor, opts: QuantizeOptions,
                   out_dir: Path, *, progress: Callable | None = None, data_key: str = "",
                   extra: dict | None = None) -> Path:
    """Quantize the model per the plan and write the checkpoint folder (atomically).

    Finished blocks are kept in OUT.partial/ so an interrupted run resumes there. The checkpoint records no
    timings: the same inputs and options give the same bytes."""
    check_plan_matches(plan, loaded)
    out_dir = Path(out_dir)
    state_dir = out_dir.with_name(out_dir.name + ".partial")
    key = quantize_fingerprint(model_digest(loaded), data_key, tuple(calib_ids.shape), plan, opts)
    act = {lp.name: lp.act_bits for lp in plan.layers}
    emb = None
    if plan.embedding is not None:  # first: GPTQ then calibrates the blocks on the quantized lookup
        from .quantize.driver import _batches
        from .quantize.embedding import quantize_embedding

        emb = quantize_embedding(loaded.model, plan.embedding,
                                 _batches(calib_ids, opts.batch_size, model_device(loaded.model), loaded.model))
    if opts.method == "aphq":
        from .aphq_stage import aphq_stage
        from .distributed import world

        if world()[1] > 1:
            raise UserError("APHQ runs in one process; launch `hawqtool quantize --method aphq` without torchrun")

        weights, info, extra = aphq_stage(loaded, plan, act, calib_ids, opts, state_dir, key, progress, extra)
        retried: list[str] = []
    else:
        results = quantize_model(loaded.model, plan_specs(plan), calib_ids, opts, state_dir=state_dir,
                                 state_key=key, progress=progress)
        weights = {n: r.weight for n, r in results.items()}
        info = {n: {**r.summary(), "act_bits": act.get(n, 16)} for n, r in results.items()}
        if opts.act_mode == "static":
            for n, q in static_activation_ranges(loaded.model, act, calib_ids, opts).items():
                info[n].update(act_mode="static", act_scale=float(q.scale), act_zero=float(q.zero))
        else:  # finer dynamic scales where the integer kernel applies them for free (depthwise, 1×1 convs)
            from .runtime import conv_act_granularity

            for n in info:
                g = conv_act_granularity(loaded.model.get_submodule(n))
                if act.get(n, 16) < 16 and g != "image":
                    info[n]["act_granularity"] = g
        retried = [n for n, r in results.items() if r.retries]
    if loaded.task == "image-classification":
        from .vision.loading import vision_manifest

        extra = {**vision_manifest(loaded), **(extra or {})}
    meta = {"source_model": loaded.source, "method": opts.method, "options": opts.fingerprint(),
            "plan": {"fingerprint": plan.fingerprint, "budget": plan.budget, "avg_bits": plan.avg_bits,
                     "total_bytes": plan.total_bytes, "predicted_omega": plan.predicted_omega},
            "calibration": {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "data": data_key},
            "retried_layers": retried, "fingerprint": key,
            **(extra or {})}
    from .distributed import barrier, world

    if world()[0] != 0:  # data parallel: every rank holds the same results; rank 0 writes them
        barrier()
        return out_dir
    path = save_checkpoint(out_dir, loaded.model, weights, layer_info=info, extra=meta, tokenizer=loaded.tokenizer,
                           embedding=emb)
    from .quantize.resume_state import BlockState

    BlockState(state_dir, key).clear()  # only the files it wrote: OUT.partial/ may hold a user's own (never rmtree)
    barrier()
    return path


def static_activation_ranges(model, act_bits: dict[str, int], calib_ids: torch.Tensor, opts: QuantizeOptions) -> dict:
    """Per-tensor asymmetric input ranges of the activation-quantized layers, calibrated (opts.act_calib) on
    the already weight-quantized model, so each range sees the inputs it will get at run time."""
    from .quantize.act_quant import calibrate_activation_quantizers
    from .quantize.driver import _batches

    if opts.act_calib not in ("minmax", "percentile", "mse"):
        raise UserError(f"--act-calib must be minmax, percentile or mse, got {opts.act_calib!r}")
    out = {}
    for bits in sorted({a for a in act_bits.values() if a < 16}):
        names = [n for n, a in act_bits.items() if a == bits]
        out.update(calibrate_activation_quantizers(model, names, _batches(calib_ids, opts.batch_size, model_device(model), model), bits,
                                                   opts.act_calib, symmetric=False, mse_min_ratio=0.05))
    return out


def lazy_weights(model_ref: str | None, trust_remote_code: bool = False) -> Callable[[], dict[str, torch.Tensor]]:
    """A loader that reads the model's layer weights once, only if called."""
    cache: dict = {}

    def get() -> dict[str, torch.Tensor]:
        if "w" not in cache:
            from .models import load_model

            cache["w"] = layer_weights(load_model(model_ref, trust_remote_code=trust_remote_code))
        return cache["w"]

    return get
