"""quant_kernels: packed low-bit weight storage and matmul kernels (model- and Hessian-agnostic).

Convention: w = scale * (q - zero), q and zero integers in [0, 2^bits-1]; symmetric layers
use the implicit zero 2^(bits-1). Packing layout: see `quant_kernels.packing`.
"""
from __future__ import annotations

from .cpu import matmul_cpu
from .dispatch import backend_info, dequantize, dequantize_gather, qmatmul, qmatmul_w8a8
from .layout import PackedWeight
from .packing import n_words, pack, unpack
from .reference import dequantize_reference, matmul_reference

__all__ = [
    "PackedWeight",
    "pack",
    "unpack",
    "n_words",
    "qmatmul",
    "qmatmul_w8a8",
    "dequantize",
    "dequantize_gather",
    "backend_info",
    "matmul_cpu",
    "dequantize_reference",
    "matmul_reference",
]
