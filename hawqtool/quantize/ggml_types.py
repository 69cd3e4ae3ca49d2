"""The ggml block types hawqtool quantizes to (the GGUF formats llama.cpp runs): sizes and bit counts.

A row of `in_features` weights is stored as in_features / block blocks of type_size bytes each; inside a block,
`group` consecutive weights share one (scale, offset) pair. Codes are unsigned, in [0, 2^bits - 1], exactly
as stored in the bytes (ggml_pack.py gives each type's value of a code and its byte layout).
"""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    """One ggml block type: code width, block and group sizes, and bytes per block."""

    name: str       # "Q4_K"
    bits: int       # bits per code
    block: int      # weights per stored block (32 for legacy types, 256 for K-quants)
    group: int      # weights sharing one (scale, offset) pair
    type_size: int  # bytes per block (equals gguf.GGML_QUANT_SIZES)

    @property
    def maxq(self) -> int:
        """Largest code."""
        return 2**self.bits - 1

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales and mins included."""
        return 8 * self.type_size / self.block

    @property
    def ggml_id(self) -> int:
        """ggml's numeric type id (gguf.GGMLQuantizationType), for GGUF tensor headers."""
        return _IDS[self.name]

    @property
    def is_kquant(self) -> bool:
        """A K-quant: 256-weight super-blocks with quantized sub-block scales."""
        return self.block == QK_K

    def fits(self, in_features: int) -> bool:
        """Whether rows of `in_features` weights tile into whole blocks."""
        return in_features > 0 and in_features % self.block == 0

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store an [out, in] layer (ValueError if its rows do not tile into blocks)."""
        if not self.fits(in_features):
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block}, got {in_features}")
        return out_features * (in_features // self.block) * self.type_size * 8


_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
        "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("Q8_0", 8, 32, 32, 34),
    GGMLType("Q5_1", 5, 32, 32, 24),
    GGMLType("Q5_0", 5, 32, 32, 22),
    GGMLType("Q4_1", 4, 32, 32, 20),
    GGMLType("Q4_0", 4, 32, 32, 18),
    GGMLType("Q6_K", 6, QK_K, 16, 210),
    GGMLType("Q5_K", 5, QK_K, 32, 176),
    GGMLType("Q4_K", 4, QK_K, 32, 144),
    GGMLType("Q3_K", 3, QK_K, 16, 110),
    GGMLType("Q2_K", 2, QK_K, 16, 84),
)}


def ggml_type(name: str) -> GGMLType:
    """The type called `name` (case-insensitive); ValueError naming the valid names."""
    t = TYPES.get(str(name).strip().upper())
    if t is None:
        raise ValueError(f"unknown ggml type {name!r}; valid types: {', '.join(TYPES)}")
    return t
