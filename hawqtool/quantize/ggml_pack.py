"""ggml block types as tensors: a fitted grid (the stored scales/mins), exact dequantization, and ggml's bytes.

Codes q are unsigned, in [0, 2^bits - 1], as stored in the bytes. The value of code q in group g is
  symmetric types  Q4_0 d*(q-8), Q5_0 d*(q-16), Q8_0 d*(q-128), Q3_K (d*(sc-32))*(q-4), Q6_K (d*sc)*(q-32);
  affine types     Q4_1/Q5_1 d*q + m, Q2_K/Q4_K/Q5_K (d*sc)*q - (dmin*m),
computed in float32 in exactly gguf.quants' (and ggml's) operation order, so dequantize_grid is bit-equal to
gguf.quants.dequantize of pack_grid's bytes. d, m, dmin are float16 values held in float32; sc, m of K-quants
are the stored integers (Q3_K's sc unsigned 0..63, Q6_K's signed int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ggml_types import GGMLType

SHIFT = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q3_K": 4, "Q6_K": 32}  # symmetric types: value = mul * (q - shift)
SUB_RANGE = {"Q2_K": (0, 15), "Q3_K": (0, 63), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}
FIELDS = {"Q4_0": ("d",), "Q5_0": ("d",), "Q8_0": ("d",), "Q4_1": ("d", "m"), "Q5_1": ("d", "m"),
          "Q2_K": ("d", "dmin", "sc", "m"), "Q4_K": ("d", "dmin", "sc", "m"), "Q5_K": ("d", "dmin", "sc", "m"),
          "Q3_K": ("d", "sc"), "Q6_K": ("d", "sc")}
LAYOUT = {  # ggml's block structs: (part, bytes) in memory order
    "Q4_0": (("d", 2), ("qs", 16)), "Q4_1": (("d", 2), ("m", 2), ("qs", 16)),
    "Q5_0": (("d", 2), ("qh", 4), ("qs", 16)), "Q5_1": (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
    "Q8_0": (("d", 2), ("qs", 32)),
    "Q2_K": (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)),
    "Q3_K": (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)),
    "Q4_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "Q5_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "Q6_K": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
}


def is_symmetric(t: GGMLType) -> bool:
    """Whether t's value is mul*(q - shift) (no stored offset)."""
    return t.name in SHIFT


@dataclass
class GGMLGrid:
    """The stored quantities of one layer in type `type`: per row and block d (and m / dmin), per row, block
    and sub-block the K-quants' integer sc (and m); shapes [out, nblocks] and [out, nblocks, block // group]."""

    type: GGMLType
    fields: dict[str, torch.Tensor]

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group multiplier and added offset [out, in // group] exactly as ggml computes them (offset None
        for symmetric types); the value of code q is mul*(q - shift) + offset."""
        t, f = self.type, self.fields
        d = f["d"].float()
        out = d.shape[0]
        if not t.is_kquant:
            return d, (f["m"].float() if "m" in f else None)
        sc = f["sc"].float() - (32 if t.name == "Q3_K" else 0)
        mul = (d[..., None] * sc).reshape(out, -1)
        if "dmin" not in f:
            return mul, None
        return mul, -(f["dmin"].float()[..., None] * f["m"].float()).reshape(out, -1)

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b float32 [out, in // group]: code q in group g has value a*q + b (to float rounding); a may be
        negative (signed d / sub-scales) or zero (any code is then exact)."""
        mul, add = self.group_params()
        if add is None:
            return mul, -SHIFT[self.type.name] * mul
        return mul, add


def dequantize_grid(q: torch.Tensor, grid: GGMLGrid) -> torch.Tensor:
    """float32 [out, in] values of codes q on the grid, bit-equal to gguf.quants.dequantize of the packed bytes."""
    t = grid.type
    mul, add = grid.group_params()
    out, ng = mul.shape
    qg = q.reshape(out, ng, t.group).to(mul.device)
    if add is None:
        w = mul[..., None] * (qg.float() - SHIFT[t.name])
    else:
        w = mul[..., None] * qg.float() + add[..., None]
    return w.reshape(out, ng * t.group)


def grid_codes(W: torch.Tensor, grid: GGMLGrid) -> torch.Tensor:
    """int32 [out, in] nearest code per weight, q = clamp(round((w - b) / a), 0, maxq) (0 where a = 0), the
    same rule GPTQ applies per column with scale_offset()."""
    a, b = grid.scale_offset()
    out, ng = a.shape
    Wg = W.detach().float().to(a.device).reshape(out, ng, -1)
    zero = a == 0
    a_safe = torch.where(zero, torch.ones_like(a), a)
    q = torch.clamp(torch.round((Wg - b[..., None]) / a_safe[..., None]), 0, grid.type.maxq)
    q = torch.where(zero[..., None], torch.zeros_like(q), q)
    return q.reshape(W.shape).to(torch.int32)


# ---- bytes ----

def _pack(x: np.ndarray, k: int) -> np.ndarray:
    """[..., K, L] values of k bits -> [..., L] bytes holding x[..., i, :] at bit k*i."""
    out = np.zeros(x.shape[:-2] + x.shape[-1:], dtype=np.uint8)
    for i in range(x.shape[-2]):
        out |= (x[..., i, :].astype(np.uint8) << np.uint8(k * i))
    return out


def _unpack(b: np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of _pack: [..., L] bytes -> [..., n, L] values of k bits."""
    shifts = (np.arange(n, dtype=np.uint8) * k).reshape((1,) * (b.ndim - 1) + (n, 1))
    return (b[..., None, :] >> shifts) & np.uint8((1 << k) - 1)


def _f16_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """float32 values [N] that are exactly float16 -> their 2 bytes [N, 2] (ValueError if not exact)."""
    h = x.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), x, equal_nan=True):
        raise ValueError(f"grid field {name!r} holds values that are not exactly float16")
    return h.reshape(-1, 1).view(np.uint8)


def _check_range(x: np.ndarray, lo: int, hi: int, what: str) -> None:
    """ValueError if integers x leave [lo, hi] (they would not fit their bits)."""
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"{what} out of range [{lo}, {hi}]: [{x.min()}, {x.max()}]")


def pack_grid(q: torch.Tensor, grid: GGMLGrid) -> np.ndarray:
    """uint8 [out, in // block * type_size]: codes and grid in ggml's block layout (what GGUF stores)."""
    t = grid.type
    out, in_f = q.shape
    if not t.fits(in_f):
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block}, got {in_f}")
    nb = in_f // t.block
    N = out * nb
    qn = q.detach().cpu().numpy().astype(np.int64)
    _check_range(qn, 0, t.maxq, f"{t.name} codes")
    qn = qn.reshape(N, t.block).astype(np.uint8)
    f = {k: v.detach().cpu().numpy() for k, v in grid.fields.items()}
    parts: dict[str, np.ndarray] = {}
    for k in ("d", "dmin") + (() if t.is_kquant else ("m",)):
        if k in f:
            parts[k] = _f16_bytes(f[k].astype(np.float32).reshape(N), k)
    if t.is_kquant:
        lo, hi = SUB_RANGE[t.name]
        sc = f["sc"].astype(np.int64).reshape(N, -1)
        _check_range(sc, lo, hi, f"{t.name} sub-block scales")
        m = f["m"].astype(np.int64).reshape(N, -1) if "m" in f else None
        if m is not None:
            _check_range(m, lo, hi, f"{t.name} sub-block mins")
        parts["scales"] = _pack_scales(t.name, sc, m)
    name = t.name
    if name in ("Q4_0", "Q4_1"):
        parts["qs"] = _pack(qn.reshape(N, 2, 16), 4)
    elif name in ("Q5_0", "Q5_1"):
        parts["qs"] = _pack((qn & 15).reshape(N, 2, 16), 4)
        parts["qh"] = _pack((qn >> 4).reshape(N, 4, 8).transpose(0, 2, 1), 1)  # bit j of a uint32 LE: code j
    elif name == "Q8_0":
        parts["qs"] = (qn.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif name == "Q2_K":
        parts["qs"] = _pack(qn.reshape(N, 2, 4, 32), 2).reshape(N, 64)
    elif name == "Q3_K":
        parts["hmask"] = _pack((qn >> 2).reshape(N, 8, 32), 1)
        parts["qs"] = _pack((qn & 3).reshape(N, 2, 4, 32), 2).reshape(N, 64)
    elif name == "Q4_K":
        parts["qs"] = _pack(qn.reshape(N, 4, 2, 32), 4).reshape(N, 128)
    elif name == "Q5_K":
        parts["qh"] = _pack((qn >> 4).reshape(N, 8, 32), 1)
        parts["qs"] = _pack((qn & 15).reshape(N, 4, 2, 32), 4).reshape(N, 128)
    elif name == "Q6_K":
        parts["ql"] = _pack((qn & 15).reshape(N, 2, 2, 64), 4).reshape(N, 128)
        parts["qh"] = _pack((qn >> 4).reshape(N, 2, 4, 32), 2).reshape(N, 64)
    blocks = np.concatenate([parts[p].reshape(N, n) for p, n in LAYOUT[name]], axis=1)
    return blocks.reshape(out, nb * t.type_size)


def _pack_scales(name: str, sc: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """K-quant sub-block scales (and mins) [N, groups] -> the block's scale bytes."""
    N = sc.shape[0]
    if name == "Q2_K":
        return (sc | (m << 4)).astype(np.uint8)
    if name == "Q6_K":
        return sc.astype(np.int8).view(np.uint8)
    if name == "Q3_K":  # 16 six-bit values: low nibbles in bytes 0..7 (j, then j+8 high), high pairs in 8..11
        lo = (sc & 15).astype(np.uint8)
        return np.concatenate([lo[:, :8] | (lo[:, 8:] << np.uint8(4)), _pack((sc >> 4).reshape(N, 4, 4), 2)], 1)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)  # Q4_K / Q5_K: 8 six-bit scales and mins in 12 bytes
    top = lambda x: (x[:, 4:] >> np.uint8(4)) << np.uint8(6)  # noqa: E731 - high 2 bits of j >= 4
    return np.concatenate([sc[:, :4] | top(sc), m[:, :4] | top(m),
                           (sc[:, 4:] & np.uint8(15)) | ((m[:, 4:] & np.uint8(15)) << np.uint8(4))], axis=1)


def _unpack_scales(name: str, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of _pack_scales: the block's scale bytes -> sc, m (int64 [N, groups]; m None without mins)."""
    N = s.shape[0]
    if name == "Q2_K":
        return (s & 15).astype(np.int64), (s >> 4).astype(np.int64)
    if name == "Q6_K":
        return s.view(np.int8).astype(np.int64), None
    if name == "Q3_K":
        lo = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
        hi = _unpack(s[:, 8:12], 2, 4).reshape(N, 16)
        return (lo | (hi << 4)).astype(np.int64), None
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.int64), m.astype(np.int64)


def unpack_grid(raw: np.ndarray | torch.Tensor, t: GGMLType, in_features: int) -> tuple[torch.Tensor, GGMLGrid]:
    """Inverse of pack_grid: codes int32 [out, in] and the grid (CPU tensors) of ggml blocks [out, row bytes]."""
    raw = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or not t.fits(in_features) \
            or raw.shape[1] != in_features // t.block * t.type_size:
        raise ValueError(f"{t.name} bytes of shape {list(raw.shape)} {raw.dtype} do not hold rows of {in_features}")
    out, nb = raw.shape[0], in_features // t.block
    N = out * nb
    blocks = np.ascontiguousarray(raw).reshape(N, t.type_size)
    parts, o = {}, 0
    for p, n in LAYOUT[t.name]:
        parts[p] = blocks[:, o:o + n]
        o += n
    f16 = lambda k: torch.from_numpy(  # noqa: E731
        np.ascontiguousarray(parts[k]).view(np.float16).astype(np.float32).reshape(out, nb))
    fields = {k: f16(k) for k in FIELDS[t.name] if k in ("d", "dmin") or (k == "m" and not t.is_kquant)}
    if t.is_kquant:
        sc, m = _unpack_scales(t.name, parts["scales"])
        fields["sc"] = torch.from_numpy(sc.astype(np.int32).reshape(out, nb, -1))
        if m is not None:
            fields["m"] = torch.from_numpy(m.astype(np.int32).reshape(out, nb, -1))
    name = t.name
    if name in ("Q4_0", "Q4_1"):
        q = _unpack(parts["qs"], 4, 2)
    elif name in ("Q5_0", "Q5_1"):
        high = _unpack(parts["qh"], 1, 8).transpose(0, 2, 1).reshape(N, 32)
        q = _unpack(parts["qs"], 4, 2).reshape(N, 32) | (high << 4)
    elif name == "Q8_0":
        q = parts["qs"].view(np.int8).astype(np.int16) + 128
    elif name == "Q2_K":
        q = _unpack(parts["qs"].reshape(N, 2, 32), 2, 4)
    elif name == "Q3_K":
        high = _unpack(parts["hmask"], 1, 8).reshape(N, 256)
        q = _unpack(parts["qs"].reshape(N, 2, 32), 2, 4).reshape(N, 256) | (high << 2)
    elif name == "Q4_K":
        q = _unpack(parts["qs"].reshape(N, 4, 32), 4, 2)
    elif name == "Q5_K":
        high = _unpack(parts["qh"], 1, 8).reshape(N, 256)
        q = _unpack(parts["qs"].reshape(N, 4, 32), 4, 2).reshape(N, 256) | (high << 4)
    else:  # Q6_K
        ql = _unpack(parts["ql"].reshape(N, 2, 64), 4, 2).reshape(N, 256)
        q = ql | (_unpack(parts["qh"].reshape(N, 2, 32), 2, 4).reshape(N, 256) << 4)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(out, in_features).astype(np.int32))
    return q, GGMLGrid(t, fields)
