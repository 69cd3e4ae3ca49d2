"""Conv GPTQ: unfolded-patch formulation, conv Hessian vs brute force, GPTQ beats RTN on conv outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqtool.quantize.conv import ConvHessianAccumulator, conv_hessian_update, conv_patches, gptq_conv
from hawqtool.quantize.gptq import gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, rtn

# (in, out, kernel, stride, padding, dilation, groups, padding_mode)
CONVS = {
    "normal": (6, 8, 3, 2, 1, 1, 1, "zeros"),
    "grouped": (6, 9, 3, 2, 1, 1, 3, "zeros"),
    "depthwise": (6, 12, 3, 2, 1, 1, 6, "zeros"),
    "dilated_same_reflect": (4, 6, 3, 1, "same", 2, 2, "reflect"),
    "rect_kernel": (4, 4, (2, 3), (1, 2), (0, 1), 1, 1, "zeros"),
    "same_even_kernel": (4, 4, (2, 4), 1, "same", 1, 1, "circular"),
}


def make_conv(cfg, seed: int = 0, dtype=torch.float64, bias: bool = False) -> nn.Conv2d:
    cin, cout, k, s, p, d, g, mode = cfg
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, padding_mode=mode).to(dtype)


def patch_output(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """conv(x) without bias as patches @ W_flatᵀ, reshaped to the conv's output layout."""
    G, out = conv.groups, conv.weight.shape[0]
    P = conv_patches(x, conv)  # [G, N·L, d]
    Y = torch.bmm(P, conv.weight.reshape(G, out // G, -1).transpose(1, 2))  # [G, N·L, out/G]
    N = x.shape[0]
    return Y.reshape(G, N, -1, out // G).permute(1, 0, 3, 2).reshape(N, out, -1)


@pytest.mark.parametrize("name", list(CONVS))
def test_patches_reproduce_conv_output(name):
    conv = make_conv(CONVS[name], dtype=torch.float32)
    x = torch.randn(3, conv.in_channels, 9, 10)
    ref = conv(x)
    assert torch.allclose(patch_output(x, conv).reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)


def test_patches_reproduce_conv1d_output():
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False)
    x = torch.randn(2, 4, 17)
    ref = conv(x)
    assert torch.allclose(patch_output(x, conv).reshape(ref.shape), ref, atol=1e-5)


def brute_force_hessian(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """2/n Σ u uᵀ per group with explicit loops over output positions and patch entries (zero padding)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    N, C, Hh, Ww = x.shape
    G = conv.groups
    Cg = C // G
    xp = torch.zeros(N, C, Hh + 2 * ph, Ww + 2 * pw, dtype=x.dtype)
    xp[:, :, ph:ph + Hh, pw:pw + Ww] = x
    Ho = (Hh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (Ww + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    d = Cg * kh * kw
    H = torch.zeros(G, d, d, dtype=x.dtype)
    count = 0
    for n in range(N):
        for oh in range(Ho):
            for ow in range(Wo):
                count += 1
                for g in range(G):
                    u = torch.tensor([float(xp[n, g * Cg + c, oh * sh + i * dh, ow * sw + j * dw])
                                      for c in range(Cg) for i in range(kh) for j in range(kw)], dtype=x.dtype)
                    H[g] += torch.outer(u, u)
    return 2 * H / count


@pytest.mark.parametrize("groups,dilation", [(1, 1), (2, 2), (4, 1)])
def test_conv_hessian_matches_brute_force(groups, dilation):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=dilation, groups=groups, bias=False).double()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    H, n = conv_hessian_update(None, x, conv)
    ref = brute_force_hessian(x, conv)
    assert H.shape == (groups, 4 // groups * 9, 4 // groups * 9)
    assert n == 2 * ((6 + 2 - 2 * dilation - 1) // 2 + 1) * ((5 + 2 - 2 * dilation - 1) // 2 + 1)
    assert torch.allclose(H, ref, atol=1e-12, rtol=1e-12)
    # running mean over two batches == one pass over both; the accumulator agrees
    H1, n1 = conv_hessian_update(None, x[:1], conv)
    H2, n2 = conv_hessian_update(H1, x[1:], conv, n1)
    assert n2 == n and torch.allclose(H2, H, atol=1e-12)
    acc = ConvHessianAccumulator(conv)
    acc.add_batch(x[:1])
    acc.add_batch(x[1:])
    assert acc.n_samples == n and torch.allclose(acc.H.double(), H, rtol=1e-6, atol=1e-6)


def smooth_inputs(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Spatially and cross-channel correlated images (mixed latent channels, blurred, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, max(1, c // 3), size, size, generator=g)
    A = torch.randn(c, z.shape[1], generator=g)
    x = torch.einsum("cl,nlhw->nchw", A, z)
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x + 0.1 * torch.randn(x.shape, generator=g)


def output_error(conv: nn.Conv2d, W: torch.Tensor, x: torch.Tensor) -> float:
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    return float((F.conv2d(x, W, **kw) - F.conv2d(x, conv.weight, **kw)).pow(2).sum())


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_conv_beats_rtn(groups, bits):
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=True)
    x = smooth_inputs(24, 16, 12, seed=4)
    acc = ConvHessianAccumulator(conv)
    for chunk in x.split(8):
        acc.add_batch(chunk)
    spec = QuantSpec(bits=bits, group_size=-1)
    with torch.no_grad():
        res = gptq_conv(conv, acc.H, spec)
        W_rtn = rtn(conv.weight.flatten(1), spec).dequantize().reshape(conv.weight.shape)
        err_gptq, err_rtn = output_error(conv, res.dequantized, x), output_error(conv, W_rtn, x)
    assert res.dequantized.shape == conv.weight.shape
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("groups,group_size,act_order", [(1, -1, False), (1, 16, True), (4, 8, False), (16, -1, True)])
def test_dequantized_equals_codes_times_scales(groups, group_size, act_order):
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 8 if groups != 16 else 16, 3, padding=1, groups=groups)
    x = smooth_inputs(4, 16, 8, seed=6)
    H, _ = conv_hessian_update(None, x, conv)
    spec = QuantSpec(bits=4, group_size=group_size)
    res = gptq_conv(conv, H, spec, act_order=act_order)
    w = res.weight
    d = conv.weight[0].numel()
    assert w.q.shape == (conv.out_channels, d) and w.q.dtype == torch.int32
    assert int(w.q.min()) >= 0 and int(w.q.max()) <= spec.maxq
    assert w.scales.shape == w.zeros.shape == (conv.out_channels, spec.n_groups(d))
    g = w.g_idx.long() if w.g_idx is not None else torch.arange(d) // spec.group_width(d)
    manual = (w.scales[:, g] * (w.q.float() - w.zeros[:, g].float())).reshape(conv.weight.shape)
    assert torch.equal(res.dequantized, manual)
    assert (res.dequantized - conv.weight).abs().max() <= w.scales.max() * 4  # near the original weight
    if groups == 1:  # the conv wrapper is exactly GPTQ on the flattened weight
        ref = gptq_quantize(conv.weight.detach().flatten(1), H[0], spec, act_order=act_order)
        assert torch.equal(ref.weight.q, w.q)
        assert torch.equal(ref.dequantized.reshape(conv.weight.shape), res.dequantized)
    else:  # rows of conv group k are quantized with H[k]
        rows = conv.out_channels // groups
        k = groups - 1
        ref = gptq_quantize(conv.weight.detach().flatten(1)[k * rows:], H[k], spec, act_order=act_order)
        assert torch.equal(ref.weight.q, w.q[k * rows:])


def test_grouped_act_order_with_groupwise_scales_needs_static_groups():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    H, _ = conv_hessian_update(None, torch.randn(2, 8, 6, 6), conv)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_conv(conv, H, QuantSpec(bits=4, group_size=8), act_order=True)
    res = gptq_conv(conv, H, QuantSpec(bits=4, group_size=8), act_order=True, static_groups=True)
    assert res.weight.g_idx is None and torch.isfinite(res.dequantized).all()
    with pytest.raises(ValueError, match="expected"):
        gptq_conv(conv, H[0], QuantSpec(bits=4, group_size=-1))
