"""Uniform weight quantizer shared by allocation (Ω table) and quantization (RTN/GPTQ).

Convention (also quant_kernels'): integer codes q in [0, 2^b-1], integer zero z,
dequantized weight w = scale * (q - z). Scales are rounded to float16 at creation so the
fake-quantized model and the checkpoint (fp16 scales) agree bit for bit.
Groups run along the input dimension; group_size=-1 means one group per output row.
The last group may be partial (e.g. 576 inputs at group size 128).
A spec with `fmt` set (a ggml block type such as "Q4_K", quantize/ggml_types.py) uses that type's
grid and bytes instead: codes in [0, 2^b-1], group parameters fixed by its blocks (ggml_grid.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch

SCALE_BITS = 16  # scales are stored as float16 (unless a spec's scale_bits codes them)
MIN_SCALE_CODE_BITS = 4  # narrower scale codes leave groups with small scales too few steps
# Rows per slice where a whole layer's temporaries would be large (a 49152-row head, a 70B MLP): quantizing
# (driver.quantize_layer), dequantizing and the error table (importance.weighted_quant_error) treat rows
# independently, so slicing changes the peak memory, not the values; every SmolLM2 layer is one slice.
ROW_SLICE = 8192


@dataclass(frozen=True)
class QuantSpec:
    """How one layer's weights are quantized."""

    bits: int
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    clip_search: bool = False  # MSE search over shrunk ranges (GPTQ's `mse` option)
    fmt: str = ""  # a ggml block type ("Q4_K", "Q4_0", ...): its grid and byte layout; "" = hawqtool's own
    # 16: fp16 group scales; 4..8: two-level scales (scale_codes.py), each group's scale a k-bit code times one
    # fp16 step per row, which makes small groups cheap (groups of 64 cost 0.14 bits per weight less at 6 bits)
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if self.scale_bits != SCALE_BITS and not (MIN_SCALE_CODE_BITS <= self.scale_bits <= 8
                                                  and self.group_size != -1 and not self.fmt):
            raise ValueError(f"scale_bits must be 16 (fp16 scales) or {MIN_SCALE_CODE_BITS}..8 (scale codes, grouped "
                             f"layers of hawqtool's own grid), got {self.scale_bits}")
        if self.fmt:
            t = self.ggml
            if (self.bits, self.group_size, self.symmetric) != (t.bits, t.group, False):
                raise ValueError(f"a {t.name} spec has bits {t.bits}, group size {t.group} and symmetric False; "
                                 "build it with QuantSpec.for_ggml")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")

    @classmethod
    def for_ggml(cls, name: str) -> "QuantSpec":
        """The spec of ggml block type `name` (case-insensitive; ValueError naming the valid types)."""
        from .ggml_types import ggml_type

        t = ggml_type(name)
        return cls(t.bits, t.group, False, fmt=t.name)

    @property
    def ggml(self):
        """The GGMLType of a ggml spec, else None."""
        if not self.fmt:
            return None
        from .ggml_types import ggml_type

        return ggml_type(self.fmt)

    @property
    def key(self) -> str:
        """The spec's name in sensitivity reports' error tables (artifacts.qerror_key, or the ggml type)."""
        from ..artifacts import qerror_key

        return self.fmt or qerror_key(self.bits, self.group_size, self.symmetric, self.scale_bits)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def for_rows(self, in_features: int) -> "QuantSpec":
        """This spec for rows of `in_features`: scale codes only where they save bytes (a row's k-bit codes and
        fp16 step against its fp16 scales: more than 16 / (16 − k) groups per row), else fp16 scales."""
        if self.scale_bits != SCALE_BITS and \
                self.n_groups(in_features) * (SCALE_BITS - self.scale_bits) <= SCALE_BITS:
            from dataclasses import replace

            return replace(self, scale_bits=SCALE_BITS)
        return self

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits to store one layer: packed codes + fp16 scales (+ b-bit zeros if asymmetric); with scale codes,
        k bits per group and one fp16 step per row; a ggml type's exact block bytes (ValueError where its blocks
        do not tile the rows)."""
        if self.fmt:
            return self.ggml.storage_bits(out_features, in_features)
        groups = out_features * self.n_groups(in_features)
        per_group = self.scale_bits + (0 if self.symmetric else self.bits)
        steps = out_features * SCALE_BITS if self.scale_bits != SCALE_BITS else 0
        return out_features * in_features * self.bits + groups * per_group + steps

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.fmt:
            d.pop("fmt")  # hawqtool's own specs keep the dict (and the fingerprints built on it) they always had
        if self.scale_bits == SCALE_BITS:
            d.pop("scale_bits")
        return d


def _range_to_qparams(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from a per-group range (GPTQ's rule: the range always contains 0)."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / spec.maxq).to(torch.float16).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, 2**-14), scale)  # fp16 underflow guard
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def qparams(W: torch.Tensor, spec: QuantSpec, *, search: bool = False,
            d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (one group) scale and zero for a 2-D slice W [rows, cols]; shapes [rows].
    search: choose them by the d-weighted error search of grid.py (d [cols], None = equal weights)
    instead of the min-max range."""
    W = W.float()
    xmin, xmax = W.min(dim=1).values, W.max(dim=1).values
    scale, zero = _range_to_qparams(xmin, xmax, spec)
    if search:
        from .grid import search_qparams

        return search_qparams(W, d, spec.bits, spec.symmetric, (scale, zero))
    if spec.clip_search:
        best = torch.full_like(scale, float("inf"))
        for i in range(100):
            p = 1 - i / 100
            if p < 0.2:
                break
            s, z = _range_to_qparams(p * xmin, p * xmax, spec)
            err = (fake_quant(W, s[:, None], z[:, None], spec.maxq) - W).abs().pow(2.4).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def quant_codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float tensor; callers cast)."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def fake_quant(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize with broadcastable scale/zero."""
    return scale * (quant_codes(W, scale, zero, maxq) - zero)


@dataclass
class QuantizedWeight:
    """Integer codes and group parameters of one layer, ready for packing.

    q: int32 [out, in]; scales: float32 [out, n_groups] (fp16-exact); zeros: int32
    [out, n_groups]; g_idx: int32 [in] group of each input column, or None when
    column j is in group j // group_size.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    grid: object | None = None  # ggml_grid.GGMLGrid of a ggml spec (scales/zeros then empty)
    scale_step: torch.Tensor | None = None  # float32 [out] (fp16-exact): the row's step when spec.scale_bits < 16

    def group_index(self) -> torch.Tensor:
        in_features = self.q.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(in_features, device=self.q.device) // self.spec.group_width(in_features)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on `device` (results are kept on the CPU, computed anywhere)."""
        from dataclasses import replace

        grid = self.grid
        if grid is not None:
            grid = replace(grid, fields={k: v.to(device) for k, v in grid.fields.items()})
        return replace(self, q=self.q.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device),
                       g_idx=None if self.g_idx is None else self.g_idx.to(device), grid=grid,
                       scale_step=None if self.scale_step is None else self.scale_step.to(device))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight scale·(q − zero), formed 8192 rows at a time (the same values; a 49152-row head's
        gathered scales and zeros and float codes would be 1.8 GB of temporaries at once)."""
        if self.grid is not None:
            from .ggml_grid import dequantize_grid

            return dequantize_grid(self.q, self.grid)
        rows = self.q.shape[0]
        if rows <= ROW_SLICE:
            return self.dequantize_rows(slice(None))
        out = torch.empty(self.q.shape, dtype=torch.promote_types(self.scales.dtype, torch.float32), device=self.q.device)
        for r in range(0, rows, ROW_SLICE):
            out[r:r + ROW_SLICE] = self.dequantize_rows(slice(r, r + ROW_SLICE))
        return out

    def dequantize_rows(self, r: slice, g: torch.Tensor | None = None) -> torch.Tensor:
        """Rows r of the dequantized weight (hawqtool's own grid; g: group_index(), if the caller holds it)."""
        g = self.group_index() if g is None else g
        return self.scales[r][:, g] * (self.q[r].float() - self.zeros[r][:, g].float())


def rtn(W: torch.Tensor, spec: QuantSpec, *, search: bool = False,
        d: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight [out, in], groupwise along inputs
    (search/d: the weighted grid search of `qparams`, d = per-input importance [in])."""
    W = W.detach().float()
    if spec.fmt:
        return ggml_weight(W, spec, search=search, d=d)
    from .groups import group_qparams

    scales, zeros = group_qparams(W, spec, search=search, d=d)
    return on_grid(W, spec, scales, zeros, d)


def on_grid(W: torch.Tensor, spec: QuantSpec, scales: torch.Tensor, zeros: torch.Tensor,
            d: torch.Tensor | None = None) -> QuantizedWeight:
    """W's [out, in] nearest codes on its groups' (scale, zero) [out, groups]; with scale codes, each group first
    snapped onto its row's code grid (weighted by d [in])."""
    from .groups import column_params, snap_groups

    W = W.detach().float()
    step = None
    if spec.scale_bits != SCALE_BITS:  # every group's scale known: the row's step, then each group snapped onto it
        from .scale_codes import row_steps

        step = row_steps(scales, spec.scale_bits)
        scales, zeros = snap_groups(W, d, scales, zeros, step, spec)
    gw = spec.group_width(W.shape[1])
    codes = quant_codes(W, column_params(scales, gw, W.shape[1]), column_params(zeros, gw, W.shape[1]), spec.maxq)
    return QuantizedWeight(q=codes.to(torch.int32), scales=scales.float(), zeros=zeros.to(torch.int32), spec=spec,
                           scale_step=step)


def ggml_weight(W: torch.Tensor, spec: QuantSpec, *, search: bool = True, d: torch.Tensor | None = None,
                q: torch.Tensor | None = None, grid=None) -> QuantizedWeight:
    """A ggml spec's QuantizedWeight: the type's grid fitted to W (weighted by d) and the nearest codes,
    or the given codes `q` on a given grid (GPTQ)."""
    from .ggml_grid import fit_grid, grid_codes

    if grid is None:
        grid = fit_grid(W, spec.ggml, d, search=search)
    if q is None:
        q = grid_codes(W, grid)
    empty = torch.zeros(W.shape[0], 0, device=W.device)
    return QuantizedWeight(q=q.to(torch.int32), scales=empty, zeros=empty.to(torch.int32), spec=spec, grid=grid)


def ggml_bytes(qw: QuantizedWeight) -> torch.Tensor:
    """A ggml layer's blocks as stored in checkpoints and GGUF: uint8 [out, in / block * type size]."""
    from .ggml_grid import pack_grid

    return torch.from_numpy(pack_grid(qw.q, qw.grid)).contiguous()


def ggml_from_bytes(raw: torch.Tensor, spec: QuantSpec, in_features: int) -> QuantizedWeight:
    """Inverse of ggml_bytes: the codes and grid of a stored ggml layer (ValueError if the bytes do not fit)."""
    from .ggml_grid import unpack_grid

    t = spec.ggml
    if raw.dtype != torch.uint8 or raw.dim() != 2 or not t.fits(in_features) \
            or raw.shape[1] != in_features // t.block * t.type_size:
        raise ValueError(f"{t.name} bytes of shape {list(raw.shape)} {raw.dtype} do not hold rows of {in_features}")
    q, grid = unpack_grid(raw.numpy(), t, in_features)
    empty = torch.zeros(raw.shape[0], 0, device="cpu")
    return QuantizedWeight(q=q.to(torch.int32), scales=empty, zeros=empty.to(torch.int32), spec=spec, grid=grid)
