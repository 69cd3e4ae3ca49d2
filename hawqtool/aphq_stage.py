"""The quantize stage's APHQ branch (`--method aphq`): block reconstruction of encoders and ViTs, and what the
checkpoint's manifest records of it."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .allocate.plan import plan_specs
from .artifacts import Plan
from .device import model_device
from .errors import UserError
from .models import LoadedModel
from .quantize.driver import QuantizeOptions

log = logging.getLogger("hawqtool")


def aphq_stage(loaded: LoadedModel, plan: Plan, act: dict[str, int], calib_ids: torch.Tensor, opts: QuantizeOptions,
               state_dir: Path, key: str, progress: Callable | None, extra: dict | None) -> tuple[dict, dict, dict]:
    """APHQ-style block reconstruction: (weights, per-layer manifest info, manifest extras incl. act_fn)."""
    from .quantize.aphq import APHQOptions
    from .quantize.aphq_driver import aphq_quantize_model
    from .quantize.driver import _batches

    if loaded.task == "causal-lm":
        raise UserError("--method aphq reconstructs encoder/ViT blocks (non-causal); use --method gptq for causal LMs")
    if any(lp.ggml_type for lp in plan.layers):
        raise UserError("--method aphq learns hawqtool's own grid; a plan in ggml types (--formats) is quantized with "
                        "--method gptq or rtn")
    if any(lp.scale_bits != 16 for lp in plan.layers):
        raise UserError("--method aphq learns fp16 group scales, and this plan has scale codes (allocate's default): "
                        "make it with `allocate --scale-bits 16`, or quantize with --method gptq or rtn")
    if loaded.task == "image-classification":
        output_fn, loss = (lambda o: o), "kl"
    else:
        output_fn, loss = (lambda o: o.last_hidden_state), "mse"
    aopts = APHQOptions(iters=opts.aphq_iters, mlp_relu=opts.aphq_mlp_relu, batch_size=opts.batch_size)
    # each optimisation step draws aopts.batch_size rows from one calibration batch: batches at least that large
    res = aphq_quantize_model(loaded.model, plan_specs(plan), act, _batches(calib_ids, max(opts.batch_size, aopts.batch_size),
                                                                       model_device(loaded.model), loaded.model), output_fn,
                              aopts, loss=loss, state_dir=state_dir, state_key=key,
                              progress=(lambda msg: log.info("%s", msg)))
    if progress:
        for n in res.weights:
            progress(n)
    info = {}
    for n, w in res.weights.items():
        s = w.spec
        info[n] = dict(bits=s.bits, group_size=s.group_size, symmetric=s.symmetric, method="aphq",
                       act_bits=act.get(n, 16), act_order=False)
        if n in res.act:
            info[n].update(act_mode="static", act_scale=float(res.act[n][0]), act_zero=float(res.act[n][1]))
    blocks = [{k: v for k, v in b.items() if not k.endswith("seconds")} for b in res.blocks]  # same bytes per run
    return res.weights, info, {**(extra or {}), "act_fn": res.act_fn, "aphq": {"options": asdict(aopts),
                                                                            "blocks": blocks}}
