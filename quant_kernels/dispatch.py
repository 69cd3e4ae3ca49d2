"""Backend selection: `qmatmul` routes to the kernel for the input's device."""
from __future__ import annotations

from typing import Callable

import torch

from .cpu import dequantize_gather, dequantize_rows, matmul_cpu
from .activation import fake_quant_per_token, quantize_per_token
from .fast_cpu import backend_reason, extension, matmul_fast, repack_w8a8, w8a8_supported
from .int8_ops import ActSpec, int8_linear_supported, linear_int8
from .layout import PackedWeight

__all__ = ["qmatmul", "qmatmul_w8a8", "dequantize", "dequantize_gather", "backend_info"]

Backend = Callable[[torch.Tensor, PackedWeight, "torch.Tensor | None"], torch.Tensor]

def _cpu(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The AVX2 extension when it is available (built on first use), else the portable torch path."""
    if x.dtype in (torch.float32, torch.bfloat16) and extension() is not None:
        return matmul_fast(x, pw, bias)
    return matmul_cpu(x, pw, bias)


# device type -> kernel. "cuda" is the Triton kernel, registered only when triton can run here.
_BACKENDS: dict[str, Backend] = {"cpu": _cpu}


def _backend(dev: str) -> Backend | None:
    """The kernel for a device type; the Triton one is imported on first GPU use (importing triton costs ~0.3 s)."""
    if dev == "cuda" and dev not in _BACKENDS:
        from . import triton_kernels

        if triton_kernels.available():
            _BACKENDS["cuda"] = triton_kernels.matmul_triton
    return _BACKENDS.get(dev)


def qmatmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) with the packed weight, on the backend for x's device; result in x's dtype."""
    dev = x.device.type
    backend = _backend(dev)
    if backend is None:
        raise NotImplementedError(f"no quant_kernels kernel for device '{dev}' yet (no GPU kernel is available); "
                                  "run on CPU")
    if pw.device.type != dev:
        raise ValueError(f"input is on {x.device} but the packed weight is on {pw.device}")
    return backend(x, pw, bias)


def qmatmul_w8a8(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T with x quantized per token to int8 (W8A8, W4A8, ...). Integer kernels where the weight is
    symmetric per-channel 8-bit (CPU extension; Triton on GPU) or has codes of at most 4 bits (CPU
    extension); otherwise the same arithmetic as fake-quantized x through `qmatmul`."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and int8_linear_supported(pw):
        return linear_int8(x, pw, bias, ActSpec(8))
    if w8a8_supported(pw) and x.device.type == "cuda" and _backend("cuda") is not None:
        from .triton_kernels import w8a8_triton

        wq, sw = (t.to(x.device) for t in repack_w8a8(pw))
        lead = x.shape[:-1]
        xq, sx = quantize_per_token(x.reshape(-1, pw.in_features), 8)
        y = w8a8_triton(xq, sx, wq[:, :pw.in_features].contiguous(), sw, bias)
        return y.to(x.dtype).reshape(*lead, pw.out_features)
    return qmatmul(fake_quant_per_token(x, 8), pw, bias)


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Whole dequantized weight [out, in] in `dtype` (computed exactly in fp32, then cast)."""
    return dequantize_rows(pw, 0, pw.out_features).to(dtype)


def backend_info() -> dict[str, str]:
    """Which kernel each device type runs (for benchmark records and latency tables)."""
    info = {dev: f"{fn.__module__}.{fn.__name__}" for dev, fn in _BACKENDS.items()}
    if extension() is not None:
        info["cpu"] = "AVX2/FMA extension (quant_kernels.fast_cpu)"
    else:
        info["cpu"] = f"portable torch path (quant_kernels.cpu): {backend_reason()}"
    if _backend("cuda") is not None:
        from . import triton_kernels

        info["cuda"] = f"Triton {triton_kernels.triton.__version__} kernel (quant_kernels.triton_kernels.matmul_triton)"
    return info
