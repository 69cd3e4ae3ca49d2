"""`hawqtool sensitivity`: per-layer Hessian/Fisher traces of a model."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ._base import _setup_logging, calib_options, common, guarded, main, overwrite_option
from ..options import SensitivityOptions as _S
from .params import (BITS, COUNT, ONLY, TEXT, GroupSize, PathArg, check_scale_bits, device_options, formats_option,
                     offload_options, positive, scale_bits_option)


@main.command()
@click.argument("model", type=TEXT, required=False)
@click.option("--calib", type=TEXT, default="wiki", show_default=True, help="Calibration text: `wiki` or a .txt/.jsonl file.")
@click.option("-o", "--output", type=PathArg(), default=Path("sensitivity.json"), show_default=True)
@click.option("--nsamples", type=COUNT, default=_S.nsamples, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=COUNT, default=_S.seqlen, show_default=True, help="Tokens per window.")
@click.option("--batch-size", type=COUNT, default=_S.batch_size, show_default=True,
              help="Windows per probe. Activation memory scales with it: 1 halves it (SmolLM2 at 512 tokens: "
                   "see benchmarks/RESULTS.md for peak RSS).")
@click.option("--objective", type=click.Choice(["self-kl", "labels", "output-mse", "pooled-cosine"]),
              default=_S.objective, show_default=True,
              help="The loss whose Hessian traces rank the layers: self-kl (causal LMs), labels, output-mse (every "
                   "position's output), pooled-cosine (an encoder's mean-pooled embedding, 1 - cosine).")
@click.option("--estimator", type=click.Choice(["auto", "hutchinson", "fisher"]), default=_S.estimator, show_default=True,
              help="auto: fisher (sampled-label Fisher, one backward per probe) for self-kl/output-mse/pooled-cosine, "
                   "hutchinson for labels. Fisher measured 8-19x faster at lower error (benchmarks/RESULTS.md).")
@click.option("--target", type=positive(), default=_S.target_rel_se, show_default=True, help="Stop when every major layer's relative s.e. is below this.")
@click.option("--min-probes", type=COUNT, default=_S.min_probes, show_default=True)
@click.option("--max-probes", type=COUNT, default=_S.max_probes, show_default=True)
@click.option("--max-seconds", type=positive(), default=None, help="Time budget for the probes.")
@click.option("--bits", type=BITS, default=",".join(map(str, _S.bits)), show_default=True, help="Widths whose quantization error is recorded.")
@click.option("--group-size", type=GroupSize(), default=None,
              help="Record the error of this one group size (-1: per channel). Default: "
                   f"{', '.join(map(str, _S.group_sizes))}, each layer's chosen by `allocate`.")
@scale_bits_option(_S.scale_bits, "Records the error of each grouped option with codes too (16: not).")
@formats_option("Also record the error of these ggml block types (for `allocate --formats`).")
@click.option("--nproc", type=COUNT, default=1, show_default=True,
              help="Processes to spread the probes over (runs itself under torchrun; or launch with torchrun).")
@click.option("--checkpoint-blocks", is_flag=True,
              help="Activation checkpointing of the model's blocks: less memory for --objective labels or "
                   "--estimator fisher, at one more forward per probe.")
@click.option("--quantize-head", is_flag=True,
              help="Also measure (and so let allocate/quantize) an output head tied to the input embedding; it is "
                   "untied, the embedding stays full precision. The fp32 head dominates decode time of small LMs.")
@click.option("--only", type=TEXT, default=None, callback=ONLY,
              help="A regex: measure only the layers whose names it matches (the probes still run the whole model).")
@click.option("--eigen", is_flag=True, help="Also the top Hessian eigenvalue per layer (power iteration, HAWQ-V1).")
@click.option("--eigen-iters", type=COUNT, default=_S.eigen_iters, show_default=True, help="Power-iteration limit per layer.")
@device_options
@offload_options
@calib_options
@overwrite_option
@common
@guarded
def sensitivity(model, calib, output, nsamples, seqlen, batch_size, objective, estimator, target, min_probes, max_probes, max_seconds,
                bits, group_size, scale_bits, formats, nproc, checkpoint_blocks, quantize_head, only, eigen, eigen_iters, device, dtype, offload, max_memory, seed,
                trust_remote_code, overwrite, as_json, verbose, quiet):
    """Per-layer Hessian trace (Hutchinson) of MODEL on calibration text.

    \b
    hawqtool sensitivity HuggingFaceTB/SmolLM2-135M --calib wiki -o sens.json
    hawqtool sensitivity MODEL --nproc 2 -o sens.json        # = torchrun --nproc-per-node 2 -m hawqtool ...
    """
    import os
    import re

    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _relaunch_under_torchrun(nproc)
    from ..sensitivity.distributed import world

    rank, size = world()
    quiet = quiet or rank != 0
    from .. import artifacts
    from ..inputs import calibration_inputs, calibration_key
    from ..models import load_model
    from ..progress import Reporter
    from ..render import sensitivity_table
    from ..quantize.driver import first_token_weight_for
    from ..allocate.options import parse_formats
    from ..stages import compute_sensitivity

    from ..device import resolve_device, resolve_dtype

    _setup_logging(verbose)
    check_scale_bits(scale_bits, [group_size] if group_size is not None else None, None)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from ..streaming import parse_memory

    max_memory = parse_memory(max_memory) if max_memory is not None else None
    if rank == 0:  # the other ranks only contribute probes
        from ..outputs import claim_output

        claim_output(output, "json", inputs=[model, calib], overwrite=overwrite)
    rep = Reporter(quiet or as_json)
    loaded = load_model(model, trust_remote_code=trust_remote_code, device=dev, dtype=dt, offload=offload,
                        max_memory=max_memory)
    ids = calibration_inputs(loaded, calib, nsamples, seqlen, seed=seed + 1)
    from ..models import quantizable_layers

    n_layers = len([n for n in quantizable_layers(loaded.model, include_tied_head=quantize_head)
                    if only is None or re.search(only, n)])
    with rep.probe_bar(max_probes) as cb:
        opts = _S(objective=objective, estimator=estimator, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                  target_rel_se=target, min_probes=min_probes, max_probes=max_probes, bits=tuple(bits),
                  **({"group_size": group_size, "group_sizes": ()} if group_size is not None else {}),
                  scale_bits=scale_bits, formats=tuple(parse_formats(formats)), quantize_head=quantize_head,
                  checkpoint_blocks=checkpoint_blocks, first_token_weight=first_token_weight_for(loaded),
                  only=only, max_seconds=max_seconds, eigen=eigen, eigen_iters=eigen_iters)
        report = compute_sensitivity(loaded, ids, opts, seed=seed, progress=cb,
                                     data_key=calibration_key(loaded, calib, ids, seed),
                                     resume_path=Path(str(output) + ".partial"),
                                     qerror_progress=rep.lines("quantization error per layer", n_layers))
    if rank != 0:
        return  # rank 0 writes the report; the others only contributed probes
    report.settings["ranks"] = size
    if eigen:
        from ..stages import add_top_eigenvalues

        with rep.bar("top eigenvalues (power iteration)", len(report.layers)) as adv:
            add_top_eigenvalues(report, loaded, ids, objective, max_iters=eigen_iters, seed=seed, progress=adv)
    artifacts.save(report, output)
    if as_json:
        click.echo(json.dumps(asdict(report)))
    elif not quiet:
        rep.console.print(sensitivity_table(report))
        rep.say(f"wrote {output}")


def _relaunch_under_torchrun(nproc: int) -> None:
    """Run this same command under torch.distributed.run with `nproc` processes, then exit with its code."""
    import subprocess
    import sys

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "hawqtool", *args]
    sys.exit(subprocess.call(cmd))
