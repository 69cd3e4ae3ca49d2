"""`PackedWeight`: a quantized Linear weight in the packed layout the kernels consume.

Zero-point convention: the dequantized weight is w[o, i] = scale[o, g] * (q[o, i] - zero[o, g])
where g is the group of input column i, and q, zero are integers in [0, 2^bits-1].
Asymmetric layers store their zeros packed in `qzeros`; symmetric layers store no zeros
and use the implicit zero 2^(bits-1).

Groups run along the input dimension. group_size=-1 means one group per output row.
Without g_idx column j is in group j // group_size and the last group may be partial
(in=576, group_size=128 -> 5 groups, the last holding 64 columns). With g_idx (act-order
checkpoints) column j is in group g_idx[j]; the group count is still ceil(in/group_size).
Codes and zeros are packed per output row with `quant_kernels.packing.pack`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .packing import MAX_BITS, n_words, pack

__all__ = ["PackedWeight"]


def _is_int(v: object) -> bool:
    """True for a plain int (bools excluded)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class PackedWeight:
    """Packed b-bit codes, fp16 group scales, packed zeros (asymmetric only) and metadata."""

    qweight: torch.Tensor  # int32 [out, ceil(in*bits/32)]
    scales: torch.Tensor  # float16 [out, n_groups]
    qzeros: torch.Tensor | None  # int32 [out, ceil(n_groups*bits/32)], None when symmetric
    bits: int
    group_size: int  # -1: one group per output row
    in_features: int
    out_features: int
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 [in] or None (column j in group j // group_size)

    @property
    def n_groups(self) -> int:
        """Number of groups per output row: 1 for group_size=-1, else ceil(in/group_size)."""
        if self.group_size == -1:
            return 1
        return math.ceil(self.in_features / self.group_size)

    @property
    def implicit_zero(self) -> int:
        """Zero point of symmetric layers, 2^(bits-1)."""
        return 2 ** (self.bits - 1)

    @property
    def device(self) -> torch.device:
        """Device holding the packed tensors."""
        return self.qweight.device

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of every input column (from g_idx or j // group_size)."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        cols = torch.arange(self.in_features, device=self.qweight.device)
        return torch.zeros_like(cols) if self.group_size == -1 else cols // self.group_size

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, symmetric: bool, g_idx: torch.Tensor | None = None) -> "PackedWeight":
        """Pack unpacked integer codes q [out, in] and zeros [out, n_groups] into a PackedWeight.

        Scales are cast to float16. For symmetric layers `zeros` may be None; if given it
        must equal 2^(bits-1) everywhere (it is then dropped, not stored).
        """
        if not isinstance(q, torch.Tensor) or q.dim() != 2:
            raise ValueError(f"q must be a 2-D integer tensor [out, in], got {getattr(q, 'shape', type(q))}")
        if not isinstance(scales, torch.Tensor) or not scales.dtype.is_floating_point:
            raise ValueError("scales must be a floating-point tensor [out, n_groups]")
        out_f, in_f = q.shape
        qweight = pack(q, bits)  # validates bits and code range
        qzeros = None
        if symmetric:
            if zeros is not None and bool((zeros != 2 ** (bits - 1)).any()):
                raise ValueError(f"symmetric layers use the implicit zero {2 ** (bits - 1)}; "
                                 "the zeros passed differ from it")
        else:
            if zeros is None:
                raise ValueError("asymmetric layers need zeros [out, n_groups]")
            if zeros.dim() != 2:
                raise ValueError(f"zeros must be 2-D [out, n_groups], got shape {tuple(zeros.shape)}")
            qzeros = pack(zeros, bits)
        if g_idx is not None:
            if not isinstance(g_idx, torch.Tensor) or g_idx.dtype.is_floating_point:
                raise ValueError("g_idx must be an integer tensor [in]")
            g_idx = g_idx.to(torch.int32)
        pw = cls(qweight=qweight, scales=scales.to(torch.float16), qzeros=qzeros, bits=bits,
                 group_size=group_size, in_features=in_f, out_features=out_f,
                 symmetric=bool(symmetric), g_idx=g_idx)
        pw.validate()
        return pw

    def validate(self) -> None:
        """Check metadata, shapes, dtypes and devices; raise ValueError naming the first problem. Values (finite
        scales, g_idx range) are checked where they exist: not on the meta device (a streamed checkpoint's
        layers are built from the file's header and checked again when their block is read)."""
        real = self.qweight.device.type != "meta" if isinstance(self.qweight, torch.Tensor) else True
        if not _is_int(self.bits) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {self.bits!r}")
        if not _is_int(self.group_size) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(f"group_size must be -1 or a positive int, got {self.group_size!r}")
        for name in ("in_features", "out_features"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        out_f, n_g = self.out_features, self.n_groups
        self._check_tensor("qweight", self.qweight, torch.int32, (out_f, n_words(self.in_features, self.bits)))
        self._check_tensor("scales", self.scales, torch.float16, (out_f, n_g))
        if real and not bool(torch.isfinite(self.scales).all()):
            raise ValueError("scales contain inf or NaN")
        if self.symmetric:
            if self.qzeros is not None:
                raise ValueError("symmetric layers must have qzeros=None (implicit zero 2^(bits-1))")
        else:
            if self.qzeros is None:
                raise ValueError("asymmetric layers need a qzeros tensor")
            self._check_tensor("qzeros", self.qzeros, torch.int32, (out_f, n_words(n_g, self.bits)))
        if self.g_idx is not None:
            self._check_tensor("g_idx", self.g_idx, torch.int32, (self.in_features,))
            if real and self.g_idx.numel() and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= n_g):
                raise ValueError(f"g_idx values must lie in [0, {n_g - 1}], got "
                                 f"[{int(self.g_idx.min())}, {int(self.g_idx.max())}]")

    def _check_tensor(self, name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless t is a tensor of this dtype and shape on qweight's device."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (bits={self.bits}, group_size="
                             f"{self.group_size}, in={self.in_features}, out={self.out_features}), "
                             f"got {list(t.shape)}")
        if name != "qweight" and t.device != self.qweight.device:
            raise ValueError(f"{name} is on {t.device} but qweight is on {self.qweight.device}")
