"""Recipes: YAML files holding `hawqtool run` settings (RunConfig field names), one per model family.

A recipe sets defaults; options given on the command line win. Unknown keys and wrongly
typed values are one-line errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .run import RunConfig

_INTERNAL = {"stage_seconds"}


def recipe_fields() -> dict[str, Any]:
    """RunConfig fields a recipe may set, with their defaults."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else
                     f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            for f in dataclasses.fields(RunConfig) if f.name not in _INTERNAL}


def _nested(key: str, value: Any) -> dict:
    """A recipe's `sensitivity:` or `quantize:` section: stage options (options.NESTED), each checked by type."""
    import difflib

    from .options import NESTED

    cls, allowed = NESTED[key]
    if not isinstance(value, dict):
        raise UserError(f"recipe key {key} must be a mapping of {key} options like {{{allowed[0]}: ...}}, got {value!r}")
    for k in value:
        if not isinstance(k, str) or k not in allowed:
            near = difflib.get_close_matches(str(k), list(allowed), n=1)
            raise UserError(f"recipe section {key} has unknown key {k!r}; "
                            + (f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(allowed)}"))
    defaults = cls()
    out = {k: _coerce(f"{key}.{k}", v, getattr(defaults, k)) for k, v in value.items()}
    for k, v in out.items():
        ok = _NESTED_OK.get(k, lambda _v: True)
        if not ok(v):
            raise UserError(f"recipe key {key}.{k} = {v!r} is not allowed ({ok.__doc__}); fix the recipe")
    return out


def _choice(*values):
    def ok(v):
        return v in values
    ok.__doc__ = "one of " + ", ".join(values)
    return ok


def _at_least(lo, hi=None):
    def ok(v):
        return v >= lo and (hi is None or v <= hi)
    ok.__doc__ = f"at least {lo}" + (f" and at most {hi}" if hi is not None else "")
    return ok


def _regex(v) -> bool:
    import re

    try:
        re.compile(v or "")
    except re.error:
        return False
    return True


_regex.__doc__ = "a regular expression, e.g. 'mlp|lm_head'"

_NESTED_OK = {"only": _regex, "objective": _choice("self-kl", "labels", "output-mse", "pooled-cosine"), "estimator": _choice("auto", "hutchinson", "fisher"),
              "act_mode": _choice("dynamic", "static"), "act_calib": _choice("minmax", "percentile", "mse"),
              "grid": _choice("search", "minmax"), "batch_size": _at_least(1), "blocksize": _at_least(1),
              "percdamp": _at_least(0.0, 1.0), "first_token_weight": _at_least(0.0), "aphq_iters": _at_least(1),
              "trace_ucb": _at_least(0.0), "eigen_iters": _at_least(1), "tune_iters": _at_least(0),
              "tune_lr": _at_least(0.0, 1.0), "tune_scale_lr": _at_least(0.0), "tune_loss": _choice("mse", "relative", "weighted"),
              "tune_dtype": _choice("float32", "bfloat16", "float16")}
# fields whose default is None but whose value is a positive number (budgets, limits)
_NUMBERS = ("max_seconds", "max_bytes", "max_bops", "bops_frac", "max_latency_ms", "latency_frac")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a recipe value against the field's default type (ints may stand for floats)."""
    if key in ("sensitivity", "allocate", "quantize"):
        return _nested(key, value)
    if key == "bit_choices":
        if not isinstance(value, list) or not value or not all(isinstance(b, int) and 1 <= b <= 8 for b in value):
            raise UserError(f"recipe key bit_choices must be a list of widths 1..8 like [2, 3, 4, 8], got {value!r}")
        return tuple(sorted(set(value)))
    if key == "out":
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"recipe key out must be a folder path (a string), got {value!r}")
        return Path(value)
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan / .inf: no setting takes them
        raise UserError(f"recipe key {key} must be a finite number, got {value!r}")
    if default is None and key.rsplit(".", 1)[-1] in _NUMBERS:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"recipe key {key} must be a positive number, got {value!r}")
        return None if value is None else float(value)
    if key == "group_size":  # null: each layer's chosen among the measured group sizes
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
            raise UserError(f"recipe key group_size must be -1 (per channel), a positive size or null, got {value!r}")
        return value
    if key == "nsamples":  # null: the model's default (quantize.driver.nsamples_for)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"recipe key nsamples must be int (calibration windows, at least 1) or null, got {value!r}")
        return value
    if key.rsplit(".", 1)[-1] == "scale_bits":  # null: as the sensitivity report measured them
        if value is not None and (isinstance(value, bool) or value not in (16, 4, 5, 6, 7, 8)):
            raise UserError(f"recipe key {key} must be 16 (fp16 scales), 4..8 (scale codes) or null, got {value!r}")
        return value
    if default is None:  # model, latency_table: a string or null
        if value is not None and not isinstance(value, str):
            raise UserError(f"recipe key {key} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple) and isinstance(value, list):  # YAML lists stand for tuples
        value = tuple(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        raise UserError(f"recipe key {key} must be {type(default).__name__}, got {value!r}")
    return value


def read_yaml(p: Path, what: str, fix: str) -> Any:
    """The parsed YAML file `p` ({} if empty); one-line errors naming `what` when absent or not YAML."""
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; {fix}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from e


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Validated {RunConfig field: value} from a YAML recipe."""
    p = Path(path)
    data = read_yaml(p, "recipe", "pass a YAML file (see recipes/)")
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a mapping of settings, like `avg_bits: 3.0`")
    return check_settings(data, f"recipe {p}")


def check_settings(data: dict, where: str) -> dict[str, Any]:
    """Validated {RunConfig field: value}: an unknown key is a one-line error naming the nearest valid one."""
    import difflib

    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of settings, like `avg_bits: 3.0`")
    fields = recipe_fields()
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise UserError(f"{where} has key {odd[0]!r}, which is not a setting name; keys are names like avg_bits")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(fields))}"
        raise UserError(f"{where} has unknown key {unknown[0]!r}; {hint}")
    return {k: _coerce(k, v, fields[k]) for k, v in data.items()}


def is_recipe(ref: str | None) -> bool:
    """True if a `hawqtool run` argument names a YAML recipe rather than a model."""
    return ref is not None and ref.endswith((".yaml", ".yml"))
