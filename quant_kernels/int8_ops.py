"""Integer-activation Linear and Conv2d on CPU: x quantized to int8 codes × packed weights, int32 sums
(csrc/int8_act.cpp). Every path computes exactly the activation quantizer below; the fake-quantized
reference (`fake_quant`) is what the kernels are tested against.

* dynamic (ActSpec.scale None): symmetric, one scale per row (per token for Linear, per image for
  Conv2d): s = max|x|/(2^(b−1)−1) (1 for an all-zero row), codes round(x/s) clamped to ±(2^(b−1)−1).
* static: asymmetric per tensor, calibrated (s, z): q = clamp(round(x/s) + z, 0, 2^b−1), x̂ = s·(q − z).
  The kernels take c = q − o as int8 (o = 128 for 8 bits, else 0) and the result gets
  s·(o − z)·Σ_k Ŵ[n, k] added, which is W·x̂ exactly in real arithmetic.
Convolutions: depthwise through a direct int8 kernel (`dw_a8`) on the padded codes, groups=1 as one
integer GEMM over output pixels (1×1: the pixels themselves; else unfolded patches). Rounding is
half-to-even everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .activation import quantize_per_token
from .fast_cpu import a8_supported, extension, repack, repack_w8a8, w8a8_supported
from .torch_ops import kernel
from .layout import PackedWeight
from .packing import unpack

__all__ = ["ActSpec", "fake_quant", "int8_linear_supported", "int8_conv_supported", "int8_linear_fn", "linear_int8",
           "conv2d_int8"]


@dataclass(frozen=True)
class ActSpec:
    """How a layer's input is quantized: `bits`, and a static (scale, zero) or None for dynamic. Dynamic
    Linear inputs are scaled per token; conv inputs per `granularity`: "image", "channel" (per image and
    channel: depthwise convs only) or "pixel" (per image and position: 1×1 convs only, a token each)."""

    bits: int = 8
    scale: float | None = None
    zero: float = 0.0
    granularity: str = "image"

    @property
    def static(self) -> bool:
        return self.scale is not None


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _static_q(x: torch.Tensor, act: ActSpec) -> torch.Tensor:
    """Float-valued codes q − z of a static asymmetric quantizer (x̂ = s·(q − z))."""
    return torch.clamp(torch.round(x.float() / act.scale) + act.zero, 0, 2 ** act.bits - 1) - act.zero


def _offset(act: ActSpec) -> float:
    """o of the int8 codes c = q − o of a static quantizer."""
    return 128.0 if act.bits == 8 else 0.0


def fake_quant(x: torch.Tensor, act: ActSpec, per_image: bool = False) -> torch.Tensor:
    """x̂ in x's dtype (the reference arithmetic); dynamic scales are per token, or for convs (per_image)
    per act.granularity."""
    if act.static:
        return (_static_q(x, act) * act.scale).to(x.dtype)
    if per_image and act.granularity == "pixel":
        q, s = quantize_per_token(x.permute(0, 2, 3, 1), act.bits)
        return (q.float() * s).permute(0, 3, 1, 2).to(x.dtype)
    if per_image:
        rows = x.reshape(x.shape[0] * (x.shape[1] if act.granularity == "channel" else 1), -1)
    else:
        rows = x
    q, s = quantize_per_token(rows, act.bits)
    return (q.float() * s).to(x.dtype).reshape(x.shape)


def _codes_static(x: torch.Tensor, act: ActSpec) -> torch.Tensor:
    """int8 codes q − o of a static quantizer (fp32 contiguous x; one fused pass in the extension)."""
    return kernel("quant_static")(x, act.scale, act.zero, 2 ** act.bits - 1, int(_offset(act)))


def int8_linear_supported(pw: PackedWeight) -> bool:
    """An integer kernel exists for this weight on this CPU: codes ≤ 4 bits (any groups, zeros, act-order)
    or symmetric per-channel 8-bit."""
    return pw.device.type == "cpu" and (a8_supported(pw) or w8a8_supported(pw)) and extension() is not None


def _per_channel(pw: PackedWeight) -> bool:
    """One scale (and zero) per output channel: the weight becomes int16 q − zero for the conv kernels."""
    return pw.n_groups == 1 and pw.g_idx is None and pw.bits <= 8


def int8_conv_supported(pw: PackedWeight, groups: int, in_channels: int, out_channels: int) -> bool:
    """Conv2d with groups=1 and a per-channel or integer-GEMM weight, or depthwise (groups = in = out) with one
    scale per output channel; other grouped convolutions have no integer kernel."""
    if pw.device.type != "cpu" or extension() is None:
        return False
    if groups == 1:
        return _per_channel(pw) or int8_linear_supported(pw)
    return groups == in_channels == out_channels and _per_channel(pw)


def _rowsum(pw: PackedWeight) -> torch.Tensor:
    """Σ_k Ŵ[n, k] (float64 sum, fp32 result), cached: the static quantizer's offset term."""
    cached = getattr(pw, "_int8_rowsum", None)
    if cached is None:
        from .dispatch import dequantize

        cached = dequantize(pw, torch.float64).sum(dim=1).float()
        pw._int8_rowsum = cached
    return cached


Gemm = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _gemm_fn(pw: PackedWeight, bias: torch.Tensor | None) -> Gemm:
    """gemm(xq, sx) -> y [R, N] fp32 = sx[r]·(int8 codes xq [R, K]) @ Ŵ^T (+ bias) through the integer
    kernels, weight operands bound; fp32 xq with sx None: the kernel quantizes each row itself (dynamic 8-bit)."""
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if a8_supported(pw):
        kw, run = repack(pw), kernel("linear_a8")
        return lambda xq, sx: run(xq, kw.codes, kw.scales, kw.zs, kw.gunit, kw.xidx, kw.identity, b, sx)
    (wq, sw), run = repack_w8a8(pw), kernel("w8a8")
    return lambda xq, sx: run(xq, wq, sw, b, sx)


def int8_linear_fn(pw: PackedWeight, bias: torch.Tensor | None, act: ActSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """run(x) -> y: contiguous fp32 rows x [R, K] to fp32 [R, N] with everything but x bound (layers keep
    one: the decode path then costs one extension call); needs int8_linear_supported(pw)."""
    gemm = _gemm_fn(pw, bias)
    if act.static:
        corr = act.scale * (_offset(act) - act.zero) * _rowsum(pw)
        return lambda x: gemm(_codes_static(x, act), torch.full((x.shape[0],), act.scale)) + corr
    if act.bits == 8:
        return lambda x: gemm(x, None)
    quant = kernel("quant_dynamic")
    return lambda x: gemm(*quant(x, act.bits))


def linear_int8(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, act: ActSpec) -> torch.Tensor:
    """x @ Ŵ^T (+ bias) with x quantized as `act` says; needs int8_linear_supported(pw). Result in x's dtype."""
    x2 = x.reshape(-1, pw.in_features).to(torch.float32).contiguous()
    y = int8_linear_fn(pw, bias, act)(x2)
    return y.to(x.dtype).reshape(*x.shape[:-1], pw.out_features)


def conv2d_int8(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, act: ActSpec,
                kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """conv2d(x̂, Ŵ) (+ bias) with integer sums; x [B, C, H, W] (already padded for 'same' convs);
    needs int8_conv_supported. Dynamic scales per act.granularity. Depthwise: a direct kernel on the
    padded codes; 1×1: one GEMM over pixels; others: one GEMM over unfolded patches."""
    B, C, H, W = x.shape
    O = pw.out_features
    xf = x.to(torch.float32)
    if act.static:
        pad_code = act.zero - _offset(act)  # the code of x = 0, so padding stays x̂ = 0
        codes = _codes_static(xf.contiguous(), act)
        sx = torch.full((B,), float(act.scale))
    else:
        pad_code = 0.0
        if act.granularity == "pixel":  # 1×1 conv: each output pixel is a token with its own scale
            if (kernel_size, padding, groups) != ((1, 1), (0, 0), 1):
                raise ValueError("per-pixel activation scales need a 1×1 convolution")
            oh, ow = -(-H // stride[0]), -(-W // stride[1])
            rows = xf[:, :, ::stride[0], ::stride[1]].permute(0, 2, 3, 1).reshape(B * oh * ow, C).contiguous()
            y = _conv_gemm(*kernel("quant_dynamic")(rows, act.bits), pw, bias)
            return y.reshape(B, oh, ow, O).permute(0, 3, 1, 2).contiguous().to(x.dtype)
        rows = xf.reshape(B * C if act.granularity == "channel" else B, -1).contiguous()
        q, sx = kernel("quant_dynamic")(rows, act.bits)  # sx [B] or [B·C]
        codes = q.reshape(B, C, H, W)
    (kh, kw), (sh, sw), (ph, pw_), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw_ - dw * (kw - 1) - 1) // sw + 1
    if act.granularity == "channel" and groups == 1:
        raise ValueError("per-channel activation scales need a depthwise convolution")
    if groups > 1:
        xp = F.pad(codes, (pw_, pw_, ph, ph), value=int(pad_code)) if ph or pw_ else codes
        wq, wsc = _channel_weight(pw)
        y = kernel("dw_a8")(xp.contiguous(), sx.float().contiguous(), wq, wsc,
                            None if bias is None else bias.float().contiguous(), kh, kw, sh, sw, dh, dw)
    else:
        if (kh, kw) == (1, 1) and (ph, pw_) == (0, 0):
            rows = codes[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(B * oh * ow, C)
        else:
            v = codes.float()
            v = F.pad(v, (pw_, pw_, ph, ph), value=pad_code) if ph or pw_ else v
            rows = F.unfold(v, kernel_size, dilation=dilation, stride=stride).transpose(1, 2).reshape(B * oh * ow, -1)
            rows = rows.to(torch.int8)
        y = _conv_gemm(rows.contiguous(), sx.float().repeat_interleave(oh * ow), pw, bias)
        y = y.reshape(B, oh, ow, O).permute(0, 3, 1, 2)
    if act.static:
        y = y + (act.scale * (_offset(act) - act.zero) * _rowsum(pw)).reshape(1, O, 1, 1)
    return y.contiguous().to(x.dtype)


def _conv_gemm(rows: torch.Tensor, sx: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [R, N] of int8 pixel/patch rows with per-row scales: per-channel weights take the short-K kernel
    (output channels across SIMD lanes, no per-output horizontal sums), group-wise ones the Linear kernels."""
    if _per_channel(pw):
        return kernel("gemm_vert_a8")(rows, sx, *_vertical_weight(pw), pw.out_features,
                                      None if bias is None else bias.float().contiguous())
    return _gemm_fn(pw, bias)(rows, sx)


def _channel_weight(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int16 q − zero [N, K], fp32 scales [N]) of a per-channel weight; cached."""
    cached = getattr(pw, "_channel_weight", None)
    if cached is None:
        q = unpack(pw.qweight, pw.bits, pw.in_features).to(torch.int16)
        z = (torch.full((pw.out_features, 1), pw.implicit_zero, dtype=torch.int16) if pw.symmetric
             else unpack(pw.qzeros, pw.bits, 1).to(torch.int16))
        cached = ((q - z).contiguous(), pw.scales[:, 0].float().contiguous())
        pw._channel_weight = cached
    return cached


def _vertical_weight(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int16 pairs [⌈K/2⌉, N rounded up to 32, 2], fp32 scales [N]) for gemm_vert_a8; cached."""
    cached = getattr(pw, "_vertical_weight", None)
    if cached is None:
        wq, sc = _channel_weight(pw)
        N, K = wq.shape
        padded = torch.zeros(-(-N // 32) * 32, -(-K // 2) * 2, dtype=torch.int16)
        padded[:N, :K] = wq
        cached = (padded.reshape(padded.shape[0], -1, 2).transpose(0, 1).contiguous(), sc)
        pw._vertical_weight = cached
    return cached
