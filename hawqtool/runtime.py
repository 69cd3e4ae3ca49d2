"""Stage 5 (run): the modules a checkpoint is rebuilt with. Weights stay packed and compute through
quant_kernels: QuantLinear, QuantConv2d, and QuantEmbedding (a quantized input embedding; a head tied to
it is a QuantLinear on the same packed codes). Reading a checkpoint into a model is loader.py's job
(`load_quantized`, re-exported here)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from quant_kernels import PackedWeight, dequantize, dequantize_gather, qmatmul, qmatmul_w8a8
from quant_kernels.int8_ops import (ActSpec, conv2d_int8, fake_quant, int8_conv_supported, int8_linear_fn,
                                    int8_linear_supported)

from .errors import UserError


def _act_spec(act_bits: int, act_static, granularity: str = "image") -> ActSpec | None:
    """The input quantizer of a layer: None (float input), dynamic (conv inputs scaled per `granularity`), or
    static (scale, zero)."""
    if act_bits >= 16:
        return None
    return ActSpec(act_bits, *act_static) if act_static is not None else ActSpec(act_bits, granularity=granularity)


def _act_repr(layer) -> str:
    """', act_bits=…' with the quantizer's kind and which kernel runs, for a layer's repr ('' for float input)."""
    a = layer.act
    if a is None:
        return ""
    kind = ", static" if a.static else (f", per {a.granularity}" if a.granularity != "image" else "")
    return f", act_bits={layer.act_bits}{kind}, kernel={'int8' if layer.int8 else 'fake-quant'}"


def _cpu_float(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


class _Packed(nn.Module):
    """A module whose PackedWeight's tensors are its buffers: `.to(device)` moves them and re-points `pw` at the
    moved ones; a dtype change casts the module's float state but keeps the scales fp16 (the stored format)."""

    stored_as_is = ("qweight", "scales", "qzeros", "g_idx")  # streaming.Streamer reads these as stored (fp16 scales)

    def _apply(self, fn, recurse=True):
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:  # the stored scales, moved only: a round trip through bf16 and back
            self.scales = scales.to(self.scales.device)  # would drop 3 of fp16's mantissa bits
        self.rebind()
        return self

    def rebind(self) -> None:
        """`pw` re-pointed at the module's buffers after they were replaced (moved, or read by a Streamer), the
        kernel layouts built from the old ones dropped."""
        self.pw = replace(self.pw, qweight=self.qweight, scales=self.scales, qzeros=self.qzeros,
                          g_idx=getattr(self, "g_idx", self.pw.g_idx))
        for cached in ("_int8_fn", "_w"):
            if hasattr(self, cached):
                setattr(self, cached, None)

    def read_from_file(self) -> None:
        """Called by streaming.Streamer once it has read the buffers from the checkpoint's file: re-pointed and
        checked as loader.packed_from_tensors checks a whole file's (values too: finite scales, g_idx range)."""
        self.rebind()
        try:
            self.pw.validate()
        except ValueError as e:
            raise UserError(f"a packed layer of the checkpoint is malformed ({e}); re-create the checkpoint") from e


class QuantLinear(_Packed):
    """A Linear whose weight is kept packed; forward calls quant_kernels. With act_bits < 16 the input is
    quantized (per token, or with the static range act_static = (scale, zero)) and, where quant_kernels has
    an integer kernel for the weight (codes ≤ 4 bits, symmetric per-channel 8-bit), the sums are int32;
    otherwise the same arithmetic runs fake-quantized (`kernel` in the repr says which)."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None, act_bits: int = 16, act_static=None):
        super().__init__()
        self.act_static = act_static
        self.act = _act_spec(int(act_bits), act_static)
        self.int8 = self.act is not None and int8_linear_supported(pw)
        self.in_features, self.out_features = pw.in_features, pw.out_features
        self.bits, self.group_size, self.act_bits = pw.bits, pw.group_size, int(act_bits)
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.register_buffer("g_idx", pw.g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.pw = pw
        self._int8_fn = None  # bound integer-kernel call, built on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return qmatmul(x, self.pw, self.bias)
        if self.int8 and _cpu_float(x):
            if self._int8_fn is None:
                self._int8_fn = int8_linear_fn(self.pw, self.bias, self.act)
            if x.dtype is torch.float32 and x.is_contiguous():  # the decode hot path: no copies, no casts
                return self._int8_fn(x.view(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
            y = self._int8_fn(x.reshape(-1, self.in_features).to(torch.float32).contiguous())
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.act == ActSpec(8):
            return qmatmul_w8a8(x, self.pw, self.bias)  # the Triton W8A8 kernel on GPU
        return qmatmul(fake_quant(x, self.act), self.pw, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype)

    def prepare(self) -> None:
        """Build the kernel layouts now (one call on a zero row), e.g. before torch.compile traces the layer."""
        with torch.inference_mode():
            self(torch.zeros(1, self.in_features, device=self.pw.device))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
                f"{_act_repr(self)}")


def is_depthwise(m: nn.Module) -> bool:
    """A Conv2d with one input channel per output channel (and more than one channel)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_pointwise(m: nn.Module) -> bool:
    """A 1×1 Conv2d without groups or padding: every output pixel is a token of a Linear layer."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and not isinstance(m.padding, str) and tuple(m.padding) == (0, 0))


def conv_act_granularity(m: nn.Module) -> str:
    """The finest dynamic activation scale a conv's integer kernel applies for free: per (image, channel) for
    depthwise, per pixel for 1×1, per image otherwise."""
    return "channel" if is_depthwise(m) else "pixel" if is_pointwise(m) else "image"


def _same_pad(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TensorFlow 'SAME' zero padding (timm's Conv2dSame pads like this in its forward)."""
    pads = []
    for i, k, st, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation):
        p = max((-(-i // st) - 1) * st + (k - 1) * d + 1 - i, 0)
        pads.append((p // 2, p - p // 2))
    return torch.nn.functional.pad(x, (*pads[1], *pads[0]))


class QuantConv2d(_Packed):
    """A Conv2d/Conv1d whose weight is kept packed ([out, in/groups·k] rows, per-channel or grouped scales).
    With act_bits < 16 on CPU, Conv2d layers with zero padding (or timm's Conv2dSame) whose weight has an
    integer kernel (groups=1, or depthwise) run on int8 codes with int32 sums (quant_kernels.int8_ops; dynamic
    inputs scaled per `act_granularity`: image, channel for depthwise, pixel for 1×1). Otherwise the float
    module runs on the weight dequantized once by quant_kernels, with the input fake-quantized by the same
    quantizer (`kernel` in the repr says which)."""

    def __init__(self, pw: PackedWeight, conv: nn.Module, bias: torch.Tensor | None, act_bits: int = 16,
                 act_static=None, act_granularity: str = "image"):
        super().__init__()
        self.act_static = act_static
        self.act = _act_spec(int(act_bits), act_static, act_granularity)
        self.pw, self.act_bits, self.bits, self.group_size = pw, int(act_bits), pw.bits, pw.group_size
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.shape = tuple(conv.weight.shape)
        self.same = type(conv).__name__ == "Conv2dSame"
        self.int8 = (self.act is not None and isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros"
                     and (self.same or not isinstance(conv.padding, str))
                     and int8_conv_supported(pw, conv.groups, conv.in_channels, conv.out_channels))
        # the float module runs the convolution (its own forward: timm's Conv2dSame pads dynamically); its
        # weight is swapped for the dequantized one per call, so its own storage is freed here
        conv.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        if conv.bias is not None:
            conv.bias = nn.Parameter(torch.empty(0), requires_grad=False)
        object.__setattr__(self, "_conv", conv)  # not a submodule: the checkpoint's tensors are the state
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._w: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._conv
        if self.int8 and _cpu_float(x) and x.dim() == 4:
            padding = (0, 0) if self.same else c.padding
            x = _same_pad(x, c) if self.same else x
            return conv2d_int8(x, self.pw, self.bias, self.act, c.kernel_size, c.stride, padding, c.dilation,
                               c.groups)
        if self._w is None or self._w.dtype != x.dtype:
            self._w = dequantize(self.pw, x.dtype).reshape(self.shape)
        if self.act is not None:
            x = fake_quant(x, self.act, per_image=True)
        params = {"weight": self._w} if self.bias is None else {"weight": self._w, "bias": self.bias}
        return torch.func.functional_call(c, params, (x,))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype).reshape(self.shape)

    def prepare(self) -> None:
        """Build the kernel layouts now (one call on the smallest zero input), e.g. before torch.compile."""
        (kh, kw), (dh, dw) = self._conv.kernel_size, self._conv.dilation
        with torch.inference_mode():
            self(torch.zeros(1, self.shape[1] * self._conv.groups, (kh - 1) * dh + 1, (kw - 1) * dw + 1,
                             device=self.pw.device))

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group={self.group_size}{_act_repr(self)}"


class QuantEmbedding(_Packed):
    """An input embedding whose table stays packed (b-bit codes, fp16 scales per row or group): a lookup
    dequantizes only the rows it gathers (quant_kernels.dequantize_gather, exact in fp32), in `dtype`.
    A head tied to the table is a QuantLinear on the same PackedWeight: one copy of the codes serves both."""

    def __init__(self, pw: PackedWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = pw.out_features, pw.in_features
        self.bits, self.group_size, self.dtype = pw.bits, pw.group_size, dtype
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.pw = pw

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize_gather(self.pw, input_ids).to(self.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}"


_LOADER = ("load_quantized", "packed_from_tensors", "_act_bits", "_act_granularity", "_act_static")


def __getattr__(name: str):
    """The loader's names, re-exported lazily (loader.py imports this module's classes)."""
    if name in _LOADER:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
