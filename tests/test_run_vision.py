"""`hawqtool run` on an image classifier: the whole chain from the CLI, resumable, scored against full precision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import hawqtool  # noqa: F401 - declares torchvision's op schemas before timm imports it
from hawqtool.cli import main
from hawqtool.recipe import load_recipe
from hawqtool.run import RunConfig

timm = pytest.importorskip("timm")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VISION_KEYS = ("uniform_top1_agreement", "uniform_mean_kl", "mixed_top1_agreement", "mixed_mean_kl", "uniform_bits",
               "uniform_bytes", "uniform_avg_bits", "mixed_bytes", "mixed_avg_bits", "mixed_bits_histogram", "seconds",
               "eval_images", "stage_seconds", "peak_rss_bytes")


def invoke(*args, code: int = 0):
    """Run the CLI in-process and check its exit code."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> str:
    """timm's test_efficientnet (64×64 inputs) with random weights, as a timm:NAME:WEIGHTS reference."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")  # 1000 classes: checkpoints do not rebuild timm_kwargs yet
    path = tmp_path_factory.mktemp("timm") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"input_size": "[3, 64, 64]"})
    return f"timm:test_efficientnet:{path}"


@pytest.fixture
def no_report(monkeypatch) -> list:
    """Skip the sensitivity report's matplotlib figures (~10 s on a busy core); records the calls instead."""
    calls: list = []
    monkeypatch.setattr("hawqtool.run.write_sensitivity_report", lambda *a, **k: calls.append(a))
    return calls


def test_run_scores_an_image_classifier_resumes_and_matches_eval(tiny_cnn, tmp_path, no_report, monkeypatch,
                                                                own_fashion_file):
    out, recipe = tmp_path / "out", tmp_path / "vis.yaml"
    recipe.write_text(f"model: {tiny_cnn}\ncalib: images\ndata: images\ngroup_size: -1\nsymmetric: true\n"
                      f"avg_bits: 3.0\nnsamples: 6\nsens_samples: 4\nsens_max_probes: 4\nsens_min_probes: 2\n"
                      f"eval_images: 8\nout: {tmp_path / 'from-recipe'}\n")
    first = invoke("run", recipe, "--avg-bits", 4.0, "-o", out)
    assert "agree" in first.output and "(HAWQ)" in first.output  # the vision summary table
    s = json.loads((out / "summary.json").read_text())
    for key in VISION_KEYS:
        assert key in s, key
    assert s["task"] == "image-classification" and "baseline_ppl" not in s
    assert s["budget"]["value"] == 4.0 and not (tmp_path / "from-recipe").exists()  # the flags win over the recipe
    assert s["calib_samples"] == 6 and s["sens_samples"] == 4 and s["sensitivity_probes"] == 4  # the recipe's
    for k in ("uniform", "mixed"):
        assert 0 <= s[f"{k}_top1_agreement"] <= 1 and s[f"{k}_mean_kl"] >= 0
    assert s["uniform_bits"] == 4 and s["mixed_bytes"] <= s["uniform_bytes"] * (1 + 1e-9)
    assert s["eval_images"] > 8  # the sample photos and 8 Fashion-MNIST images (photos only without them)
    assert {"sensitivity", "quantize", "eval"} <= set(s["stage_seconds"]) and len(no_report) == 1

    again = invoke("run", recipe, "--avg-bits", 4.0, "-o", out)
    assert again.output.count("artifact is current, skipped") == 5  # sensitivity, 2× quantize, 2× eval
    r = json.loads((out / "summary.json").read_text())
    assert not {"sensitivity", "quantize"} & set(r["stage_seconds"])  # ("eval" times the skip checks too)
    assert r["mixed_mean_kl"] == s["mixed_mean_kl"] and r["uniform_top1_agreement"] == s["uniform_top1_agreement"]

    monkeypatch.setattr("hawqtool.evaluate_stage.EVAL_IMAGES", 8)  # `hawqtool eval` scores the same image set
    ev = json.loads(invoke("eval", out / "mixed", "--json").stdout)
    assert ev["images"] == s["eval_images"]
    assert ev["top1_agreement"] == s["mixed_top1_agreement"] and ev["mean_kl"] == pytest.approx(s["mixed_mean_kl"])

    r = json.loads(invoke("run", recipe, "--avg-bits", 4.0, "--eval-images", 4, "-o", out, "--json").stdout)
    assert not {"sensitivity", "quantize"} & set(r["stage_seconds"])
    assert r["eval_images"] == s["eval_images"] - 4  # re-evaluated on the smaller set, nothing else re-run
    for fmt in ("gptq", "compressed-tensors"):  # HF layouts cannot describe a timm model: one line, nothing written
        e = invoke("export", out / "mixed", "--format", fmt, "-o", tmp_path / fmt, code=1)
        assert "image classifier" in e.output and e.output.count("\n") == 1
        assert not (tmp_path / fmt).exists()


def test_vision_recipe_loads():
    cfg = RunConfig(**load_recipe(RECIPES / "efficientnet-lite0.yaml"))
    assert cfg.model == "efficientnet-lite0" and cfg.calib == "images" and cfg.avg_bits == 4.0
    assert cfg.group_size == -1 and cfg.symmetric and cfg.bit_choices == (2, 3, 4, 8)
    assert cfg.nsamples == 64 and cfg.sens_samples == 16 and cfg.eval_images == 1000


def test_text_data_for_an_image_classifier_is_a_one_line_error(tiny_cnn, tmp_path):
    r = invoke("run", tiny_cnn, "--data", tmp_path / "x.txt", "-o", tmp_path / "o", "-q", code=1)
    assert "--data images" in r.output and r.output.count("\n") == 1


def test_run_refuses_a_tokenizer_without_a_vocabulary(tmp_path):
    """An encoder saved without its tokenizer files gets a special-tokens-only tokenizer from transformers, which
    turns all text into [UNK]: refused in one line rather than scored on identical inputs."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    r = invoke("run", folder, "-o", tmp_path / "o", "-q", code=1)
    assert "unknown token" in r.output and "tokenizer files" in r.output and r.output.count("\n") == 1
