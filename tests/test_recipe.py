"""Recipes set `hawqtool run` defaults; command-line options win; bad recipes are one-line errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hawqtool.cli import main
from hawqtool.errors import UserError
from hawqtool.recipe import load_recipe
from hawqtool.run import RunConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_default_recipe_is_the_default_job():
    cfg = RunConfig(**load_recipe(RECIPES / "smollm2-135m.yaml"))
    assert dataclasses.asdict(cfg) == dataclasses.asdict(RunConfig())


@pytest.mark.parametrize("text, fragment", [
    ("avg_bit: 3.0\n", "unknown key 'avg_bit'"),
    ("avg_bits: three\n", "avg_bits must be float"),
    ("bit_choices: [2, 9]\n", "bit_choices"),
    ("act_order: 1\n", "act_order must be bool"),
    ("nsamples: 3.5\n", "nsamples must be int"),
    ("nsamples: 0\n", "nsamples must be int (calibration windows, at least 1)"),
    ("- a\n- b\n", "must be a mapping"),
    ("avg_bits: [\n", "not valid YAML"),
    ("sensitivity: {objectiv: labels}\n", "did you mean 'objective'"),
    ("sensitivity: {nsamples: 4}\n", "section sensitivity has unknown key 'nsamples'"),  # a top-level key
    ("quantize: {grid: best}\n", "quantize.grid = 'best' is not allowed (one of search, minmax)"),
    ("quantize: {tune_loss: kl}\n", "quantize.tune_loss = 'kl' is not allowed (one of mse, relative, weighted)"),
    ("quantize: {tune_iters: -1}\n", "quantize.tune_iters"),
    ("sensitivity: {only: '('}\n", "sensitivity.only = '(' is not allowed (a regular expression"),
    ("quantize: {percdamp: 2.0}\n", "at most 1.0"),
    ("quantize: 3\n", "must be a mapping of quantize options"),
    ("allocate: {pin: {x: 8}}\n", "did you mean 'pins'"),
    ("allocate: {trace_ucb: -1}\n", "at least 0.0"),
    ("allocate: {max_bytes: -3}\n", "allocate.max_bytes must be a positive number"),
    ("allocate: {max_byte: 3}\n", "did you mean 'max_bytes'"),
    ("sensitivity: {eigen_iters: 0}\n", "sensitivity.eigen_iters = 0 is not allowed"),
    ("quantize: {float_target: 1}\n", "quantize.float_target must be bool"),
    ("out: 5\n", "out must be a folder path"),
    ("out: null\n", "out must be a folder path"),
    ("1: 2\n", "key 1, which is not a setting name"),
    ("quantize: {1: 2}\n", "section quantize has unknown key 1"),
    ("allocate: {max_bytes: .nan}\n", "allocate.max_bytes must be a finite number"),
    ("allocate: {trace_ucb: .inf}\n", "allocate.trace_ucb must be a finite number"),
    ("quantize: {first_token_weight: .inf}\n", "first_token_weight must be a finite number"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, fragment):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        load_recipe(p)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe_exits_1(tmp_path):
    r = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_recipe_sets_defaults_and_flags_win(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"model: {tiny_llama}\ncalib: {text_file}\ndata: {text_file}\navg_bits: 4.0\nnsamples: 8\n"
                      f"seqlen: 64\nsens_samples: 4\nsens_seqlen: 32\nsens_max_probes: 8\neval_windows: 3\n"
                      f"eval_seqlen: 64\nout: {tmp_path / 'from-recipe'}\n")
    r = CliRunner().invoke(main, ["run", str(recipe), "--avg-bits", "3.0", "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["budget"]["value"] == 3.0  # the flag, not the recipe's 4.0
    assert s["eval_tokens"] == 3 * 63 and s["calib_samples"] == 8  # the recipe's, not the defaults
    assert (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "from-recipe").exists()


def test_nested_stage_sections_reach_the_stages(tmp_path, tiny_llama, text_file):
    """`sensitivity:` and `quantize:` sections set what the stage commands' flags set (objective, grid, damping)."""
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {tiny_llama}\ncalib: {text_file}\ndata: {text_file}\nnsamples: 4\nseqlen: 32\n"
                 "sens_samples: 4\nsens_seqlen: 32\nsens_max_probes: 4\nsens_min_probes: 2\neval_windows: 2\n"
                 "eval_seqlen: 32\navg_bits: 4.0\nsensitivity: {objective: labels}\n"
                 "quantize: {grid: minmax, percdamp: 0.05}\nallocate: {pins: {down_proj: 8}, auto_ties: true}\n")
    res = CliRunner().invoke(main, ["run", str(r), "-o", str(tmp_path / "out"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sens = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert sens["objective"] == "labels" and sens["estimator"].startswith("hutchinson")
    opts = json.loads((tmp_path / "out" / "mixed" / "hawqtool_manifest.json").read_text())["options"]
    assert opts["grid"] == "minmax" and opts["percdamp"] == 0.05
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())["layers"]
    assert all(lp["bits"] == 8 for lp in plan if "down_proj" in lp["name"])
    bits = {lp["name"]: lp["bits"] for lp in plan}
    assert all(bits[f"model.layers.{i}.mlp.gate_proj"] == bits[f"model.layers.{i}.mlp.up_proj"] for i in range(2))


def test_every_stage_setting_reaches_run(tmp_path, tiny_llama, text_file):
    """The settings a recipe gained with the options objects (issue 17) reach the stages: a measured head and
    top eigenvalues (sensitivity), a byte budget and the Pareto sweep (allocate), the float target (quantize)."""
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {tiny_llama}\ncalib: {text_file}\ndata: {text_file}\nnsamples: 4\nseqlen: 32\n"
                 "sens_samples: 4\nsens_seqlen: 32\nsens_max_probes: 4\nsens_min_probes: 2\neval_windows: 2\n"
                 "eval_seqlen: 32\navg_bits: 8.0\n"
                 "sensitivity: {quantize_head: true, eigen: true, eigen_iters: 2, max_seconds: 600}\n"
                 "allocate: {max_bytes: 30000, sweep: true}\nquantize: {float_target: true}\n")
    res = CliRunner().invoke(main, ["run", str(r), "-o", str(tmp_path / "out"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    sens = json.loads((out / "sensitivity.json").read_text())
    assert "lm_head" in [ls["name"] for ls in sens["layers"]] and sens["settings"]["eigen"]["max_iters"] == 2
    assert all(ls["top_eigenvalue"] is not None for ls in sens["layers"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["total_bytes"] <= 30000 < json.loads((out / "plan_uniform.json").read_text())["total_bytes"] * 4
    assert (out / "plan.sweep.json").is_file() and (out / "plan.sweep.png").is_file()
    manifest = json.loads((out / "mixed" / "hawqtool_manifest.json").read_text())
    assert manifest["options"]["float_target"] is True
    assert "lm_head" in manifest["layers"]



def test_run_tune_iters_flag_wins_over_the_recipe(tmp_path, tiny_llama, text_file):
    """`run --tune-iters N` sets quantize.tune_iters over the recipe's value; the checkpoint records and ran it."""
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {tiny_llama}\ncalib: {text_file}\ndata: {text_file}\nnsamples: 4\nseqlen: 32\n"
                 "sens_samples: 4\nsens_seqlen: 32\nsens_max_probes: 4\nsens_min_probes: 2\neval_windows: 2\n"
                 "eval_seqlen: 32\navg_bits: 3.0\nquantize: {tune_iters: 7, percdamp: 0.02}\n")
    res = CliRunner().invoke(main, ["run", str(r), "--tune-iters", "3", "-o", str(tmp_path / "out"), "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "mixed" / "hawqtool_manifest.json").read_text())
    assert manifest["options"]["tune_iters"] == 3 and manifest["options"]["percdamp"] == 0.02
    notes = [n for layer in manifest["layers"].values() for n in layer["notes"]]
    assert any(n.startswith("block tuned (3 steps)") for n in notes), notes
