"""Candidate quantization options per layer: (weight bits, group size, activation bits).

The ILP picks one option per layer. Widths alone (`--bits`) give one option per width at
one group size; `--group-sizes` makes the group size part of the choice; `--act-bits 8`
adds W8A8 (symmetric per-channel 8-bit weights, dynamic per-token 8-bit activations)
next to the weight-only options: W8A8 is the activation-quantized layer type that has an
integer kernel. `--pairs 4:8,4:4` adds other (weight, activation) pairs; their activations are
quantized per token at run time (simulated in float: no W4A8/W4A4 integer kernel yet).
`--formats gguf` (or a list of ggml types) replaces all of these by ggml block types (Q4_K, Q4_0, ...),
each allowed only on layers whose rows its blocks tile (K-quants: multiples of 256).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError
from ..quantize.quantizer import QuantSpec

FULL_ACT = 16  # activation bits of a weight-only layer (fp16/bf16/fp32 activations)


@dataclass(frozen=True)
class Option:
    """One column of the ILP."""

    bits: int
    group_size: int = 128
    act_bits: int = FULL_ACT
    symmetric: bool | None = None  # None: the plan's setting; W8A8 weights are symmetric per channel
    fmt: str = ""  # a ggml block type (then bits/group_size are that type's)
    scale_bits: int = 16  # 4..8: scale codes (quantize/scale_codes.py) on a grouped layer

    @property
    def label(self) -> str:
        if self.fmt:
            return self.fmt
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}g{g}a{self.act_bits}" + (f"s{self.scale_bits}" if self.scale_bits != 16 else "")

    @property
    def timed_label(self) -> str:
        """The label a latency table times the option under: scale codes run as the fp16 scales they expand to."""
        return self.label.removesuffix(f"s{self.scale_bits}") if self.scale_bits != 16 else self.label

    def spec(self, symmetric: bool) -> QuantSpec:
        if self.fmt:
            return QuantSpec.for_ggml(self.fmt)
        return QuantSpec(self.bits, self.group_size, symmetric if self.symmetric is None else self.symmetric,
                         scale_bits=self.scale_bits)


def parse_pairs(text: str | None) -> list[tuple[int, int]]:
    """'4:8,4:4' -> [(4, 8), (4, 4)]: weight bits 1..8 and activation bits 2..8 per pair; one-line error otherwise."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        w, sep, a = item.partition(":")
        if not sep or not w.strip().isdigit() or not a.strip().isdigit() or not 1 <= int(w) <= 8 \
                or not 2 <= int(a) <= 8:
            raise UserError(f"--pairs takes W:A items with W in 1..8 and A in 2..8, e.g. '4:8,4:4', got {item!r}")
        out.append((int(w), int(a)))
    return out


def make_options(bits: Sequence[int], group_sizes: Sequence[int] = (128,),
                 act_bits: Sequence[int] = (FULL_ACT,), pairs: Sequence[tuple[int, int]] = (),
                 scale_bits: int = 16) -> list[Option]:
    """Every (width, group size) pair as weight-only options, plus W8A<a> for each activation width a < 16,
    plus each (weight bits, activation bits) pair at the first group size (dynamic per-token activations).
    scale_bits 4..8: the grouped weight-only options store scale codes (per-channel ones keep fp16 scales)."""
    if scale_bits != 16 and not 4 <= scale_bits <= 8:
        raise UserError(f"--scale-bits must be 16 (fp16 scales) or 4..8 (scale codes), got {scale_bits}")
    bits = sorted({int(b) for b in bits})
    groups = list(dict.fromkeys(int(g) for g in group_sizes))
    acts = sorted({int(a) for a in act_bits})
    if not bits or not groups:
        raise UserError("give at least one bit width (--bits) and one group size (--group-sizes)")
    bad_act = [a for a in acts if a not in (8, FULL_ACT)]
    if bad_act:
        raise UserError(f"--act-bits must be 8 (W8A8) or 16 (weight-only), got {bad_act[0]}")
    for g in groups:
        if g == 0 or g < -1:
            raise UserError(f"group sizes must be -1 (per channel) or positive, got {g}")
    opts = [Option(b, g, scale_bits=scale_bits if g != -1 else 16) for b in bits for g in groups] \
        if FULL_ACT in acts else []
    for a in acts:
        if a < FULL_ACT:  # the runtime's integer kernel: symmetric per-channel int8 weights
            opts.append(Option(8, -1, a, symmetric=True))
    for w, a in pairs:
        opt = Option(int(w), groups[0], int(a))
        if opt not in opts and not (w == 8 and a == 8 and any(o.act_bits == 8 and o.bits == 8 for o in opts)):
            opts.append(opt)
    if not opts:
        raise UserError("no options left: give --act-bits 16 (weight-only) and/or 8 (W8A8), or --pairs")
    return opts


GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def parse_formats(text: str | None) -> list[str]:
    """'gguf' (every type llama.cpp runs that we quantize to) or a comma list of ggml types -> type names;
    '' -> [] (hawqtool's own grid). One-line UserError naming the valid types otherwise."""
    from ..quantize.ggml_types import TYPES

    text = (text or "").strip()
    if not text:
        return []
    if text.lower() == "gguf":
        return list(GGUF_TYPES)
    out = []
    for item in text.split(","):
        name = item.strip().upper()
        if name not in TYPES:
            raise UserError(f"--formats takes 'gguf' or ggml types from {', '.join(GGUF_TYPES)}, got {item.strip()!r}")
        if name not in out:
            out.append(name)
    return out


def ggml_options(formats: Sequence[str]) -> list[Option]:
    """One weight-only option per ggml type, in order of bits per weight."""
    from ..quantize.ggml_types import ggml_type

    types = sorted((ggml_type(f) for f in formats), key=lambda t: (t.bits_per_weight, t.name))
    return [Option(t.bits, t.group, fmt=t.name) for t in types]
