"""`hawqtool bench`: end-to-end latency of a checkpoint vs full precision, or the allocator's latency table."""
from __future__ import annotations

import json

import click

from ._base import _setup_logging, common, guarded, main
from .params import ACT_BITS, BITS, COUNT, GROUP_SIZES, PAIRS, TEXT, PathArg, device_options
from ..options import SensitivityOptions as _S


@main.command(name="bench")
@click.argument("target", type=TEXT, required=False)
@click.option("--latency-table", type=PathArg(), default=None,
              help="Write the layer × option → ms table of TARGET (a model) for `allocate --latency-table`.")
@click.option("--bits", type=BITS, default=",".join(map(str, _S.bits)), show_default=True,
              help="Latency table: widths to time.")
@click.option("--group-sizes", type=GROUP_SIZES, default=",".join(map(str, _S.group_sizes)), show_default=True,
              help="Latency table: group sizes to time.")
@click.option("--act-bits", type=ACT_BITS, default="16", show_default=True, help="Latency table: '8,16' also times W8A8.")
@click.option("--pairs", default=None, callback=PAIRS,
              help="Latency table: extra weight:activation pairs, e.g. '4:8'.")
@click.option("--sym", is_flag=True, help="Latency table: symmetric weights.")
@click.option("--tokens", type=COUNT, default=1, show_default=True, help="Latency table: input rows (1 = decode).")
@click.option("--reference", type=TEXT, default=None, help="Full-precision model to compare with (default: the checkpoint's).")
@click.option("--prompt-tokens", type=COUNT, default=128, show_default=True)
@click.option("--decode-tokens", type=COUNT, default=32, show_default=True)
@click.option("--repeats", type=COUNT, default=5, show_default=True, help="Timed repeats (median reported).")
@click.option("--no-layers", is_flag=True, help="Skip the per-layer timings.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile both models (static KV cache, whole graphs): cuts the per-op overhead that "
                   "dominates eager decoding of small models; compiling takes about a minute per model.")
@click.option("--trust-remote-code", is_flag=True)
@device_options
@common
@guarded
def bench_cmd(target, latency_table, bits, group_sizes, act_bits, pairs, sym, tokens, reference, prompt_tokens,
              decode_tokens, repeats, no_layers, compile_, trust_remote_code, device, dtype, as_json, verbose, quiet):
    """Latency on this machine: a checkpoint end to end against its full-precision model, or a table.

    \b
    hawqtool bench ckpt/                                  # prefill ms, decode tokens/s, per layer, RSS
    hawqtool bench ckpt/ --compile --no-layers            # both models torch.compile'd
    hawqtool bench --latency-table lat.json               # embedded model's layers × 2/3/4/8-bit
    hawqtool allocate sens.json --latency-table lat.json --latency-frac 0.3 -o plan.json
    """
    from ..device import resolve_device, resolve_dtype
    from ..progress import Reporter

    _setup_logging(verbose)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    rep = Reporter(quiet or as_json)
    if latency_table is not None:
        from ..allocate.options import make_options, parse_pairs
        from ..latency import measure_latency_table, save_latency_table
        from ..models import load_model, quantizable_layers, weight_matrix
        from ..outputs import claim_output

        # before the minutes of measuring: never over a file that is not a latency table of ours, nor an input
        claim_output(latency_table, "json", inputs=[target])
        loaded = load_model(target, trust_remote_code=trust_remote_code)
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model, include_tied_head=True).items()}
        options = make_options(bits, group_sizes, act_bits,
                               parse_pairs(pairs))
        with rep.bar("latency table (distinct shapes)", len(set(shapes.values()))) as adv:
            table = measure_latency_table(shapes, options, symmetric=sym, tokens=tokens, repeats=max(repeats, 5),
                                          progress=adv, device=dev)
        save_latency_table(table, latency_table)
        if as_json:
            click.echo(json.dumps({"latency_table": str(latency_table), "layers": len(shapes)}))
        else:
            rep.say(f"wrote {latency_table} ({len(shapes)} layers × {len(options)} options, {tokens} token(s))")
        return
    from ..bench import bench_checkpoint
    from ..errors import UserError
    from ..render import bench_layers_table, bench_table

    if target is None:
        raise UserError("give a checkpoint folder to bench, or --latency-table FILE [MODEL]")
    res = bench_checkpoint(target, reference=reference, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                           repeats=repeats, layers=not no_layers, compile=compile_, progress=rep.say, device=dev,
                           dtype=dt)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        rep.console.print(bench_table(res))
        if res.layers:
            rep.console.print(bench_layers_table(res))
