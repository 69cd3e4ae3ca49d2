"""The extension's kernels as torch operators (quant_kernels::linear, ::linear_a8, ::w8a8, ::quant_dynamic,
::quant_static, and the int8 convs ::dw_a8, ::gemm_vert_a8), so `torch.compile` traces a quantized model
into whole graphs instead of breaking the graph at every layer (a pybind call is opaque to dynamo).

`kernel(name)` is what callers bind: in eager mode it calls the pybind function directly (no
dispatcher on the decode hot path), while torch.compile traces it into the registered op. The shape
functions here ("fake" implementations) tell the compiler each op's output without running it.
"""
from __future__ import annotations

from typing import Callable

import torch

_REGISTERED: list[bool] = []


def _shape(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def register_fakes() -> None:
    """Give the C++-registered ops their shape functions (once per process, after the extension loads)."""
    if _REGISTERED:
        return
    reg = torch.library.register_fake
    reg("quant_kernels::linear")(
        lambda x, codes, s, zs, gunit, xidx, identity, nibble, bias, g, b: _shape(x, s.shape[0]))
    reg("quant_kernels::linear_a8")(lambda x, codes, s, zs, gunit, xidx, identity, bias, sx: _shape(x, s.shape[0]))
    reg("quant_kernels::w8a8")(lambda x, w, sw, bias, sx: _shape(x, w.shape[0]))
    reg("quant_kernels::quant_dynamic")(
        lambda x, bits: (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)))
    reg("quant_kernels::quant_static")(lambda x, scale, zero, qhi, offset: x.new_empty(x.shape, dtype=torch.int8))
    reg("quant_kernels::dw_a8")(_dw_shape)
    reg("quant_kernels::gemm_vert_a8")(lambda x, sx, w, sw, n, bias: _shape(x, n))
    _REGISTERED.append(True)


def _dw_shape(x, sx, w, sw, bias, kh, kw, sh, sw_, dh, dw):
    """[B, C, OH, OW] of a depthwise conv of padded codes x [B, C, Hp, Wp] (no padding inside the kernel)."""
    B, C, Hp, Wp = x.shape
    return x.new_empty((B, C, (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw_ + 1),
                       dtype=torch.float32)


_KERNELS: dict[str, Callable] = {}


def kernel(name: str) -> Callable:
    """The extension's `name`: the pybind function in eager mode, torch.ops.quant_kernels.<name> while
    torch.compile traces (built once; needs the extension)."""
    if name not in _KERNELS:
        from .fast_cpu import extension  # fast_cpu imports this module

        eager, op = getattr(extension(), name), getattr(torch.ops.quant_kernels, name)

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else eager(*args)

        _KERNELS[name] = call
    return _KERNELS[name]
