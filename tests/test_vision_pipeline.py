"""A timm model through the sensitivity and allocate stages from the CLI (BatchNorm folded, conv layers)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import hawqtool  # noqa: F401 - declares torchvision's op schemas before timm imports it
from hawqtool.cli import main
from hawqtool.vision.images import PHOTOS

timm = pytest.importorskip("timm")

# The widths and the one group size these tests allocate with: the error pass over the default menu (6 widths x 3
# group sizes x 2 grids) was 85% of each sensitivity run here (75 s -> 14 s on one core).
ERROR_MENU = ("--bits", "4,8", "--group-size", -1)


def invoke(*args, code: int = 0):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def small_timm(tmp_path_factory):
    from safetensors.torch import save_file

    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"timm:mobilenetv3_small_050:{path}"


def test_sensitivity_and_bops_allocation_on_a_timm_model(small_timm, tmp_path):
    sens, plan = tmp_path / "s.json", tmp_path / "p.json"
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 3,
           "--max-probes", 3, *ERROR_MENU, "-q", "-o", sens)
    rep = json.loads(sens.read_text())
    names = [l["name"] for l in rep["layers"]]
    assert "conv_stem" in names and any(".conv_dw" in n for n in names)  # convolutions, depthwise included
    assert all(l["probes"] == 3 for l in rep["layers"]) and rep["settings"]["estimator"] == "fisher"
    invoke("allocate", sens, "--avg-bits", 4, "--group-size", -1, "--act-bits", "8,16", "--bops-frac", 0.3,
           "--calib", "images", "-q", "-o", plan)
    p = json.loads(plan.read_text())
    assert p["costs"]["bops"] <= p["budget"]["max_bops"] * (1 + 1e-9)
    prof = json.loads(sens.with_suffix(".profile.json").read_text())
    assert all(v["unit"] == "image" and v["macs"] > 0 for v in prof["layers"].values())


def test_vision_references_fail_in_one_line(tmp_path):
    r = invoke("sensitivity", "timm:mobilenetv3_small_050", "-q", code=1)
    assert "give the weights too" in r.output and r.output.count("\n") == 1
    r = invoke("sensitivity", f"timm:mobilenetv3_small_050:{tmp_path / 'none.safetensors'}", "-q", code=1)
    assert "does not exist" in r.output
    r = invoke("sensitivity", "timm:no_such_net:x.safetensors", "-q", code=1)
    assert "unknown timm model" in r.output


def test_quantize_and_eval_a_timm_model(small_timm, tmp_path):
    """Convs through GPTQ per group, a checkpoint rebuilt from its timm architecture, and the image eval."""
    import torch

    from hawqtool.models import load_model
    from hawqtool.runtime import QuantConv2d, load_quantized

    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ck"
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 2,
           "--max-probes", 2, *ERROR_MENU, "-q", "-o", sens)
    invoke("allocate", sens, "--avg-bits", 6, "--bits", "4,8", "--group-size", -1, "--sym", "-q", "-o", plan)
    invoke("quantize", small_timm, "--plan", plan, "--calib", "images", "--nsamples", 8, "-q", "-o", ckpt)
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    assert manifest["timm_arch"] == "mobilenetv3_small_050" and manifest["task"] == "image-classification"
    assert {v["method"] for v in manifest["layers"].values()} == {"gptq"}
    q = load_quantized(ckpt)
    assert isinstance(q.conv_stem, QuantConv2d)
    fp = load_model(small_timm).model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = fp(x), q(x)
    assert torch.isfinite(b).all() and (a - b).abs().max() < a.abs().max()  # quantized, not garbage
    res = json.loads(invoke("eval", ckpt, "--json").stdout)
    assert res["task"] == "image-classification" and 0 <= res["top1_agreement"] <= 1 and res["mean_kl"] >= 0
    assert res["images"] >= len(PHOTOS[0::2])  # at least the evaluation photos (Fashion-MNIST where installed)
    # bf16 (the GPU default): the images take the model's dtype in every stage, as a bf16 conv requires
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 2,
           "--max-probes", 2, *ERROR_MENU, "--dtype", "bfloat16", "-q", "-o", tmp_path / "s16.json")
    invoke("quantize", small_timm, "--plan", plan, "--calib", "images", "--nsamples", 8, "--dtype", "bfloat16", "-q",
           "-o", tmp_path / "ck16")
    for ck in (ckpt, tmp_path / "ck16"):
        r16 = json.loads(invoke("eval", ck, "--dtype", "bfloat16", "--json").stdout)
        assert r16["images"] == res["images"] and 0 <= r16["top1_agreement"] <= 1 and r16["mean_kl"] >= 0


def test_static_activation_ranges_are_calibrated_stored_and_applied(small_timm, tmp_path):
    """--pairs 4:8 with --act-mode static: per-tensor ranges in the manifest, applied to each layer's input."""
    import torch

    from hawqtool.runtime import QuantConv2d, load_quantized

    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ck"
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 2,
           "--max-probes", 2, *ERROR_MENU, "-q", "-o", sens)
    invoke("allocate", sens, "--max-bytes", 1e12, "--bits", 8, "--act-bits", 8, "--pairs", "4:8", "--pin", ".*=4",
           "--group-size", -1, "--calib", "images", "-q", "-o", plan)
    invoke("quantize", small_timm, "--plan", plan, "--calib", "images", "--nsamples", 8, "--method", "rtn",
           "--act-mode", "static", "--act-calib", "minmax", "-q", "-o", ckpt)
    layers = json.loads((ckpt / "hawqtool_manifest.json").read_text())["layers"]
    assert all(v["act_bits"] == 8 and v["act_mode"] == "static" and v["act_scale"] > 0 for v in layers.values())
    q = load_quantized(ckpt)
    conv = q.conv_stem
    assert isinstance(conv, QuantConv2d) and conv.act_static is not None
    s, z = conv.act_static
    x = torch.randn(1, 3, 32, 32) * 3
    xq = torch.clamp(torch.round(x / s) + z, 0, 255)
    assert 0 <= z <= 255 and float(z) == round(z)
    with torch.no_grad():
        want = torch.nn.functional.conv2d((xq - z) * s, conv.dequantized_weight(), conv.bias, conv._conv.stride,
                                          conv._conv.padding, conv._conv.dilation, conv._conv.groups)
        torch.testing.assert_close(conv(x), want)



def test_tf_same_padding_convs_are_quantized_and_run_as_the_model_runs_them(tmp_path):
    """timm's Conv2dSame pads inside its forward: GPTQ's patches and QuantConv2d must see that padding
    (a regression: 8-bit checkpoints of tf_efficientnet_lite0 were far from the float model)."""
    import torch
    from timm.layers import Conv2dSame

    from hawqtool.checkpoint import pack_layer
    from hawqtool.quantize.driver import QuantizeOptions, quantize_model
    from hawqtool.quantize.quantizer import QuantSpec
    from hawqtool.runtime import QuantConv2d

    class Net(torch.nn.Sequential):
        def forward(self, x):  # timm models take their input as `x`
            return super().forward(x)

    torch.manual_seed(0)
    net = Net(Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU(), Conv2dSame(8, 8, 3, stride=2, groups=8))
    x = torch.randn(16, 3, 17, 17)
    with torch.no_grad():
        ref = net(x)
    res = quantize_model(net, {"0": QuantSpec(8, -1, True), "2": QuantSpec(8, -1, True)}, x,
                         QuantizeOptions(method="gptq"))
    for n in ("0", "2"):
        assert res[n].error <= res[n].rtn_error  # H built from the padded patches: GPTQ helps, never hurts
    with torch.no_grad():
        got = net(x)  # weights are now the dequantized 8-bit ones
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
        conv = net[0]
        q = QuantConv2d(pack_layer(res["0"].weight), conv, conv.bias.detach().clone() if conv.bias is not None
                        else None)
        y = q(x)
        want = Conv2dSame(3, 8, 3, stride=2)
        want.weight.data = res["0"].weight.dequantize().reshape(8, 3, 3, 3)
        want.bias = None if conv.bias is None else torch.nn.Parameter(q.bias.detach().clone())
        torch.testing.assert_close(y, want(x))


def test_w8a8_checkpoint_scales_depthwise_inputs_per_channel_and_pointwise_per_pixel(small_timm, tmp_path):
    """Dynamic A8 depthwise convs are written with act_granularity=channel, 1×1 convs with pixel, and run that
    way on the integer kernels."""
    import torch

    from hawqtool.runtime import QuantConv2d, conv_act_granularity, load_quantized

    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ck"
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 2,
           "--max-probes", 2, *ERROR_MENU, "-q", "-o", sens)
    invoke("allocate", sens, "--max-bytes", 1e12, "--bits", 8, "--act-bits", 8, "--group-size", -1, "--sym",
           "--calib", "images", "-q", "-o", plan)
    invoke("quantize", small_timm, "--plan", plan, "--method", "rtn", "--calib", "images", "--nsamples", 4, "-q",
           "-o", ckpt)
    layers = json.loads((ckpt / "hawqtool_manifest.json").read_text())["layers"]
    q = load_quantized(ckpt)
    convs = {n: m for n, m in q.named_modules() if isinstance(m, QuantConv2d)}
    for g in ("channel", "pixel"):
        named = {n for n, m in convs.items() if conv_act_granularity(m._conv) == g}
        assert named and {n for n, v in layers.items() if v.get("act_granularity") == g} == named
        assert all(convs[n].act.granularity == g and convs[n].int8 for n in named)
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(2, 3, 224, 224))).all()
