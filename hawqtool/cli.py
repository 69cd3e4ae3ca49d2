"""Command line: parses arguments, shows progress, renders results. All work is in the library.

Exit codes: 0 ok, 1 user error (one line), 2 internal error (message + log file), 130 Ctrl-C.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import click

from .errors import UserError

log = logging.getLogger("hawqtool")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "gguf", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # transformers' own weight-loading bars would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def guarded(fn):
    """Turn UserError into one line + exit 1, Ctrl-C into exit 130, anything else into exit 2."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: finished stages/blocks are kept; re-run the same command to resume", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - the user sees one line, the log has the trace
            fd, logpath = tempfile.mkstemp(prefix="hawqtool-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                traceback.print_exc(file=f)
            click.echo(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       f"(traceback in {logpath})", err=True)
            sys.exit(2)
    return wrapper


def common(fn):
    """-q/-v/--json on every command."""
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)
    return fn


def calib_options(fn):
    fn = click.option("--seed", default=0, show_default=True, help="Seed for calibration windows and probes.")(fn)
    fn = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")(fn)
    return fn


def _bits(s: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in s.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--bits must be a comma-separated list of integers like 2,3,4,8, got {s!r}")
    if not out or any(not 1 <= b <= 8 for b in out):
        raise UserError(f"--bits values must be between 1 and 8, got {s!r}")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hawqtool")
def main() -> None:
    """Hessian-aware mixed-precision quantization.

    \b
    hawqtool run --avg-bits 3.0 -o out/          # whole pipeline on the embedded default
    hawqtool sensitivity MODEL --calib wiki -o sens.json
    hawqtool allocate sens.json --avg-bits 3.0 -o plan.json
    hawqtool quantize MODEL --plan plan.json --calib wiki -o ckpt/
    hawqtool eval ckpt/ --data wiki
    hawqtool export ckpt/ --format compressed-tensors -o ckpt-ct/
    """


@main.command()
@click.argument("model", required=False)
@click.option("--calib", default="wiki", show_default=True, help="Calibration text: `wiki` or a .txt/.jsonl file.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("sensitivity.json"), show_default=True)
@click.option("--nsamples", default=8, show_default=True, help="Calibration windows.")
@click.option("--seqlen", default=256, show_default=True, help="Tokens per window.")
@click.option("--objective", type=click.Choice(["self-kl", "labels", "output-mse"]), default="self-kl", show_default=True)
@click.option("--estimator", type=click.Choice(["hutchinson", "fisher"]), default="hutchinson", show_default=True,
              help="fisher: sampled-label Fisher, one backward per probe (self-kl/output-mse); for models "
                   "without double-backward/forward-mode support.")
@click.option("--target", default=0.10, show_default=True, help="Stop when every major layer's relative s.e. is below this.")
@click.option("--min-probes", default=8, show_default=True)
@click.option("--max-probes", default=32, show_default=True)
@click.option("--max-seconds", type=float, default=None, help="Time budget for the probes.")
@click.option("--bits", default="2,3,4,8", show_default=True, help="Widths whose quantization error is recorded.")
@click.option("--group-size", default=128, show_default=True)
@calib_options
@common
@guarded
def sensitivity(model, calib, output, nsamples, seqlen, objective, estimator, target, min_probes, max_probes, max_seconds,
                bits, group_size, seed, trust_remote_code, as_json, verbose, quiet):
    """Per-layer Hessian trace (Hutchinson) of MODEL on calibration text.

    \b
    hawqtool sensitivity HuggingFaceTB/SmolLM2-135M --calib wiki -o sens.json
    """
    from . import artifacts
    from .data import calibration_windows, data_fingerprint
    from .models import load_model
    from .progress import Reporter
    from .render import sensitivity_table
    from .stages import compute_sensitivity

    _setup_logging(verbose)
    rep = Reporter(quiet or as_json)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    ids = calibration_windows(loaded.tokenizer, calib, nsamples, seqlen, seed=seed + 1)
    with rep.probe_bar(max_probes) as cb:
        report = compute_sensitivity(loaded, ids, objective=objective, estimator=estimator,
                                     target_rel_se=target, min_probes=min_probes,
                                     max_probes=max_probes, max_seconds=max_seconds, seed=seed, progress=cb,
                                     data_key=artifacts.fingerprint(data_fingerprint(calib), seed),
                                     qerror_bits=_bits(bits), qerror_groups=(group_size,))
    artifacts.save(report, output)
    if as_json:
        click.echo(json.dumps(asdict(report)))
    elif not quiet:
        rep.console.print(sensitivity_table(report))
        rep.say(f"wrote {output}")


@main.command()
@click.argument("sensitivity_file", type=click.Path(path_type=Path))
@click.option("--avg-bits", type=float, default=None, help="Size budget: at most the bytes of uniform B-bit.")
@click.option("--max-bytes", type=float, default=None, help="Size budget in bytes of the quantized layers.")
@click.option("--bits", default="2,3,4,8", show_default=True, help="Allowed bit widths.")
@click.option("--group-size", default=128, show_default=True, help="Group size along inputs (-1: per channel).")
@click.option("--sym", is_flag=True, help="Symmetric quantization (default asymmetric).")
@click.option("--model", default=None, help="Model for quantization errors the report lacks (default: the report's).")
@click.option("--pin", "pins", multiple=True, metavar="PATTERN=BITS",
              help="Fix the bits of layers whose name matches the regex (repeatable; first match wins).")
@click.option("--allow", "allows", multiple=True, metavar="PATTERN=B1,B2",
              help="Restrict matching layers to these widths (repeatable; first match wins; --pin overrides).")
@click.option("--tie", "ties", multiple=True, metavar="PATTERN",
              help="Equal bits for layers whose names agree once the match is deleted, e.g. '(q|k|v)_proj'.")
@click.option("--auto-ties", is_flag=True, help="Tie q/k/v and gate/up projections of each block (fused at run time).")
@click.option("--sweep", is_flag=True, help="Also write PLAN.sweep.json/.png: Pareto frontier of size vs Ω.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("plan.json"), show_default=True)
@common
@guarded
def allocate(sensitivity_file, avg_bits, max_bytes, bits, group_size, sym, model, pins, allows, ties, auto_ties,
             sweep, output, as_json, verbose, quiet):
    """Choose bits per layer by an integer program under a size budget.

    \b
    hawqtool allocate sens.json --avg-bits 3.0 -o plan.json
    hawqtool allocate sens.json --max-bytes 40e6 --bits 3,4,8 -o plan.json
    hawqtool allocate sens.json --avg-bits 3 --pin lm_head=8 --auto-ties --sweep -o plan.json
    """
    from . import artifacts
    from .allocate.plan import allocate_bits, parse_allowed, parse_pins
    from .progress import Reporter
    from .render import plan_table
    from .stages import lazy_weights

    _setup_logging(verbose)
    cons = dict(pins=parse_pins(pins), allowed=parse_allowed(allows), ties=list(ties), auto_ties=auto_ties)
    report = artifacts.load(sensitivity_file, "sensitivity")
    weights, bit_choices = lazy_weights(model or report.model), _bits(bits)
    plan = allocate_bits(report, weights, avg_bits=avg_bits, max_bytes=max_bytes,
                         bit_choices=bit_choices, group_size=group_size, symmetric=sym, **cons)
    artifacts.save(plan, output)
    written = [output]
    if sweep:
        from .allocate.sweep import sweep_plans, write_sweep

        res = sweep_plans(report, weights, bit_choices, group_size, sym,
                          extra_budgets=[plan.budget["max_bytes"]], **cons)
        base = output.with_suffix("") if output.suffix == ".json" else output
        paths = write_sweep(res, base.with_name(base.name + ".sweep.json"), base.with_name(base.name + ".sweep.png"),
                            plan)
        written += list(paths.values())
    if as_json:
        click.echo(json.dumps(asdict(plan)))
    elif not quiet:
        Reporter().console.print(plan_table(plan))
        for p in written:
            click.echo(f"wrote {p}", err=True)


@main.command(name="report")
@click.argument("sensitivity_file", type=click.Path(path_type=Path))
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="Plan JSON from `hawqtool allocate`: adds bits per layer.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Folder for sensitivity.md/.html (default: the JSON's folder).")
@common
@guarded
def report_cmd(sensitivity_file, plan_file, output, as_json, verbose, quiet):
    """Markdown + self-contained HTML report (embedded plots) of a sensitivity run.

    \b
    hawqtool report sens.json --plan plan.json -o reports/
    """
    from . import artifacts
    from .progress import Reporter
    from .render import sensitivity_table
    from .report import write_sensitivity_report

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


@main.command()
@click.argument("model", required=False)
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), required=True)
@click.option("--calib", default="wiki", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--nsamples", default=32, show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by descending Hessian diagonal.")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ damping, fraction of mean diag(H).")
@click.option("--blocksize", default=128, show_default=True)
@click.option("--first-token-weight", default=None, type=float,
              help="Weight of each window's first token (attention sink) in GPTQ's H.")
@calib_options
@common
@guarded
def quantize(model, plan_file, calib, output, method, nsamples, seqlen, act_order, damp, blocksize,
             first_token_weight, seed,
             trust_remote_code, as_json, verbose, quiet):
    """Quantize MODEL layer by layer at the plan's bits and write a packed checkpoint.

    \b
    hawqtool quantize HuggingFaceTB/SmolLM2-135M --plan plan.json --calib wiki -o ckpt/
    """
    from . import artifacts
    from .data import calibration_windows, data_fingerprint
    from .models import load_model
    from .progress import Reporter
    from .quantize.driver import QuantizeOptions
    from .stages import check_plan_matches, quantize_stage

    _setup_logging(verbose)
    rep = Reporter(quiet or as_json)
    plan = artifacts.load(plan_file, "plan")
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    check_plan_matches(plan, loaded)
    ids = calibration_windows(loaded.tokenizer, calib, nsamples, seqlen, seed=seed)
    opts = QuantizeOptions(method=method, act_order=act_order, percdamp=damp, blocksize=blocksize)
    if first_token_weight is not None:
        opts.first_token_weight = first_token_weight
    with rep.bar(f"quantize ({method})", len(plan.layers)) as adv:
        path = quantize_stage(loaded, plan, ids, opts, output, progress=lambda _n: adv(1),
                              data_key=artifacts.fingerprint(data_fingerprint(calib), seed))
    if as_json:
        click.echo(json.dumps({"checkpoint": str(path)}))
    else:
        rep.say(f"wrote {path}")


@main.command(name="eval")
@click.argument("model", required=False)
@click.option("--data", default="wiki", show_default=True, help="Evaluation text: `wiki` or a .txt/.jsonl file.")
@click.option("--seqlen", default=512, show_default=True)
@click.option("--windows", "max_windows", default=40, show_default=True, help="At most this many windows.")
@click.option("--trust-remote-code", is_flag=True)
@common
@guarded
def eval_cmd(model, data, seqlen, max_windows, trust_remote_code, as_json, verbose, quiet):
    """Perplexity of a model or a hawqtool checkpoint (pinned protocol, see README).

    \b
    hawqtool eval ckpt/ --data wiki --json
    """
    from .stages import evaluate_any
    from .progress import Reporter

    _setup_logging(verbose)
    rep = Reporter(quiet or as_json)
    res = evaluate_any(model, data, seqlen, max_windows, rep, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} × {res['seqlen']})")


@main.command(name="export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq"]), required=True,
              help="compressed-tensors: loads with plain transformers (symmetric layers only); gptq: AutoGPTQ v1 layout.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder to write (atomically).")
@common
@guarded
def export_cmd(checkpoint, fmt, output, as_json, verbose, quiet):
    """Convert a hawqtool checkpoint for other runtimes.

    \b
    hawqtool export ckpt/ --format compressed-tensors -o ckpt-ct/
    hawqtool export ckpt/ --format gptq -o ckpt-gptq/
    """
    from .export import export_checkpoint

    _setup_logging(verbose)
    path = export_checkpoint(checkpoint, output, fmt)
    if as_json:
        click.echo(json.dumps({"export": str(path), "format": fmt}))
    elif not quiet:
        click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out"), show_default=True)
@click.option("--avg-bits", type=float, default=3.0, show_default=True)
@click.option("--bits", default="2,3,4,8", show_default=True)
@click.option("--group-size", default=128, show_default=True)
@click.option("--sym", is_flag=True)
@click.option("--calib", default="wiki", show_default=True)
@click.option("--data", default="wiki", show_default=True)
@click.option("--nsamples", default=32, show_default=True, help="GPTQ calibration windows.")
@click.option("--seqlen", default=512, show_default=True, help="GPTQ calibration window length.")
@click.option("--sens-samples", default=8, show_default=True)
@click.option("--sens-seqlen", default=256, show_default=True)
@click.option("--max-probes", default=32, show_default=True)
@click.option("--eval-windows", default=40, show_default=True)
@click.option("--eval-seqlen", default=512, show_default=True)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--act-order", is_flag=True)
@calib_options
@common
@guarded
def run(model, output, avg_bits, bits, group_size, sym, calib, data, nsamples, seqlen, sens_samples, sens_seqlen,
        max_probes, eval_windows, eval_seqlen, method, act_order, seed, trust_remote_code, as_json, verbose, quiet):
    """Whole pipeline: sensitivity → allocate → quantize (mixed and uniform) → eval.

    Without MODEL it uses the embedded SmolLM2-135M and the built-in wiki text.

    \b
    hawqtool run --avg-bits 3.0 -o out/
    """
    from .progress import Reporter
    from .render import summary_table
    from .run import RunConfig, run_pipeline

    _setup_logging(verbose)
    rep = Reporter(quiet or as_json)
    cfg = RunConfig(model=model, out=output, calib=calib, data=data, avg_bits=avg_bits, bit_choices=_bits(bits),
                    group_size=group_size, symmetric=sym, nsamples=nsamples, seqlen=seqlen,
                    sens_samples=sens_samples, sens_seqlen=sens_seqlen, sens_max_probes=max_probes,
                    eval_windows=eval_windows, eval_seqlen=eval_seqlen, seed=seed, method=method, act_order=act_order,
                    trust_remote_code=trust_remote_code)
    summary = run_pipeline(cfg, rep)
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        rep.console.print(summary_table(summary))
        rep.say(f"wrote {Path(output) / 'summary.json'}")


if __name__ == "__main__":
    main()
