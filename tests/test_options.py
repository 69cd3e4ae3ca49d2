"""One source of defaults (issue 17): the stage commands' flags, `RunConfig` (recipes) and the library functions
take theirs from hawqtool/options.py; compared here by introspection, so a default changed in one place only
fails this test. And every flag of `run` can be set from a recipe."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from hawqtool.cli import main
from hawqtool.options import AllocateOptions, EvalOptions, QuantizeOptions, SensitivityOptions
from hawqtool.run import RunConfig

S, Q, E = SensitivityOptions(), QuantizeOptions(), EvalOptions()

# (command, click parameter name) -> the option's default it must show
CLI = {("sensitivity", "nsamples"): S.nsamples, ("sensitivity", "seqlen"): S.seqlen,
       ("sensitivity", "batch_size"): S.batch_size, ("sensitivity", "objective"): S.objective,
       ("sensitivity", "estimator"): S.estimator, ("sensitivity", "target"): S.target_rel_se,
       ("sensitivity", "min_probes"): S.min_probes, ("sensitivity", "max_probes"): S.max_probes,
       ("sensitivity", "bits"): S.bits, ("sensitivity", "group_size"): None,  # None: S.group_sizes
       ("quantize", "method"): Q.method, ("quantize", "aphq_iters"): Q.aphq_iters,
       ("quantize", "aphq_mlp_relu"): Q.aphq_mlp_relu, ("quantize", "nsamples"): None,  # None: nsamples_for the model
       ("quantize", "seqlen"): Q.seqlen, ("quantize", "act_order"): Q.act_order, ("quantize", "damp"): Q.percdamp,
       ("quantize", "blocksize"): Q.blocksize, ("quantize", "act_mode"): Q.act_mode,
       ("quantize", "act_calib"): Q.act_calib, ("quantize", "grid"): Q.grid,
       ("eval", "data"): E.data, ("eval", "seqlen"): E.seqlen, ("eval", "max_windows"): E.windows,
       ("run", "bits"): S.bits, ("run", "group_size"): None, ("run", "data"): E.data,
       ("run", "nsamples"): None, ("run", "seqlen"): Q.seqlen, ("run", "sens_samples"): S.nsamples,
       ("run", "sens_seqlen"): S.seqlen, ("run", "max_probes"): S.max_probes, ("run", "eval_windows"): E.windows,
       ("run", "eval_seqlen"): E.seqlen, ("run", "method"): Q.method, ("run", "act_order"): Q.act_order,
       ("quantize", "float_target"): Q.float_target, ("quantize", "tune_iters"): Q.tune_iters,
       ("quantize", "tune_lr"): Q.tune_lr, ("sensitivity", "eigen_iters"): S.eigen_iters,
       ("allocate", "bits"): S.bits, ("allocate", "group_size"): None,  # None: the report's group sizes
       ("allocate", "trace_ucb"): AllocateOptions().trace_ucb, ("allocate", "scale_bits"): AllocateOptions().scale_bits,
       ("run", "scale_bits"): AllocateOptions().scale_bits, ("sensitivity", "scale_bits"): S.scale_bits}


def _default(cmd: str, name: str):
    param = next(p for p in main.commands[cmd].params if p.name == name)
    value = param.default
    if name == "bits":  # a list flag: its type parses the shown default
        value = tuple(param.type.convert(value, param, None))
    if name == "scale_bits" and value is not None:  # a choice of strings, made an int by its callback
        value = int(value)
    return value


@pytest.mark.parametrize("cmd, name", sorted(CLI))
def test_cli_defaults_are_the_options(cmd, name):
    assert _default(cmd, name) == CLI[cmd, name]


def test_run_config_defaults_are_the_options():
    rc = RunConfig()
    assert (rc.nsamples, rc.seqlen, rc.method, rc.act_order) == (None, Q.seqlen, Q.method, Q.act_order)  # None: per task
    assert (rc.sens_samples, rc.sens_seqlen, rc.sens_max_probes, rc.sens_min_probes, rc.sens_target) == \
        (S.nsamples, S.seqlen, S.max_probes, S.min_probes, S.target_rel_se)
    assert (tuple(rc.bit_choices), rc.group_size) == (S.bits, None)  # None: chosen among S.group_sizes
    assert (rc.eval_windows, rc.eval_seqlen, rc.data) == (E.windows, E.seqlen, E.data)


def test_library_defaults_are_the_options():
    from hawqtool.evaluate import perplexity
    from hawqtool.stages import compute_sensitivity

    from hawqtool.stages import sensitivity_options

    params = list(inspect.signature(compute_sensitivity).parameters.values())
    assert [p.name for p in params[:3]] == ["loaded", "calib_ids", "options"] and params[2].default is None
    assert sensitivity_options() == S  # no options: SensitivityOptions' defaults
    got = sensitivity_options(qerror_bits=[3, 4], qerror_groups=[64], max_probes=5)  # the former keyword names
    assert (got.bits, got.groups(), got.max_probes, got.objective) == ((3, 4), (64,), 5, S.objective)
    with pytest.raises(TypeError, match="max_probe"):
        sensitivity_options(max_probe=5)
    assert inspect.signature(perplexity).parameters["batch_size"].default == E.batch_size
    assert SensitivityOptions().resolved_estimator() == "fisher"
    assert SensitivityOptions(objective="labels").resolved_estimator() == "hutchinson"


def test_every_run_flag_can_be_set_from_a_recipe():
    """Walk `run`'s options: each is a RunConfig field (recipe key), except the few that are not settings."""
    from hawqtool.recipe import recipe_fields

    not_settings = {"model", "overwrite", "as_json", "verbose", "quiet"}
    renamed = {"output": "out", "bits": "bit_choices", "sym": "symmetric", "max_probes": "sens_max_probes"}
    nested = {"tune_iters": "quantize", "scale_bits": "allocate"}  # run flags that set a field of a nested section
    from hawqtool.options import NESTED

    fields = set(recipe_fields())
    missing = [p.name for p in main.commands["run"].params
               if p.name not in not_settings and renamed.get(p.name, p.name) not in fields
               and not (p.name in nested and p.name in NESTED[nested[p.name]][1])]
    assert not missing, missing
    assert {f.name for f in dataclasses.fields(RunConfig)} >= {"device", "dtype", "offload", "max_memory"}


# Every flag of every stage command, and the recipe key that sets it in `run` ("section.field": a nested section).
# Flags that are not settings of a run: its inputs and outputs (run makes them), how the command prints, and
# `sensitivity --nproc` (a torchrun shorthand: a run is launched by torchrun itself).
NOT_SETTINGS = {"model", "output", "overwrite", "as_json", "verbose", "quiet", "sensitivity_file", "plan_file", "nproc",
                "reference"}  # eval --reference: run always compares with its own baseline
RECIPE_KEY = {
    "sensitivity": {"nsamples": "sens_samples", "seqlen": "sens_seqlen", "target": "sens_target",
                    "min_probes": "sens_min_probes", "max_probes": "sens_max_probes", "bits": "bit_choices",
                    "scale_bits": "allocate.scale_bits"},
    "allocate": {"bits": "bit_choices", "sym": "symmetric", "allows": "allocate.allowed"},
    "quantize": {"damp": "quantize.percdamp"},
    "eval": {"seqlen": "eval_seqlen", "max_windows": "eval_windows"},
}


@pytest.mark.parametrize("cmd", sorted(RECIPE_KEY))
def test_every_stage_flag_can_be_set_from_a_recipe(cmd):
    """Walk the stage command's click options: each is a top-level recipe key or a field of its nested section."""
    from hawqtool.options import NESTED
    from hawqtool.recipe import recipe_fields

    top = set(recipe_fields())
    missing = []
    for p in main.commands[cmd].params:
        if p.name in NOT_SETTINGS:
            continue
        key = RECIPE_KEY[cmd].get(p.name, p.name)
        if "." in key:
            section, name = key.split(".")
            ok = name in NESTED[section][1]
        else:
            ok = key in top or (cmd in NESTED and key in NESTED[cmd][1])
        if not ok:
            missing.append(p.name)
    assert not missing, f"{cmd} flags no recipe can set: {missing}"
