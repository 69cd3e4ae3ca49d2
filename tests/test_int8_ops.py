"""Integer-activation Linear/Conv2d (quant_kernels.int8_ops, through the runtime layers) against float64
references built from the fake-quantized input and the dequantized weight, on fresh random inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant_kernels import dequantize, fast_cpu, matmul_reference
from quant_kernels.int8_ops import ActSpec, fake_quant
from hawqtool.runtime import QuantConv2d, QuantLinear, _same_pad
from test_kernels_fast import random_packed

pytestmark = pytest.mark.skipif(fast_cpu.extension() is None, reason="fast CPU path unavailable")


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() <= tol * (ref.abs().max().item() + 1e-6)


STATIC = [(8, 0.05, 128.0), (8, 0.03, 17.0), (8, 0.04, 250.0), (4, 0.4, 6.0), (3, 0.9, 0.0)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act", [(8, None, 0.0), (4, None, 0.0)] + STATIC)
def test_linear_int8_matches_fake_quant_reference(bits, act):
    """Dynamic (8- and 4-bit per token) and static asymmetric ranges whose zero puts the codes anywhere
    in [0, 2^b−1] (the kernel sees q − 128 for 8 bits and adds s·(128 − z)·Σ_k Ŵ)."""
    spec = ActSpec(*act)
    pw = random_packed(45, 200, bits, -1 if bits == 8 else 64, bits == 8, bits == 3, bits * 7 + act[0])
    layer = QuantLinear(pw, torch.randn(45), act_bits=spec.bits,
                        act_static=None if spec.scale is None else (spec.scale, spec.zero))
    assert layer.int8 and "kernel=int8" in repr(layer)
    g = torch.Generator().manual_seed(bits)
    for m in (1, 5, 40):
        x = torch.randn(2, m, 200, generator=g) * 3
        ref = matmul_reference(fake_quant(x, spec).reshape(-1, 200), pw).reshape(2, m, 45) + layer.bias.double()
        close(layer(x), ref)


def test_linear_without_integer_kernel_says_so_and_matches():
    pw = random_packed(20, 64, 6, 32, False, False, 3)  # 6-bit: no integer kernel
    layer = QuantLinear(pw, None, act_bits=8, act_static=(0.05, 100.0))
    assert not layer.int8 and "kernel=fake-quant" in repr(layer)
    x = torch.randn(3, 64)
    close(layer(x), matmul_reference(fake_quant(x, ActSpec(8, 0.05, 100.0)), pw))


def _conv_case(groups: int, same: bool, bits: int, sym: bool, seed: int, k: int = 3):
    C, O = (12, 12) if groups > 1 else (5, 7)
    if k == 1:  # pointwise, strided: the pixels themselves are the GEMM rows
        conv = nn.Conv2d(C, O, 1, stride=2, groups=groups, bias=False)
    elif k == 5:  # stride 3: the generic-stride row loop
        conv = nn.Conv2d(C, O, 5, stride=3, padding=2, groups=groups, bias=False)
    elif same:
        conv = pytest.importorskip("timm.layers.conv2d_same").Conv2dSame(C, O, k, stride=2, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(C, O, k, stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=groups, bias=False)
    pw = random_packed(O, C // groups * conv.kernel_size[0] * conv.kernel_size[1], bits, -1, sym, False, seed)
    return conv, pw


@pytest.mark.parametrize("groups, same, k", [(1, False, 3), (1, True, 3), (12, False, 3), (12, True, 3), (1, False, 1),
                                             (12, False, 5), (1, False, 5)])
@pytest.mark.parametrize("bits, sym", [(4, False), (8, True), (8, False), (2, True)])
@pytest.mark.parametrize("act", [(8, None, 0.0), (8, 0.05, 140.0), (4, 0.3, 3.0)])
def test_conv_int8_matches_fake_quant_reference(groups, same, k, bits, sym, act):
    """groups=1 (one integer GEMM over unfolded pixels) and depthwise (dw_a8); nn.Conv2d with padding,
    stride and dilation, and timm's Conv2dSame; 1×1 strided and 5×5 stride-3 convs; dynamic per-image and
    static ranges. Per-channel weights take the short-K kernel (gemm_vert_a8) for groups=1."""
    conv, pw = _conv_case(groups, same, bits, sym, bits + 3 * groups, k)
    spec = ActSpec(*act)
    bias = torch.randn(pw.out_features)
    ref_conv = copy.deepcopy(conv).double()
    layer = QuantConv2d(pw, conv, bias, act_bits=spec.bits,
                        act_static=None if spec.scale is None else (spec.scale, spec.zero))
    assert layer.int8 and "kernel=int8" in repr(layer)
    x = torch.randn(3, conv.in_channels, 11, 13) * 2
    x[1] = 0.0  # an all-zero image: dynamic scale 1, output = bias (+ the static offset term)
    xh = fake_quant(x, spec, per_image=True).double()
    w = dequantize(pw, torch.float64).reshape(layer.shape)
    ref_conv.weight, ref_conv.bias = nn.Parameter(w), nn.Parameter(bias.double())
    close(layer(x), ref_conv(xh))


@pytest.mark.parametrize("bits", [3, 4])
def test_conv_with_grouped_weights_takes_the_linear_kernel(bits):
    """groups=1 with group-wise scales (not per channel): unfolded patches through the W{2,3,4}A8 GEMM."""
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=False)
    pw = random_packed(7, 45, bits, 16, False, False, bits)
    ref = copy.deepcopy(conv).double()
    layer = QuantConv2d(pw, conv, None, act_bits=8)
    assert layer.int8
    x = torch.randn(2, 5, 9, 9)
    ref.weight = nn.Parameter(dequantize(pw, torch.float64).reshape(7, 5, 3, 3))
    close(layer(x), ref(fake_quant(x, ActSpec(8), per_image=True).double()))


def test_conv_without_integer_kernel_says_so_and_matches():
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False)  # grouped, not depthwise
    pw = random_packed(4, 27, 4, -1, True, False, 1)
    ref = copy.deepcopy(conv).double()
    layer = QuantConv2d(pw, conv, None, act_bits=8)
    assert not layer.int8 and "kernel=fake-quant" in repr(layer)
    x = torch.randn(2, 6, 8, 8)
    ref.weight = nn.Parameter(dequantize(pw, torch.float64).reshape(4, 3, 3, 3))
    close(layer(x), ref(fake_quant(x, ActSpec(8), per_image=True).double()))


def test_same_pad_matches_tf_same_output_size():
    conv = nn.Conv2d(1, 1, 3, stride=2)
    for h in (7, 8, 224):
        y = F.conv2d(_same_pad(torch.zeros(1, 1, h, h), conv), torch.zeros(1, 1, 3, 3), stride=2)
        assert y.shape[-1] == -(-h // 2)


@pytest.mark.parametrize("bits", [4, 8])
def test_depthwise_per_channel_activation_scales(bits):
    """Dynamic scales per (image, channel) on a depthwise conv: integer path = fake-quant reference, and finer
    than per image on inputs whose channels differ in range by orders of magnitude."""
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    pw = random_packed(6, 9, bits, -1, True, False, bits)
    ref = copy.deepcopy(conv).double()
    ref.weight = nn.Parameter(dequantize(pw, torch.float64).reshape(6, 1, 3, 3))
    layer = QuantConv2d(pw, conv, None, act_bits=8, act_granularity="channel")
    assert layer.int8 and "per channel" in repr(layer)
    x = torch.randn(3, 6, 10, 10) * torch.logspace(-3, 1, 6).reshape(1, 6, 1, 1)
    x[1, 2] = 0.0  # an all-zero channel: scale 1
    spec = ActSpec(8, granularity="channel")
    y, exact = layer(x), ref(x.double())
    close(y, ref(fake_quant(x, spec, per_image=True).double()))
    per_image = ref(fake_quant(x, ActSpec(8), per_image=True).double())
    small = slice(0, 2)  # the small-range channels: per-image scales wipe them out
    err_c = (y[:, small].double() - exact[:, small]).abs().max()
    err_i = (per_image[:, small] - exact[:, small]).abs().max()
    assert err_c < 0.1 * err_i


@pytest.mark.parametrize("bits, gs", [(8, -1), (4, -1), (4, 16)])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_per_pixel_activation_scales(bits, gs, stride):
    """1×1 convs scale each pixel as a token (short-K kernel, or the Linear kernel for grouped weights)."""
    torch.manual_seed(100 * bits + 10 * stride + (gs > 0))  # its own draws: the result did depend on earlier tests
    conv = nn.Conv2d(40, 12, 1, stride=stride, bias=True)
    pw = random_packed(12, 40, bits, gs, bits == 8, False, bits + stride)
    bias = torch.randn(12)
    ref = copy.deepcopy(conv).double()
    ref.weight, ref.bias = nn.Parameter(dequantize(pw, torch.float64).reshape(12, 40, 1, 1)), nn.Parameter(bias.double())
    layer = QuantConv2d(pw, conv, bias, act_bits=8, act_granularity="pixel")
    assert layer.int8 and "per pixel" in repr(layer)
    x = torch.randn(2, 40, 7, 9) * torch.linspace(0.01, 3, 9)  # pixels of very different ranges
    x[1, :, 3, 4] = 0.0
    spec = ActSpec(8, granularity="pixel")
    close(layer(x), ref(fake_quant(x, spec, per_image=True).double()))
    exact, coarse = ref(x.double()), ref(fake_quant(x, ActSpec(8), per_image=True).double())
    assert (layer(x).double() - exact).abs().max() < (coarse - exact).abs().max()


def test_fine_activation_scales_are_refused_elsewhere():
    from quant_kernels.int8_ops import conv2d_int8

    pw = random_packed(4, 27, 4, -1, True, False, 2)
    for g, match in (("channel", "depthwise"), ("pixel", "1×1")):
        with pytest.raises(ValueError, match=match):
            conv2d_int8(torch.randn(1, 3, 5, 5), pw, None, ActSpec(8, granularity=g), (3, 3), (1, 1), (1, 1), (1, 1), 1)


def test_w8a8_layout_is_built_where_the_weight_lives():
    """The cached int8 layout of a symmetric per-channel 8-bit weight is made on the weight's device (a CPU copy
    would be sent to the GPU on every forward). The meta device stands in for CUDA."""
    from hawqtool.checkpoint import pack_layer
    from hawqtool.quantize.quantizer import QuantSpec, rtn
    from quant_kernels.fast_cpu import repack_w8a8

    g = torch.Generator().manual_seed(0)
    pw = pack_layer(rtn(torch.randn(8, 40, generator=g), QuantSpec(8, group_size=-1, symmetric=True)))
    wq, sw = repack_w8a8(pw)
    assert wq.shape == (8, 48) and wq.dtype == torch.int8 and wq.device.type == "cpu"
    from dataclasses import replace

    meta = replace(pw, qweight=pw.qweight.to("meta"), scales=pw.scales.to("meta"), qzeros=None if pw.qzeros is None else pw.qzeros.to("meta"))
    wq, sw = repack_w8a8(meta)
    assert wq.device.type == "meta" and sw.device.type == "meta"
