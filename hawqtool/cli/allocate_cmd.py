"""`hawqtool allocate` (bits per layer under a budget) and `hawqtool report`."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ._base import overwrite_option, _setup_logging, common, guarded, main
from .params import (ACT_BITS, ALLOWS, BITS, GROUP_SIZES, NON_NEGATIVE, PAIRS, PINS, TEXT, TIES, GroupSize, PathArg,
                     check_scale_bits, embed_options, formats_option, positive, scale_bits_option)
from ..options import AllocateOptions as _A, SensitivityOptions as _S



@main.command()
@click.argument("sensitivity_file", type=PathArg())
@click.option("--avg-bits", type=positive(), default=None,
              help="Size budget: at most the bytes of uniform B-bit linear layers at the coarsest group size offered, "
                   "fp16 scales (the embedding is not counted).")
@click.option("--max-bytes", type=positive(), default=None,
              help="Size budget in bytes of the quantized layers (b-bit codes + fp16 scales + b-bit zeros, as bits "
                   "per linear weight count them; the file's int32 words add row padding, 0.4-2%), and of the "
                   "embedding when --embed-bits < 16.")
@click.option("--bits", type=BITS, default=",".join(map(str, _S.bits)), show_default=True, help="Allowed bit widths.")
@click.option("--group-size", type=GroupSize(), default=None,
              help="One group size along inputs for every layer (-1: per channel). Default: each layer's is chosen "
                   "among those the report measured (sensitivity's default: 32, 64, 128).")
@click.option("--sym", is_flag=True, help="Symmetric quantization (default asymmetric).")
@click.option("--model", type=TEXT, default=None,
              help="Model for quantization errors the report lacks, and to predict the whole file's bits per "
                   "parameter (default: the report's, loaded only when needed).")
@embed_options("Counted in --max-bytes, not in --avg-bits.")
@click.option("--pin", "pins", multiple=True, metavar="PATTERN=BITS", callback=PINS,
              help="Fix the bits of layers whose name matches the regex (repeatable; first match wins).")
@click.option("--allow", "allows", multiple=True, metavar="PATTERN=B1,B2", callback=ALLOWS,
              help="Restrict matching layers to these widths (repeatable; first match wins; --pin overrides).")
@click.option("--tie", "ties", multiple=True, metavar="PATTERN", callback=TIES,
              help="Equal bits for layers whose names agree once the match is deleted, e.g. '(q|k|v)_proj'.")
@click.option("--auto-ties", is_flag=True, help="Tie q/k/v and gate/up projections of each block (fused at run time).")
@click.option("--group-sizes", type=GROUP_SIZES, default=None,
              help="The group sizes each layer chooses among, e.g. 32,64,128 (default: those the report measured).")
@scale_bits_option(_A.scale_bits, "Default: as the report measured them (sensitivity's default: 6).")
@click.option("--act-bits", type=ACT_BITS, default=",".join(map(str, _A.act_bits)), show_default=True, help="16 weight-only; '8,16' also offers W8A8 layers.")
@formats_option("Choose among ggml block types instead (gguf = Q2_K..Q8_0; K-quants only where rows are multiples "
                "of 256); --avg-bits is then bits per linear weight. Then `export --format gguf`.")
@click.option("--pairs", default=None, callback=PAIRS,
              help="Extra (weight:activation) bit pairs to choose from, e.g. '4:8,4:4'.")
@click.option("--max-bops", type=positive(), default=None, help="BOPs budget per token (MACs × weight bits × act bits).")
@click.option("--bops-frac", type=positive(), default=None, help="BOPs budget as a fraction of 16×16-bit BOPs.")
@click.option("--latency-table", type=PathArg(), default=None,
              help="Layer × option → ms table (from `hawqtool bench --latency-table`).")
@click.option("--max-latency-ms", type=positive(), default=None, help="Latency budget: sum of the layers' table times.")
@click.option("--latency-frac", type=positive(), default=None, help="Latency budget as a fraction of the table's fp32 time.")
@click.option("--trace-ucb", type=NON_NEGATIVE, default=_A.trace_ucb, show_default=True,
              help="Use the pessimistic trace max(Tr,0)+Z·s.e. (0: the estimate itself).")
@click.option("--calib", type=TEXT, default="wiki", show_default=True, help="Text for measuring MACs/activations (BOPs, W8A8).")
@click.option("--sweep", is_flag=True, help="Also write PLAN.sweep.json/.png: Pareto frontiers of Ω vs size (and BOPs, latency when given).")
@click.option("-o", "--output", type=PathArg(), default=Path("plan.json"), show_default=True)
@overwrite_option
@common
@guarded
def allocate(sensitivity_file, avg_bits, max_bytes, bits, group_size, sym, model, embed_bits, embed_group_size, pins,
             allows, ties, auto_ties,
             group_sizes, scale_bits, act_bits, formats, pairs, max_bops, bops_frac, latency_table, max_latency_ms, latency_frac, trace_ucb, calib,
             sweep, output, overwrite, as_json, verbose, quiet):
    """Choose bits per layer by an integer program under a size budget.

    \b
    hawqtool allocate sens.json --avg-bits 3.0 -o plan.json
    hawqtool allocate sens.json --max-bytes 40e6 --bits 3,4,8 -o plan.json
    hawqtool allocate sens.json --avg-bits 3 --pin lm_head=8 --auto-ties --sweep -o plan.json
    hawqtool allocate sens.json --avg-bits 4 --group-sizes 64,128 -o plan.json      # fewer group sizes offered
    hawqtool allocate sens.json --avg-bits 3 --group-size 128 --scale-bits 16 -o plan.json  # g128, fp16 scales
    hawqtool allocate sens.json --bops-frac 0.2 --act-bits 8,16 --avg-bits 4.5 -o plan.json
    hawqtool allocate sens.json --latency-table lat.json --latency-frac 0.3 -o plan.json
    hawqtool allocate sens.json --avg-bits 3 --embed-bits 6 -o plan.json   # embedding/tied head 6-bit per row
    hawqtool allocate sens.json --formats gguf --avg-bits 4.6 -o plan.json  # ggml types, for export --format gguf
    """
    from .. import artifacts
    from ..allocate.options import parse_formats
    from ..allocate.plan import parse_allowed, parse_pins
    from ..allocate_stage import allocate_stage, budget_inputs, write_sweep_of
    from ..options import AllocateOptions
    from ..progress import Reporter
    from ..render import plan_size_lines, plan_table
    from ..embedding import check_embed_options, embedding_plan
    from ..models import load_model
    from ..sizes import predict_file
    from ..stages import layer_weights

    from ..outputs import claim_output

    _setup_logging(verbose)
    if sweep and formats:
        from ..errors import UserError

        raise UserError("--sweep does not take --formats yet; sweep hawqtool's own formats, or run allocate per budget")
    check_scale_bits(scale_bits, group_sizes or ([group_size] if group_size is not None else None), formats)
    claim_output(output, "json", inputs=[sensitivity_file, model, latency_table, calib], overwrite=overwrite)
    opts = AllocateOptions(group_sizes=tuple(group_sizes or ()), scale_bits=scale_bits, act_bits=tuple(act_bits),
                           pins=parse_pins(pins),
                           allowed=parse_allowed(allows), ties=tuple(ties), auto_ties=auto_ties, trace_ucb=trace_ucb,
                           max_bytes=max_bytes, pairs=pairs or "", max_bops=max_bops, bops_frac=bops_frac,
                           latency_table=str(latency_table) if latency_table is not None else None,
                           max_latency_ms=max_latency_ms, latency_frac=latency_frac, sweep=sweep)
    report = artifacts.load(sensitivity_file, "sensitivity")
    held: dict = {}

    def loaded():  # the model, loaded once and only when needed
        if "m" not in held:
            held["m"] = load_model(model or report.model)
        return held["m"]

    def weights() -> dict:
        if "w" not in held:
            held["w"] = layer_weights(loaded())
        return held["w"]

    emb = (embedding_plan(loaded().model, embed_bits, embed_group_size, sym, [ls.name for ls in report.layers])
           if check_embed_options(embed_bits, embed_group_size) else None)
    inputs = budget_inputs(report, opts, model=model, calib=calib,
                           profile_cache=Path(sensitivity_file).with_suffix(".profile.json"))
    plan = allocate_stage(report, weights, opts, avg_bits=avg_bits, bit_choices=tuple(bits), group_size=group_size,
                          symmetric=sym, embedding=emb, formats=tuple(parse_formats(formats)), inputs=inputs)
    if model is not None or emb is not None:
        plan.file = predict_file(loaded().model, plan)
    artifacts.save(plan, output)
    written = [output]
    if sweep:
        written += list(write_sweep_of(report, weights, plan, opts, inputs, bit_choices=tuple(bits),
                                       group_size=group_size, symmetric=sym, output=output).values())
    if as_json:
        click.echo(json.dumps(asdict(plan)))
    elif not quiet:
        console = Reporter().console
        console.print(plan_table(plan))
        for line in plan_size_lines(plan):
            console.print(line, highlight=False)
        for p in written:
            click.echo(f"wrote {p}", err=True)


@main.command(name="report")
@click.argument("sensitivity_file", type=PathArg())
@click.option("--plan", "plan_file", type=PathArg(), default=None,
              help="Plan JSON from `hawqtool allocate`: adds bits per layer.")
@click.option("-o", "--output", type=PathArg(), default=None,
              help="Folder for sensitivity.md/.html (default: the JSON's folder).")
@common
@guarded
def report_cmd(sensitivity_file, plan_file, output, as_json, verbose, quiet):
    """Markdown + self-contained HTML report (embedded plots) of a sensitivity run.

    \b
    hawqtool report sens.json --plan plan.json -o reports/
    """
    from .. import artifacts
    from ..progress import Reporter
    from ..render import sensitivity_table
    from ..report import write_sensitivity_report

    _setup_logging(verbose)
    sens = artifacts.load(sensitivity_file, "sensitivity")
    plan = artifacts.load(plan_file, "plan") if plan_file is not None else None
    paths = write_sensitivity_report(sens, output if output is not None else Path(sensitivity_file).parent, plan)
    if as_json:
        click.echo(json.dumps({k: str(p) for k, p in paths.items()}))
    elif not quiet:
        rep = Reporter()
        rep.console.print(sensitivity_table(sens))
        for p in paths.values():
            rep.say(f"wrote {p}")
