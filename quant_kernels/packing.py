"""Bit packing of small unsigned integer codes into int32 words.

Layout (the on-disk format of hawqtool checkpoints; do not change it silently):

* Every row (all leading dimensions flattened) is an independent little-endian bit
  stream. Value j of a row occupies stream bits [j*bits, (j+1)*bits), its least
  significant bit first.
* Word k of the row holds stream bits [32k, 32k+32), stream bit 32k being the word's
  least significant bit. A row of n values needs ceil(n*bits/32) words; the unused
  high bits of the last word are zero.
* With bits not dividing 32 (3, 5, 6, 7) a value may straddle two words: its low part
  sits in the top bits of word k, its high part in the bottom bits of word k+1.
* Words are stored as torch.int32, i.e. the same 32 bits read as two's complement, so
  a word whose bit 31 is set is negative.

Example: bits=4, values [1, 2, 3, 4, 5, 6, 7, 8] -> one word 0x87654321 (int32 -2023406815).
"""
from __future__ import annotations

import math

import torch

__all__ = ["pack", "unpack", "n_words", "MAX_BITS"]

MAX_BITS = 8
_U32 = 0xFFFFFFFF


def n_words(n: int, bits: int) -> int:
    """Number of int32 words that hold n values of `bits` bits (ceil(n*bits/32))."""
    return (n * bits + 31) // 32


def _check_bits(bits: int) -> None:
    """Reject a bit width the format does not support."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32 (explicit wrap)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


PACK_ROWS = 4096  # pack works on this many rows at a time


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., n) in [0, 2^bits-1] into int32 words (..., ceil(n*bits/32))."""
    _check_bits(bits)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"pack expects a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack expects an integer tensor, got dtype {q.dtype}")
    if q.dim() == 0:
        raise ValueError("pack expects at least one dimension (..., n)")
    n = q.shape[-1]
    lead = q.shape[:-1]
    n_w = n_words(n, bits)
    rows = math.prod(lead)
    if rows > PACK_ROWS:  # rows pack independently: slices bound the int64 temporaries (3× the codes' int64 size)
        flat = q.reshape(rows, n)
        out = torch.empty(rows, n_w, dtype=torch.int32, device=q.device)
        for r in range(0, rows, PACK_ROWS):
            out[r:r + PACK_ROWS] = pack(flat[r:r + PACK_ROWS], bits)
        return out.reshape(*lead, n_w)
    q64 = q.reshape(rows, n).to(torch.int64)
    if q64.numel() and (int(q64.min()) < 0 or int(q64.max()) > 2**bits - 1):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}; "
                         f"got min {int(q64.min())}, max {int(q64.max())}")
    out = torch.zeros(rows, n_w, dtype=torch.int64, device=q.device)
    if n:
        start = torch.arange(n, device=q.device, dtype=torch.int64) * bits
        w0, off = start // 32, start % 32
        # Bit fields are disjoint, so adding the pieces equals OR-ing them.
        out.index_add_(1, w0, (q64 << off) & _U32)
        cross = (off + bits) > 32
        if bool(cross.any()):
            out.index_add_(1, w0[cross] + 1, q64[:, cross] >> (32 - off[cross]))
    return _to_int32(out).reshape(*lead, n_w)


def _prepare_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Validate unpack's arguments; the words as unsigned values in int64, shape (rows, W)."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype.is_floating_point or packed.dtype == torch.bool:
        raise ValueError("unpack expects an integer tensor of packed words")
    if packed.dim() == 0:
        raise ValueError("unpack expects at least one dimension (..., words)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if packed.shape[-1] != n_words(n, bits):
        raise ValueError(f"{n} values of {bits} bits need {n_words(n, bits)} words per row, "
                         f"got {packed.shape[-1]}")
    return packed.reshape(math.prod(packed.shape[:-1]), packed.shape[-1]).to(torch.int64) & _U32


def _unpack_general(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack via per-value gathers; valid for every bit width (values may straddle words)."""
    w = _prepare_unpack(packed, bits, n)
    lead = packed.shape[:-1]
    if n == 0:
        return torch.zeros(*lead, 0, dtype=torch.int32, device=packed.device)
    mask = 2**bits - 1
    start = torch.arange(n, device=packed.device, dtype=torch.int64) * bits
    w0, off = start // 32, start % 32
    w1 = torch.clamp(w0 + 1, max=w.shape[1] - 1)
    # For a value that does not straddle, 32-off >= bits so the second term's low bits are 0.
    v = (w[:, w0] >> off) | ((w[:, w1] & mask) << (32 - off))
    return (v & mask).to(torch.int32).reshape(*lead, n)


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack when bits divides 32 (no straddling): shift each word by every slot offset."""
    w = _prepare_unpack(packed, bits, n)
    lead = packed.shape[:-1]
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    v = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return v.reshape(w.shape[0], w.shape[1] * per_word)[:, :n].to(torch.int32).reshape(*lead, n)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words (..., ceil(n*bits/32)) -> int32 codes (..., n); PACK_ROWS rows at a time."""
    rows = math.prod(packed.shape[:-1]) if isinstance(packed, torch.Tensor) and packed.dim() > 0 else 0
    if rows > PACK_ROWS and isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        flat = packed.reshape(rows, packed.shape[-1])
        out = torch.empty(rows, n, dtype=torch.int32, device=packed.device)
        for r in range(0, rows, PACK_ROWS):
            out[r:r + PACK_ROWS] = unpack(flat[r:r + PACK_ROWS], bits, n)
        return out.reshape(*packed.shape[:-1], n)
    if isinstance(bits, int) and not isinstance(bits, bool) and bits >= 1 and 32 % bits == 0:
        return _unpack_aligned(packed, bits, n)
    return _unpack_general(packed, bits, n)
