"""--device/--dtype on every stage (issue 16): resolution, one-line refusals, and a proof on the CPU that the
stages are device-clean: with torch's default device set to `meta`, any tensor hawqtool creates without naming
its device is a meta tensor that fails as soon as it meets the model's, as a forgotten `device=` would on a GPU
server. Each stage's result must also equal the plain run's, bit for bit."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from cli_helpers import invoke, one_line_error
from hawqtool.device import model_device, resolve_device, resolve_dtype
from hawqtool.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA device on this machine"))]


@contextlib.contextmanager
def strict_device():
    """Tensors created without an explicit device land on `meta` and break when mixed with real ones."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_strict_device_catches_a_forgotten_device():
    """The check itself can fail: a tensor made without `device=` and used with a model's tensor raises."""
    w = torch.ones(3)
    with strict_device(), pytest.raises((RuntimeError, NotImplementedError)):
        float((w * torch.ones(3)).sum())


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                      else torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    for bad in ("tpu", "cuda:x", "banana"):
        with pytest.raises(UserError, match="--device"):
            resolve_device(bad)
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, tiny_llama, text_file):
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    for args in (["sensitivity", tiny_llama, "--calib", text_file, "-o", tmp_path / "s.json"],
                 ["eval", tiny_llama, "--data", text_file],
                 ["bench", tiny_llama],
                 ["run", tiny_llama, "--calib", text_file, "-o", tmp_path / "run"]):
        res = invoke(*args, "--device", "cuda:0", ok=False)
        one_line_error(res, "CUDA")
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "run").exists()


def _tiny(tiny_llama, device="cpu"):
    from hawqtool.models import load_model

    return load_model(str(tiny_llama), device=device)


def _calib(loaded, text_file, n=4, seqlen=32):
    from hawqtool.inputs import calibration_inputs

    return calibration_inputs(loaded, str(text_file), n, seqlen, seed=1)


def test_sensitivity_is_device_clean(tiny_llama, text_file):
    from hawqtool.stages import compute_sensitivity

    kw = dict(max_probes=4, min_probes=2, batch_size=2, estimator="fisher")
    loaded = _tiny(tiny_llama)
    ids = _calib(loaded, text_file)
    plain = compute_sensitivity(loaded, ids, **kw)
    fresh = _tiny(tiny_llama)  # loading reads files; the stage is what must name its devices
    with strict_device():
        strict = compute_sensitivity(fresh, ids, **kw)
    assert [ls.samples for ls in strict.layers] == [ls.samples for ls in plain.layers]
    assert [ls.qerror for ls in strict.layers] == [ls.qerror for ls in plain.layers]


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_and_eval_are_device_clean(tmp_path, tiny_llama, text_file, method):
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.evaluate import perplexity
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.runtime import load_quantized
    from hawqtool.stages import quantize_stage

    loaded = _tiny(tiny_llama)
    ids = _calib(loaded, text_file)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    plan = fixed_plan(shapes, 3, group_size=16)
    opts = QuantizeOptions(method=method, act_order=method == "gptq", batch_size=2)
    quantize_stage(loaded, plan, ids, opts, tmp_path / "plain")
    fresh = _tiny(tiny_llama)
    with strict_device():
        quantize_stage(fresh, plan, ids, opts, tmp_path / "strict")
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "strict" / "model.safetensors").read_bytes()
    model = load_quantized(tmp_path / "plain")
    windows = ids[:2]
    plain = perplexity(model, windows)
    with strict_device():
        strict = perplexity(model, windows)
    assert strict.nll == plain.nll


@pytest.mark.parametrize("device", DEVICES)
def test_run_on_each_device(tmp_path, tiny_llama, text_file, device):
    """The whole pipeline with --device: the model, its batches and the checkpoint's outputs land where asked."""
    out = tmp_path / "run"
    invoke("run", tiny_llama, "--calib", text_file, "--avg-bits", 4, "-o", out, "--nsamples", 4, "--seqlen", 32,
           "--max-probes", 4, "--eval-windows", 2, "--device", device, "-q")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == str(resolve_device(device))
    assert summary["dtype"] == ("bfloat16" if device == "cuda" else "float32")
    assert 1 < summary["mixed_ppl"] < float("inf") and 1 < summary["uniform_ppl"] < float("inf")


def test_load_model_places_the_model(tiny_llama):
    loaded = _tiny(tiny_llama, device="cpu")
    assert model_device(loaded.model) == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_aphq_is_device_clean():
    """APHQ's block reconstruction (QDrop's random masks drawn from a CPU generator) names every device: under the
    strict default device it gives the plain run's codes and activation ranges."""
    from test_aphq import run, stripes, tiny_vit

    model = tiny_vit(2)
    batches = [{"x": stripes(16, s)[0]} for s in (1, 2)]
    _, plain = run(model, batches, iters=4, batch_size=8)
    with strict_device():
        _, strict = run(model, batches, iters=4, batch_size=8)
    assert plain.act == strict.act and plain.weights.keys() == strict.weights.keys()
    assert all(torch.equal(plain.weights[n].q, strict.weights[n].q) for n in plain.weights)


def test_sensitivity_refuses_float16(tmp_path, tiny_llama, text_file):
    """Without loss scaling, fp16 per-position gradients underflow: one line pointing to bfloat16."""
    one_line_error(invoke("sensitivity", tiny_llama, "--calib", text_file, "--dtype", "float16", "-o",
                          tmp_path / "s.json", ok=False), "float16", "bfloat16")
    assert not (tmp_path / "s.json").exists()
