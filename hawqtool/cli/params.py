"""Option types shared by every command, and the group that makes click's usage errors exit 1.

Every value is checked where it enters: a bad one is a one-line error with exit 1 before any work
starts, never a crash deep inside a stage (exit 2) or a value silently ignored. Plain click types
are not enough for floats: NaN compares false with every bound, so `click.FloatRange` lets it
through, and `inf` passes any range without a maximum.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click


class Finite(click.FloatRange):
    """A finite float (NaN and ±inf refused) within [min, max]; `min_open`/`max_open` exclude the bound."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(float(value), param, ctx)


def positive(max_: float | None = None) -> Finite:
    """A finite float > 0 (budgets, fractions, time limits)."""
    return Finite(min=0.0, max=max_, min_open=True)


NON_NEGATIVE = Finite(min=0.0)
COUNT = click.IntRange(min=1, max=2**31 - 1)  # windows, samples, probes, tokens, iterations: at least one
SEED = click.IntRange(min=0, max=2**32 - 1)  # what numpy's and torch's generators both accept


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _group_ok(g: int) -> bool:
    return g == -1 or g >= 1


class GroupSize(click.ParamType):
    """Group size along the inputs: -1 (one group per output channel) or a positive count."""

    name = "group size"

    def convert(self, value, param, ctx):
        try:
            g = value if _is_int(value) else int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an integer; use -1 (per channel) or a positive size like 128", param, ctx)
        if not _group_ok(g):
            self.fail(f"{g} is not a group size; use -1 (per channel) or a positive size like 128", param, ctx)
        return g


class IntList(click.ParamType):
    """'2,3,4,8' -> the sorted distinct tuple (2, 3, 4, 8); every element must satisfy `ok`, described by `rule`."""

    name = "list"

    def __init__(self, ok, rule: str, example: str):
        self.ok, self.rule, self.example = ok, rule, example

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            items = list(value)
        else:
            items = [x.strip() for x in str(value).split(",") if x.strip()]
        try:
            out = tuple(sorted({x if _is_int(x) else int(x) for x in items}))
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of integers like {self.example}", param, ctx)
        if not out:
            self.fail(f"give at least one value, like {self.example}", param, ctx)
        bad = [x for x in out if not self.ok(x)]
        if bad:
            self.fail(f"{bad[0]} is not allowed: {self.rule} (e.g. {self.example})", param, ctx)
        return out


BITS = IntList(lambda b: 1 <= b <= 8, "widths are 1..8", "2,3,4,8")
GROUP_SIZES = IntList(_group_ok, "group sizes are -1 (per channel) or positive", "32,128")
ACT_BITS = IntList(lambda a: a in (8, 16), "activation bits are 8 (W8A8) or 16 (weight-only)", "8,16")


class Text(click.ParamType):
    """A non-empty string (a model reference, a data reference, a file name)."""

    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{value!r} is empty; give a value", param, ctx)
        return value


TEXT = Text()


class PathArg(click.Path):
    """A path that is not empty (click turns '' into '.', which would name the current folder)."""

    def __init__(self, **kw):
        super().__init__(path_type=Path, **kw)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("the path is empty; give a file or folder name", param, ctx)
        return super().convert(value, param, ctx)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class HawqtoolGroup(click.Group):
    """The `hawqtool` group. click reports its usage errors (an unknown option, a missing argument, a
    value its type refuses) as a usage block with exit 2, which this CLI reserves for internal errors:
    here they are one `error:` line naming the problem and where to look, with exit 1. `hawqtool`
    alone prints the help (exit 0)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            self._standalone(args, prog_name, complete_var, **extra)
        except SystemExit as e:
            from ..distributed import end_rank

            end_rank(e.code)  # under torchrun: ends the process here (see end_rank)
            raise

    def _standalone(self, args, prog_name, complete_var, **extra):
        """Run the command; every outcome leaves through sys.exit with this CLI's exit code."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if _is_int(rv) else 0)


def checked_by(parse):
    """A click callback that runs the library's own parser for a free-form option (PATTERN=BITS, W:A pairs,
    regexes) when the command line is parsed, so a bad value is refused before any work even where the
    command would use it late or not at all; the command still receives the raw value."""
    def callback(ctx, param, value):
        from ..errors import UserError

        if value is None or value == ():
            return value
        try:
            parse(value)
        except UserError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        return value
    return callback


def check_regex(p: str, flag: str) -> None:
    """A non-empty regular expression, or a one-line UserError naming `flag`."""
    import re

    from ..errors import UserError

    if not p:
        raise UserError(f"a {flag} pattern is empty; give a regex like '(q|k|v)_proj'")
    try:
        re.compile(p)
    except re.error as e:
        raise UserError(f"{flag} pattern {p!r} is not a valid regular expression ({e})") from None


def parse_ties(patterns) -> None:
    """--tie patterns: non-empty regular expressions."""
    for p in patterns:
        check_regex(p, "--tie")


def _lazy(module: str, name: str):
    """The function `name` of hawqtool.`module`, imported on first call (keeps `--help` fast)."""
    def call(value):
        import importlib

        return getattr(importlib.import_module(f"hawqtool.{module}"), name)(value)
    return call


PINS = checked_by(_lazy("allocate.plan", "parse_pins"))
ALLOWS = checked_by(_lazy("allocate.plan", "parse_allowed"))
PAIRS = checked_by(_lazy("allocate.options", "parse_pairs"))
TIES = checked_by(parse_ties)
ONLY = checked_by(lambda p: check_regex(p, "--only"))
FORMATS = checked_by(_lazy("allocate.options", "parse_formats"))

EMBED_BITS = [4, 6, 8, 16]  # embedding.EMBED_BITS (kept literal: --help must not import torch)


def embed_options(budget: str):
    """--embed-bits and --embed-group-size (allocate, run); `budget` says how the commands' budgets count it."""
    def add(fn):
        fn = click.option("--embed-group-size", type=GroupSize(), default=-1, show_default=True,
                          help="Embedding scales: -1 one fp16 scale per row, or one per group of this many hidden "
                               "units (at 4 bits 128 beats per row by far: RESULTS).")(fn)
        return click.option("--embed-bits", type=click.Choice(EMBED_BITS), default=16, show_default=True,
                            help="Also quantize the input embedding (and a head tied to it, one copy of the codes) at "
                                 f"4/6/8 bits; 16 keeps it. {budget}")(fn)
    return add


def formats_option(what: str):
    """--formats gguf|TYPE,... (sensitivity, allocate, run), checked at parse time; `what` says what it does there."""
    return click.option("--formats", default=None, callback=FORMATS, metavar="gguf|TYPE,...", help=what)


DEVICE_CHOICES = ["auto", "float32", "bfloat16", "float16"]  # --dtype values (device.DTYPES + auto)


def device_options(fn):
    """--device and --dtype (sensitivity, quantize, eval, bench, run): where the stage computes and in what
    precision; checked (device.resolve_device) before any work starts."""
    fn = click.option("--dtype", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                      help="The model's compute dtype: auto = bfloat16 on CUDA, float32 on the CPU. Hessians, "
                           "Cholesky factors and traces stay float32/float64.")(fn)
    return click.option("--device", type=TEXT, default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                        help="Where every tensor of the stage lives: auto = CUDA when available, else the CPU. "
                             "A CUDA request without CUDA is an error, never a silent CPU run.")(fn)


class MemorySize(click.ParamType):
    """A memory size (3GiB, 512MiB, 8GB, bytes), kept as the text; memsize.parse_memory checks it."""

    name = "size"

    def convert(self, value, param, ctx):
        from ..errors import UserError
        from ..memsize import parse_memory

        try:
            parse_memory(value)
        except UserError as e:
            self.fail(str(e).removeprefix("--max-memory ").strip(), param, ctx)
        return str(value).strip()


def offload_options(fn):
    """--offload and --max-memory (sensitivity, quantize, eval, run): stream the model's blocks from its files."""
    fn = click.option("--max-memory", type=MemorySize(), default=None, metavar="SIZE",
                      help="Stream the model block by block when its weights exceed this (e.g. 3GiB); without it, "
                           "when they exceed 80%% of the device's free memory.")(fn)
    return click.option("--offload", is_flag=True,
                        help="Build the model on the meta device and read each block's weights from its safetensors "
                             "files only while the block runs: one block resident at a time.")(fn)


def scale_bits_option(default: int | None, shown: str = ""):
    """--scale-bits: fp16 group scales (16) or k-bit scale codes with one fp16 step per row (4..8); `shown` says
    what a None default means."""
    return click.option("--scale-bits", type=click.Choice(["16", "8", "7", "6", "5", "4"]),
                        default=None if default is None else str(default), show_default=default is not None,
                        callback=lambda _c, _p, v: None if v is None else int(v),
                        help="Group scales: k-bit codes times one fp16 step per row (4..8), which make small groups "
                             "cheap, or fp16 (16). --avg-bits keeps meaning the bytes of uniform B-bit with fp16 "
                             f"scales.{' ' + shown if shown else ''}")


def check_scale_bits(scale_bits: int | None, group_sizes, formats) -> None:
    """A --scale-bits given on the command line that would change nothing is an error (one line), not a no-op:
    ggml types fix their own scales, and per-channel layers have one scale per row."""
    from ..errors import UserError

    if click.get_current_context().get_parameter_source("scale_bits") == click.core.ParameterSource.DEFAULT \
            or scale_bits in (None, 16):
        return
    if formats:
        raise UserError("--formats chooses ggml types, which fix their own scales; drop --scale-bits")
    if group_sizes and all(g == -1 for g in group_sizes):
        raise UserError("--scale-bits codes group scales, and per-channel layers (-1) have one scale per row: give a "
                        "group size, or drop --scale-bits")
