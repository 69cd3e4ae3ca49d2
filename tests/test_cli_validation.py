"""Bad input through the CLI is exit 1 with one `error:` line naming the problem, never exit 2 (internal
error), a traceback, or a value silently ignored: option values, artifact fields, data files, model
folders and output paths, then a fuzz run over every option of every command."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from test_cli_e2e import one_line_error

from hawqtool.cli import main
from hawqtool.cli.params import Finite, GroupSize, IntList, PathArg, Text

SMALL_SENS = ["--nsamples", "2", "--seqlen", "16", "--max-probes", "2", "--min-probes", "1", "-q"]
SMALL_QUANT = ["--nsamples", "2", "--seqlen", "16", "-q"]


def cli(*args):
    """Run the CLI in-process like a user would (no exception escapes: click's exit code is what is seen)."""
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_llama, text_file):
    """sens.json and plan.json of the tiny 2-layer Llama, made through the CLI once for the module."""
    d = tmp_path_factory.mktemp("valid")
    assert cli("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", *SMALL_SENS).exit_code == 0
    assert cli("allocate", d / "sens.json", "--avg-bits", "3", "-o", d / "plan.json", "-q").exit_code == 0
    return d


def _edited_copy(src, dst, edit):
    """Copy a JSON artifact with `edit(dict)` applied; return the new path."""
    raw = json.loads(src.read_text())
    edit(raw)
    dst.write_text(json.dumps(raw))
    return dst


class NotATensor:
    """A pickled object of this class makes a .bin file that torch's weights-only loader refuses."""


# (command line with {m}=model, {t}=text, {s}=sens.json, {p}=plan.json, {o}=a fresh output; words the line names)
OPTION_CASES = [
    ("allocate {s} --avg-bits nan -o {o}", ["--avg-bits", "finite"]),
    ("allocate {s} --avg-bits inf -o {o}", ["--avg-bits", "finite"]),
    ("allocate {s} --avg-bits=-3 -o {o}", ["--avg-bits"]),
    ("allocate {s} --max-bytes nan -o {o}", ["--max-bytes", "finite"]),
    ("allocate {s} --avg-bits 3 --trace-ucb nan -o {o}", ["--trace-ucb"]),
    ("allocate {s} --avg-bits 3 --bits 2,13 -o {o}", ["--bits", "13"]),
    ("allocate {s} --avg-bits 3 --group-size 0 -o {o}", ["--group-size"]),
    ("allocate {s} --avg-bits 3 --pin x=13 -o {o}", ["--pin"]),
    ("allocate {s} --avg-bits 3 --tie ( -o {o}", ["--tie", "regular expression"]),
    ("allocate {s} --avg-bits 3 --pairs 4:1 -o {o}", ["--pairs"]),
    ("sensitivity {m} --calib {t} --seqlen 0 -o {o}", ["--seqlen"]),
    ("sensitivity {m} --calib {t} --nsamples 0 -o {o}", ["--nsamples"]),
    ("sensitivity {m} --calib {t} --nsamples=-1 -o {o}", ["--nsamples"]),
    ("sensitivity {m} --calib {t} --max-probes 0 -o {o}", ["--max-probes"]),
    ("sensitivity {m} --calib {t} --target nan -o {o}", ["--target", "finite"]),
    ("sensitivity {m} --calib {t} --only ( -o {o}", ["--only", "regular expression"]),
    ("sensitivity {m} --calib {t} --only nothing_is_named_so -o {o}", ["no quantizable layers", "nothing_is_named_so"]),
    ("quantize {m} --plan {p} --calib {t} --blocksize 0 -o {o}", ["--blocksize"]),
    ("quantize {m} --plan {p} --calib {t} --damp nan -o {o}", ["--damp", "finite"]),
    ("quantize {m} --plan {p} --calib {t} --damp=-1 -o {o}", ["--damp"]),
    ("quantize {m} --plan {p} --calib {t} --first-token-weight nan -o {o}", ["--first-token-weight"]),
    ("eval {m} --data {t} --windows 0", ["--windows"]),
    ("eval {m} --data {t} --seqlen abc", ["--seqlen", "integer"]),
    ("eval {m} --no-such-option", ["--no-such-option"]),
    ("quantize {m} --calib {t} -o {o}", ["--plan"]),
    ("bench {m} --pairs 9:9", ["--pairs"]),
]


@pytest.mark.parametrize("line,words", OPTION_CASES, ids=[c[0].split(" {o}")[0] for c in OPTION_CASES])
def test_a_bad_option_value_is_one_line_and_exit_1(staged, tiny_llama, text_file, tmp_path, line, words):
    args = [a.format(m=tiny_llama, t=text_file, s=staged / "sens.json", p=staged / "plan.json", o=tmp_path / "out")
            for a in line.split()]
    one_line_error(cli(*args), *words)
    assert not (tmp_path / "out").exists()


def test_plan_fields_are_checked_at_load(staged, tiny_llama, text_file, tmp_path):
    plan = staged / "plan.json"
    bits13 = _edited_copy(plan, tmp_path / "b13.json", lambda r: r["layers"][0].update(bits=13))
    one_line_error(cli("quantize", tiny_llama, "--plan", bits13, "--calib", text_file, "-o", tmp_path / "c1",
                       *SMALL_QUANT), "bits 13", r"1..8")
    g0 = _edited_copy(plan, tmp_path / "g0.json", lambda r: r["layers"][1].update(group_size=0))
    one_line_error(cli("quantize", tiny_llama, "--plan", g0, "--calib", text_file, "-o", tmp_path / "c2",
                       *SMALL_QUANT), "group_size 0", r"layers.0")
    twice = _edited_copy(plan, tmp_path / "twice.json", lambda r: r["layers"].append(r["layers"][0]))
    one_line_error(cli("report", staged / "sens.json", "--plan", twice, "-o", tmp_path / "rep"), "listed twice")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_sensitivity_fields_are_checked_at_load(staged, tmp_path):
    sens = staged / "sens.json"
    for i, (edit, words) in enumerate([(lambda r: r["layers"][0].update(trace=math.nan), ["trace nan"]),
                                       (lambda r: r["layers"][0].update(shape=[0, 4]), ["shape"]),
                                       (lambda r: r["layers"][2]["qerror"].update({"3/128/asym": -1.0}), ["qerror"]),
                                       (lambda r: r.update(layers=[]), ["no layers"])]):
        bad = _edited_copy(sens, tmp_path / f"s{i}.json", edit)
        one_line_error(cli("allocate", bad, "--avg-bits", "3", "-o", tmp_path / f"p{i}.json"), str(bad), *words)
        assert not (tmp_path / f"p{i}.json").exists()


def test_a_plan_for_a_smaller_model_is_refused(staged, corpus_text, text_file, tmp_path_factory, tmp_path):
    """A 2-layer plan's layer names are a subset of an 8-layer model's: quantizing with it would leave 42 of
    56 layers in full precision under a manifest that claims otherwise."""
    deep = make_tiny_llama(tmp_path_factory.mktemp("deep8"), corpus_text, layers=8)
    res = cli("quantize", deep, "--plan", staged / "plan.json", "--calib", text_file, "-o", tmp_path / "ck",
              *SMALL_QUANT)
    one_line_error(res, "14 of the model's 56", "hawqtool allocate")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.partial").exists()


def test_data_files_must_be_utf8(tiny_llama, text_file, tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
    one_line_error(cli("sensitivity", tiny_llama, "--calib", jsonl, "-o", tmp_path / "s.json", *SMALL_SENS),
                   "not UTF-8", "line 1")
    txt = tmp_path / "bad.txt"
    good = text_file.read_bytes()
    txt.write_bytes(good[:40_000] + b"\xff" + good[40_000:])
    res = cli("eval", tiny_llama, "--data", txt, "--seqlen", "16", "--windows", "1")
    line = good[:40_000].count(b"\n") + 1
    one_line_error(res, "not UTF-8", f"line {line}")


@pytest.fixture
def broken_models(tiny_llama, tmp_path):
    """Copies of the tiny Llama: NaN in one weight, a config.json that disagrees with the weights (shape;
    layer count), and weights as a pickle holding an object besides tensors."""
    sd = load_file(tiny_llama / "model.safetensors")
    out = {}
    for name in ("nan", "shape", "layers", "pickle"):
        out[name] = tmp_path / name
        shutil.copytree(tiny_llama, out[name])
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("q_proj.weight"))
    bad[key] = bad[key].clone()
    bad[key][1, 2] = math.inf
    save_file(bad, out["nan"] / "model.safetensors", metadata={"format": "pt"})
    for name, edit in (("shape", {"intermediate_size": 96}), ("layers", {"num_hidden_layers": 3})):
        cfg = json.loads((out[name] / "config.json").read_text())
        (out[name] / "config.json").write_text(json.dumps({**cfg, **edit}))
    (out["pickle"] / "model.safetensors").unlink()
    torch.save({"extra": NotATensor(), **sd}, out["pickle"] / "pytorch_model.bin")
    out["key"] = key
    return out


def test_broken_model_folders_are_named(broken_models, text_file, tmp_path):
    def sens(model):
        return cli("sensitivity", model, "--calib", text_file, "-o", tmp_path / "s.json", *SMALL_SENS)

    one_line_error(sens(broken_models["nan"]), "NaN/inf", broken_models["key"].removesuffix(".weight"))
    one_line_error(sens(broken_models["shape"]), "config.json", "does not match", "[32, 64]", "[32, 96]")
    one_line_error(sens(broken_models["layers"]), "config.json", "model.layers.2.")
    one_line_error(sens(broken_models["pickle"]), "pickled", "safetensors")
    one_line_error(cli("eval", broken_models["nan"], "--data", text_file, "--seqlen", "16", "--windows", "1"),
                   "NaN/inf")
    assert not (tmp_path / "s.json").exists()


def test_outputs_that_cannot_be_written(staged, tmp_path, monkeypatch):
    sens = staged / "sens.json"
    (tmp_path / "folder").mkdir()
    one_line_error(cli("allocate", sens, "--avg-bits", "3", "-o", tmp_path / "folder"), "folder")
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("allocate", sens, "--avg-bits", "3", "-o", tmp_path / "afile" / "plan.json"), "afile")
    real_replace = os.replace

    def read_only(src, dst, *a, **k):  # the file system turns read-only as the plan is renamed into place
        if str(dst).endswith("ro.json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", read_only)
    one_line_error(cli("allocate", sens, "--avg-bits", "3", "-o", tmp_path / "ro.json"), "ro.json", "Read-only")


def test_out_of_memory_is_a_user_error_but_other_failures_stay_internal(tiny_llama, monkeypatch):
    """Sizes the machine cannot hold are fixed by the user (exit 1); a genuine bug stays exit 2 with its log."""
    def fails_with(exc):
        def evaluate_any(*a, **k):
            raise exc
        monkeypatch.setattr("hawqtool.evaluate_stage.evaluate_any", evaluate_any)
        return cli("eval", tiny_llama)

    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 68719476736 bytes.")
    one_line_error(fails_with(oom), "out of memory", "--nsamples")
    bug = fails_with(RuntimeError("shape '[2, 0, -1, 8]' is invalid"))
    assert bug.exit_code == 2 and bug.stderr.startswith("internal error: RuntimeError") and "traceback in" in bug.stderr


def test_recipe_values_pass_the_flags_checks(tmp_path):
    recipe = tmp_path / "r.yaml"
    for text, key in (("nsamples: 0\n", "nsamples"), ("avg_bits: .nan\n", "avg_bits"),
                      ("sens_target: -1.0\n", "sens_target"), ("group_size: 0\n", "group_size")):
        recipe.write_text(text)
        one_line_error(cli("run", recipe, "-o", tmp_path / "out"), f"key {key}")
    assert not (tmp_path / "out").exists()


def test_no_command_prints_the_help():
    res = cli()
    assert res.exit_code == 0 and "sensitivity" in res.output and not res.stderr


# ----------------------------------------------------------------------------------------------------------
# fuzz: every option of every command, bad values derived from its declared type

# free-form options, checked at parse time by the library's own parsers (params.checked_by)
FREE_FORM = {("allocate", "pins"): ["x=13", "x=0", "=4", "x", ""], ("allocate", "allows"): ["x=0", "x=2,9", "=", ""],
             ("allocate", "ties"): ["(", "", "[a-"], ("allocate", "pairs"): ["4:1", "9:8", "x", "4:", "4:16"],
             ("bench", "pairs"): ["4:1", "9:9", "a:b"],
             **{(cmd, "formats"): ["Q7_Z", "ggufx", "Q4_K,"] for cmd in ("allocate", "run", "sensitivity")},
             **{(cmd, "max_memory"): ["lots", "0", "-1GiB", "3 TiB", ""] for cmd in ("eval", "quantize", "run", "sensitivity")},
             **{(cmd, "device"): ["tpu", "cuda:x", "mps", "banana"] for cmd in ("bench", "eval", "quantize", "run",
                                                                               "sensitivity")}}


def bad_values(kind: click.ParamType) -> list[str]:
    """Values a parameter of this type must refuse: wrong types, empty strings, NaN/inf, just out of range."""
    if isinstance(kind, Finite):
        vals = ["nan", "inf", "-inf", "abc", "", "1,2"]
        if kind.min is not None:
            vals.append(str(kind.min if kind.min_open else kind.min - 1))
        if kind.max is not None:
            vals.append(str(kind.max * 2 + 1))
        return vals
    if isinstance(kind, click.IntRange):
        vals = ["abc", "", "1.5", "nan", "inf"]
        vals += [str(kind.min - 1)] if kind.min is not None else []
        return vals + ([str(kind.max + 1)] if kind.max is not None else [])
    if isinstance(kind, GroupSize):
        return ["0", "-2", "abc", "", "1.5"]
    if isinstance(kind, IntList):  # plus each of a few integers the list's own rule refuses
        return ["", ",", "abc", "2,x", "nan"] + [f"4,{x}" for x in (-5, -2, 0, 1, 9, 13, 32) if not kind.ok(x)]
    if isinstance(kind, Text):
        return ["", "  "]
    if isinstance(kind, PathArg):
        return ["", " "]
    if isinstance(kind, click.Choice):
        return ["bogus", ""]
    raise AssertionError(f"no bad values for {kind!r}")


def base_args(name, tiny_llama, staged, tmp_path) -> list[str]:
    """Valid positional arguments and required options of each command (the fuzzed value is the only fault)."""
    sens, plan, out = staged / "sens.json", staged / "plan.json", tmp_path / "fuzz-out"
    return {"sensitivity": [tiny_llama, "-o", out], "allocate": [sens, "--avg-bits", "3", "-o", out],
            "quantize": [tiny_llama, "--plan", plan, "-o", out], "eval": [tiny_llama], "bench": [tiny_llama],
            "export": [tiny_llama, "--format", "gptq", "-o", out], "report": [sens, "-o", out],
            "run": [tiny_llama, "-o", out], "batch": [staged / "jobs.yaml", "-o", out]}[name]


def test_fuzz_every_option_of_every_command(staged, tiny_llama, tmp_path):
    """Each bad value is refused before any work: exit 1, one line naming the option. An option with no
    validating type (other than the few free-form ones tested above) fails this test."""
    (staged / "jobs.yaml").write_text(f"jobs:\n  - name: a\n    model: {tiny_llama}\n")
    tried, untyped = 0, []
    for name, cmd in sorted(main.commands.items()):
        base = [str(a) for a in base_args(name, tiny_llama, staged, tmp_path)]
        for param in cmd.params:
            if isinstance(param, click.Option) and (param.is_flag or param.name in ("help", "version")):
                continue
            values = FREE_FORM.get((name, param.name))
            if values is None and not isinstance(param.type, (Finite, click.IntRange, GroupSize, IntList, Text,
                                                              PathArg, click.Choice)):
                untyped.append(f"{name} {param.name}: {param.type!r}")
                continue
            for value in values if values is not None else bad_values(param.type):
                if isinstance(param, click.Argument):
                    args, label = [value] + [a for a in base[1:]], param.human_readable_name
                else:
                    flag = max(param.opts, key=len)
                    args, label = base + [f"{flag}={value}"], flag
                res = CliRunner().invoke(main, [name, *args])
                assert res.exit_code == 1, (name, label, value, res.exit_code, res.output)
                lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: ") and label in lines[0], (name, value, lines)
                tried += 1
    assert not untyped, untyped
    assert tried > 250  # every command's options were reached
    assert not (tmp_path / "fuzz-out").exists()


def test_sensitivity_only_measures_the_matching_layers(tiny_llama, text_file, tmp_path):
    out = tmp_path / "mlp.json"
    assert cli("sensitivity", tiny_llama, "--calib", text_file, "-o", out, *SMALL_SENS, "--only", r"mlp\.down").exit_code == 0
    names = [ls["name"] for ls in json.loads(out.read_text())["layers"]]
    assert names and all(n.endswith("mlp.down_proj") for n in names), names
