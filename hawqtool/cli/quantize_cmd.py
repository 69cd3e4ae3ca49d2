"""`hawqtool quantize`, `eval` and `export`: produce, measure and convert checkpoints."""
from __future__ import annotations

import json

import click

from ._base import _setup_logging, calib_options, common, guarded, main, overwrite_option
from ..options import EvalOptions as _E, QuantizeOptions as _Q
from .params import COUNT, NON_NEGATIVE, TEXT, Finite, PathArg, device_options, offload_options


@main.command()
@click.argument("model", type=TEXT, required=False)
@click.option("--plan", "plan_file", type=PathArg(), required=True)
@click.option("--calib", type=TEXT, default="wiki", show_default=True)
@click.option("-o", "--output", type=PathArg(), required=True, help="Checkpoint folder.")
@click.option("--method", type=click.Choice(["gptq", "rtn", "aphq"]), default=_Q.method, show_default=True,
              help="aphq: APHQ-style block reconstruction (encoders, ViTs): learned rounding and static activation "
                   "ranges under the average-perturbation-Hessian loss.")
@click.option("--aphq-iters", type=COUNT, default=_Q.aphq_iters, show_default=True, help="APHQ: optimisation steps per block.")
@click.option("--aphq-mlp-relu/--no-aphq-mlp-relu", default=_Q.aphq_mlp_relu, show_default=True,
              help="APHQ: replace each MLP's GELU by a clamped ReLU and refit fc1/fc2 (MLP reconstruction).")
@click.option("--nsamples", type=COUNT, default=None,
              help=f"Calibration windows (default {_Q.nsamples}; {_Q.encoder_nsamples} for an encoder under GPTQ).")
@click.option("--seqlen", type=COUNT, default=_Q.seqlen, show_default=True)
@click.option("--act-order", is_flag=True, default=_Q.act_order, help="GPTQ: quantize columns by descending Hessian diagonal.")
@click.option("--float-target/--no-float-target", default=_Q.float_target, show_default=True,
              help="GPTQ: fit each layer to the float model's outputs rather than its own on the quantized inputs "
                   "(GPTAQ's asymmetric calibration; one more block forward per layer group).")
@click.option("--tune-iters", type=click.IntRange(min=0), default=_Q.tune_iters, show_default=True,
              help="GPTQ: then tune each block's rounding and scales for this many signed-gradient "
                   "steps on the block's output error against the float model (SignRound, as AutoRound); 0 = off.")
@click.option("--tune-lr", type=Finite(min=0.0, max=1.0), default=_Q.tune_lr, show_default=True,
              help="Block tuning: the rounding offsets' signed step, decayed linearly to 0 (0 = 1 / tune-iters).")
@click.option("--tune-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=_Q.tune_dtype,
              show_default=True, help="Block tuning: the steps' forward and backward under autocast to this dtype "
                                      "(bfloat16: faster on GPUs and CPUs with AVX512-BF16/AMX); decisions stay float32.")
@click.option("--damp", type=Finite(min=0.0, max=1.0), default=_Q.percdamp, show_default=True,
              help="GPTQ damping, fraction of mean diag(H) added to its diagonal.")
@click.option("--blocksize", type=COUNT, default=_Q.blocksize, show_default=True)
@click.option("--act-mode", type=click.Choice(["dynamic", "static"]), default=_Q.act_mode, show_default=True,
              help="Activation-quantized layers (plan pairs): per-token ranges at run time, or static per-tensor "
                   "ranges calibrated here.")
@click.option("--act-calib", type=click.Choice(["minmax", "percentile", "mse"]), default=_Q.act_calib, show_default=True,
              help="Static ranges: how they are calibrated.")
@click.option("--first-token-weight", default=None, type=NON_NEGATIVE,
              help="Weight of each window's first token (attention sink) in GPTQ's H.")
@click.option("--grid", type=click.Choice(["search", "minmax"]), default=_Q.grid, show_default=True,
              help="Each group's scale/zero: importance-weighted error search, or the group's min-max range "
                   "(search chosen by scripts/bench_grid.py on the validation slice).")
@device_options
@offload_options
@calib_options
@overwrite_option
@common
@guarded
def quantize(model, plan_file, calib, output, method, aphq_iters, aphq_mlp_relu, nsamples, seqlen, act_order, float_target,
             tune_iters, tune_lr, tune_dtype, damp, blocksize, act_mode, act_calib,
             first_token_weight, grid, device, dtype, offload, max_memory, seed, overwrite,
             trust_remote_code, as_json, verbose, quiet):
    """Quantize MODEL layer by layer at the plan's bits and write a packed checkpoint.

    \b
    hawqtool quantize HuggingFaceTB/SmolLM2-135M --plan plan.json --calib wiki -o ckpt/
    hawqtool quantize timm:vit_tiny_patch16_224:vit.safetensors --plan plan.json --calib images --method aphq -o ckpt/
    """
    from .. import artifacts
    from ..inputs import calibration_inputs, calibration_key
    from ..models import load_model
    from ..progress import Reporter
    from ..quantize.driver import QuantizeOptions, first_token_weight_for, nsamples_for
    from ..stages import check_plan_matches, quantize_stage

    from ..device import resolve_device, resolve_dtype
    from ..outputs import claim_output

    from ..distributed import world

    _setup_logging(verbose)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from ..streaming import parse_memory

    max_memory = parse_memory(max_memory) if max_memory is not None else None
    rank = world()[0]  # under torchrun: data parallel over the calibration windows, rank 0 writes
    if rank == 0:
        claim_output(output, "checkpoint", inputs=[model, plan_file, calib], overwrite=overwrite)
    rep = Reporter(quiet or as_json or rank != 0)
    plan = artifacts.load(plan_file, "plan")
    loaded = load_model(model, trust_remote_code=trust_remote_code, device=dev, dtype=dt, offload=offload,
                        max_memory=max_memory)
    check_plan_matches(plan, loaded)
    nsamples = nsamples_for(loaded, method) if nsamples is None else nsamples
    ids = calibration_inputs(loaded, calib, nsamples, seqlen, seed=seed)
    opts = QuantizeOptions(method=method, act_order=act_order, percdamp=damp, blocksize=blocksize, act_mode=act_mode,
                           act_calib=act_calib, aphq_iters=aphq_iters, aphq_mlp_relu=aphq_mlp_relu,
                           grid=grid, float_target=float_target, tune_iters=tune_iters, tune_lr=tune_lr,
                           tune_dtype=tune_dtype)
    opts.first_token_weight = first_token_weight_for(loaded) if first_token_weight is None else first_token_weight
    with rep.bar(f"quantize ({method})", len(plan.layers)) as adv:
        path = quantize_stage(loaded, plan, ids, opts, output, progress=lambda _n: adv(1),
                              data_key=calibration_key(loaded, calib, ids, seed))
    if rank != 0:
        return
    if as_json:
        click.echo(json.dumps({"checkpoint": str(path)}))
    else:
        rep.say(f"wrote {path}")


@main.command(name="eval")
@click.argument("model", type=TEXT, required=False)
@click.option("--data", type=TEXT, default=_E.data, show_default=True, help="Evaluation text: `wiki` or a .txt/.jsonl file.")
@click.option("--seqlen", type=COUNT, default=_E.seqlen, show_default=True)
@click.option("--windows", "max_windows", type=COUNT, default=_E.windows, show_default=True, help="At most this many windows.")
@click.option("--reference", type=TEXT, default=None,
              help="Encoders: full-precision model to compare embeddings with (default: the checkpoint's source).")
@click.option("--trust-remote-code", is_flag=True)
@device_options
@offload_options
@common
@guarded
def eval_cmd(model, data, seqlen, max_windows, reference, trust_remote_code, device, dtype, offload, max_memory,
             as_json, verbose, quiet):
    """Perplexity of a causal LM, or embedding cosine of an encoder against full precision, for a
    model or a hawqtool checkpoint (pinned protocols, see README).

    \b
    hawqtool eval ckpt/ --data wiki --json
    hawqtool eval minilm-ckpt/ --seqlen 128      # encoder: cosine to its source model
    """
    from ..device import resolve_device, resolve_dtype
    from ..evaluate_stage import evaluate_any
    from ..streaming import parse_memory
    from ..progress import Reporter

    from ..distributed import world

    _setup_logging(verbose)
    dev = resolve_device(device)
    rank = world()[0]  # under torchrun: windows split over the ranks, rank 0 reports
    rep = Reporter(quiet or as_json or rank != 0)
    res = evaluate_any(model, _E(data=data, seqlen=seqlen, windows=max_windows), rep, trust_remote_code=trust_remote_code,
                       reference=reference, device=dev, dtype=resolve_dtype(dtype, dev), offload=offload,
                       max_memory=parse_memory(max_memory) if max_memory is not None else None)
    if rank != 0:
        return
    if as_json:
        click.echo(json.dumps(res))
    elif res["task"] == "image-classification":
        acc = (f"; accuracy {res['accuracy']:.4f} (full precision {res['reference_accuracy']:.4f})"
               if "accuracy" in res else "")
        click.echo(f"top-1 agreement with {res['reference']}: {res['top1_agreement']:.4f}, mean KL "
                   f"{res['mean_kl']:.5f} nats ({res['images']} images){acc}")
    elif res["task"] == "encoder":
        click.echo(f"embedding cosine to {res['reference']}: mean {res['cosine']:.5f}, min {res['cosine_min']:.5f} "
                   f"({res['windows']} × {res['seqlen']} tokens)")
    else:
        click.echo(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} × {res['seqlen']})")
    if not as_json and "sizes" in res:
        from ..sizes import size_line

        click.echo(size_line(res["sizes"], "size: "))


@main.command(name="export")
@click.argument("checkpoint", type=PathArg())
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq", "gguf"]), required=True,
              help="compressed-tensors: loads with plain transformers (symmetric layers only); gptq: AutoGPTQ v1 "
                   "layout; gguf: one file for llama.cpp (Llama family, layers quantized in ggml types).")
@click.option("-o", "--output", type=PathArg(), required=True, help="Folder (gguf: file) to write, atomically.")
@click.option("--embed-type", type=TEXT, default=None,
              help="gguf only: ggml type of the token embedding (Q8_0 default, Q5_1, Q5_0, Q4_1, Q4_0, F16, BF16, "
                   "F32).")
@overwrite_option
@common
@guarded
def export_cmd(checkpoint, fmt, output, embed_type, overwrite, as_json, verbose, quiet):
    """Convert a hawqtool checkpoint for other runtimes.

    \b
    hawqtool export ckpt/ --format compressed-tensors -o ckpt-ct/
    hawqtool export ckpt/ --format gptq -o ckpt-gptq/
    hawqtool export ckpt/ --format gguf -o model.gguf    # then: llama-cli -m model.gguf
    """
    from ..errors import UserError
    from ..export import OUTPUT_KIND, export_checkpoint
    from ..outputs import claim_output

    _setup_logging(verbose)
    if embed_type is not None and fmt != "gguf":
        raise UserError(f"--embed-type applies to --format gguf only, not {fmt}; drop --embed-type")
    claim_output(output, OUTPUT_KIND[fmt], inputs=[checkpoint], overwrite=overwrite)
    path = export_checkpoint(checkpoint, output, fmt, embed_type=embed_type)
    if as_json:
        click.echo(json.dumps({"export": str(path), "format": fmt}))
    elif not quiet:
        click.echo(f"wrote {path}", err=True)
