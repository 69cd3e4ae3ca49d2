"""`hawqtool run`: the whole pipeline in one command."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ._base import _setup_logging, calib_options, common, guarded, main, overwrite_option
from ..errors import UserError
from ..options import AllocateOptions as _A, EvalOptions as _E, QuantizeOptions as _Q, SensitivityOptions as _S
from .params import (BITS, COUNT, TEXT, GroupSize, PathArg, device_options, embed_options, offload_options,
                     formats_option, positive, scale_bits_option, check_scale_bits)

# recipe keys without a flag of their own, checked like flags
_RECIPE_ONLY = {"sens_min_probes": COUNT, "sens_target": positive()}


@main.command()
@click.argument("model", type=TEXT, required=False, metavar="[MODEL | RECIPE.yaml]")
@click.option("-o", "--output", type=PathArg(), default=Path("out"), show_default=True)
@click.option("--avg-bits", type=positive(), default=3.0, show_default=True)
@click.option("--bits", type=BITS, default=",".join(map(str, _S.bits)), show_default=True)
@click.option("--group-size", type=GroupSize(), default=None,
              help="One group size for every layer (-1: per channel). Default: each layer's chosen among "
                   f"{', '.join(map(str, _S.group_sizes))}.")
@click.option("--sym", is_flag=True)
@scale_bits_option(_A.scale_bits, f"Default: {_S.scale_bits}.")
@click.option("--calib", type=TEXT, default="wiki", show_default=True)
@click.option("--data", type=TEXT, default=_E.data, show_default=True)
@click.option("--nsamples", type=COUNT, default=None,
              help=f"GPTQ calibration windows (default {_Q.nsamples}; {_Q.encoder_nsamples} for an encoder).")
@click.option("--seqlen", type=COUNT, default=_Q.seqlen, show_default=True, help="GPTQ calibration window length.")
@click.option("--sens-samples", type=COUNT, default=_S.nsamples, show_default=True)
@click.option("--sens-seqlen", type=COUNT, default=_S.seqlen, show_default=True)
@click.option("--max-probes", type=COUNT, default=_S.max_probes, show_default=True)
@click.option("--eval-windows", type=COUNT, default=_E.windows, show_default=True)
@click.option("--eval-seqlen", type=COUNT, default=_E.seqlen, show_default=True)
@click.option("--eval-images", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Image classifiers: Fashion-MNIST images scored beside the sample photos (as `hawqtool eval`).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default=_Q.method, show_default=True)
@click.option("--act-order", is_flag=True, default=_Q.act_order, help="GPTQ: quantize columns by descending Hessian diagonal.")
@click.option("--tune-iters", type=click.IntRange(min=0), default=None,
              help="GPTQ: block tuning steps per block (recipe quantize.tune_iters; default "
                   f"{_Q.tune_iters}; 0 = off, faster).")
@click.option("--uniform/--no-uniform", default=True, show_default=True,
              help="Also quantize and score the uniform plan of the same bytes; --no-uniform quantizes once (the "
                   "mixed plan), for large models.")
@embed_options("Not counted in --avg-bits (linear layers only); summary.json reports both sizes.")
@formats_option("Plans in ggml block types (gguf = Q2_K..Q8_0) for `export --format gguf`; "
                "--avg-bits is then bits per linear weight.")
@device_options
@offload_options
@calib_options
@overwrite_option
@common
@guarded
def run(model, output, avg_bits, bits, group_size, sym, scale_bits, calib, data, nsamples, seqlen, sens_samples, sens_seqlen,
        max_probes, eval_windows, eval_seqlen, eval_images, method, act_order, tune_iters, uniform, embed_bits,
        embed_group_size, formats,
        device, dtype, offload, max_memory, seed, trust_remote_code, overwrite, as_json, verbose, quiet):
    """Whole pipeline: sensitivity → allocate → quantize (mixed, and uniform unless --no-uniform) → eval.

    Without MODEL it uses the embedded SmolLM2-135M and the built-in wiki text, scored by perplexity.
    An image classifier (efficientnet-lite0, the embedded one, or timm:NAME:WEIGHTS) calibrates on the
    built-in images and is scored by top-1 agreement and mean KL against full precision on the image
    set `hawqtool eval` uses. A YAML recipe (recipes/*.yaml; keys are the settings below) sets
    defaults; options given here win.

    \b
    hawqtool run --avg-bits 3.0 -o out/
    hawqtool run recipes/smollm2-135m.yaml --avg-bits 3.5
    hawqtool run recipes/efficientnet-lite0.yaml -o out_vis/
    hawqtool run --avg-bits 3.0 --embed-bits 8 -o out8/    # the tied embedding/head at 8 bits per row too
    hawqtool run --formats gguf --avg-bits 4.6 -o outg/     # ggml types; then export outg/mixed --format gguf
    """
    from ..progress import Reporter
    from ..recipe import is_recipe, load_recipe
    from ..render import summary_table
    from ..run import RunConfig, run_pipeline

    _setup_logging(verbose)
    rep = Reporter(quiet or as_json)
    given = dict(model=model, out=output, calib=calib, data=data, avg_bits=avg_bits, bit_choices=bits,
                 group_size=group_size, symmetric=sym, nsamples=nsamples, seqlen=seqlen,
                 sens_samples=sens_samples, sens_seqlen=sens_seqlen, sens_max_probes=max_probes,
                 eval_windows=eval_windows, eval_seqlen=eval_seqlen, eval_images=eval_images, seed=seed, method=method,
                 act_order=act_order, uniform=uniform, embed_bits=embed_bits, embed_group_size=embed_group_size, formats=formats or "",
                 device=device, dtype=dtype, offload=offload, max_memory=max_memory, trust_remote_code=trust_remote_code)
    if is_recipe(model):
        recipe = load_recipe(model)
        given["model"] = None
        ctx = click.get_current_context()
        param_of = {"out": "output", "bit_choices": "bits", "symmetric": "sym", "sens_max_probes": "max_probes"}
        for key, value in recipe.items():
            src = ctx.get_parameter_source(param_of.get(key, key)) if key != "model" else None
            if src in (None, click.core.ParameterSource.DEFAULT):
                given[key] = _check_recipe_value(ctx, model, key, value, param_of.get(key, key))
    if tune_iters is not None:  # the flag wins over the recipe's quantize section
        given["quantize"] = {**given.get("quantize", {}), "tune_iters": tune_iters}
    check_scale_bits(scale_bits, [group_size] if group_size is not None else None, formats)
    if scale_bits is not None:
        given["allocate"] = {**given.get("allocate", {}), "scale_bits": scale_bits}  # wins over the recipe's
    cfg = RunConfig(**given)
    from ..embedding import check_embed_options
    from ..outputs import claim_output

    check_embed_options(cfg.embed_bits, cfg.embed_group_size)
    from ..device import resolve_device

    from ..streaming import parse_memory

    resolve_device(cfg.device)  # a CUDA request without CUDA: one line, before the output folder is claimed
    if cfg.max_memory is not None:
        parse_memory(cfg.max_memory)
    claim_output(Path(cfg.out), "run", inputs=[cfg.model, cfg.calib, cfg.data, getattr(cfg, "latency_table", None)],
                 overwrite=overwrite)  # --overwrite may replace the folder: never one holding an input
    summary = run_pipeline(cfg, rep)
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        rep.console.print(summary_table(summary))
        rep.say(f"wrote {Path(cfg.out) / 'summary.json'}")


def _check_recipe_value(ctx: click.Context, recipe: str, key: str, value, param_name: str):
    """A recipe value passes the same check as the flag it stands for (range, finiteness); one-line error if not."""
    if value is None:
        return value
    param = next((p for p in ctx.command.params if p.name == param_name), None)
    kind = _RECIPE_ONLY.get(key) or (param.type if param is not None else None)
    if kind is None:
        return value
    try:
        return kind.convert(value, param, ctx)
    except click.BadParameter as e:
        raise UserError(f"recipe {recipe} key {key}: {e.format_message()}; fix the recipe") from None
