"""Latency lookup table (layer × option → ms) for the allocator's latency budget.

`hawqtool bench --latency-table FILE MODEL` measures it on this machine through quant_kernels
(the same kernels a checkpoint runs on); users may also supply their own file (e.g. measured
on their GPU server) in the same format:

    {"kind": "latency-table", "schema_version": 1, "tokens": 1, "machine": "...",
     "fp32": {"layer": ms, ...}, "layers": {"layer": {"w4g128a16": ms, ...}, ...}}

Option labels are `w<bits>g<group|c>a<act bits>` (see allocate.options.Option.label).
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import UserError

SCHEMA_VERSION = 1


@dataclass
class LatencyTable:
    """Median milliseconds per layer and option at `tokens` rows of input."""

    tokens: int
    layers: dict[str, dict[str, float]]
    fp32: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    backend: str = ""
    kind: str = "latency-table"
    schema_version: int = SCHEMA_VERSION

    def costs(self, names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """[L, C] table for the allocator; one-line error naming the first missing entry."""
        out = np.zeros((len(names), len(labels)))
        for i, n in enumerate(names):
            row = self.layers.get(n)
            if row is None:
                raise UserError(f"latency table has no layer {n}; measure it for this model with "
                                "`hawqtool bench --latency-table FILE MODEL`")
            for j, lab in enumerate(labels):
                if lab not in row:
                    raise UserError(f"latency table has no entry {lab} for layer {n}; re-measure with the same "
                                    "--bits/--group-sizes/--act-bits as allocate")
                out[i, j] = row[lab]
        return out

    def fp32_total(self, names: Sequence[str]) -> float:
        """Sum of the fp32 latencies of these layers (what --latency-frac is a fraction of)."""
        missing = [n for n in names if n not in self.fp32]
        if missing:
            raise UserError(f"latency table has no fp32 time for layer {missing[0]}; --latency-frac needs them, "
                            "or give --max-latency-ms")
        return float(sum(self.fp32[n] for n in names))


def _is_ms(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0


def load_latency_table(path: str | Path) -> LatencyTable:
    """Read and validate a latency table file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"latency table {p} does not exist; write one with `hawqtool bench --latency-table {p} MODEL`")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"latency table {p} is not valid JSON ({e.__class__.__name__}); re-measure it") from e
    if not isinstance(d, dict) or d.get("kind") != "latency-table" or d.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{p} is not a hawqtool latency table (kind/schema_version); re-measure it")
    layers, fp32 = d.get("layers"), d.get("fp32", {})
    if not isinstance(layers, dict) or not layers or not isinstance(fp32, dict):
        raise UserError(f"latency table {p} needs a non-empty 'layers' mapping; re-measure it")
    for n, row in layers.items():
        if not isinstance(row, dict) or not row or not all(_is_ms(v) for v in row.values()):
            raise UserError(f"latency table {p}: layer {n} must map option labels to non-negative ms")
    if not all(_is_ms(v) for v in fp32.values()):
        raise UserError(f"latency table {p}: 'fp32' must map layer names to non-negative ms")
    tokens = d.get("tokens", 1)
    if not isinstance(tokens, int) or tokens < 1:
        raise UserError(f"latency table {p}: 'tokens' must be a positive integer")
    return LatencyTable(tokens=tokens, layers={n: {k: float(v) for k, v in r.items()} for n, r in layers.items()},
                        fp32={n: float(v) for n, v in fp32.items()}, machine=str(d.get("machine", "")),
                        backend=str(d.get("backend", "")))


def save_latency_table(table: LatencyTable, path: str | Path) -> None:
    from .artifacts import write_atomic

    write_atomic(Path(path), json.dumps(asdict(table), indent=1))


@torch.no_grad()
def measure_latency_table(shapes: dict[str, tuple[int, int]], options, *, symmetric: bool = False, tokens: int = 1,
                          repeats: int = 20, progress: Callable[[int], None] | None = None,
                          device: torch.device | None = None) -> LatencyTable:
    """Time each distinct (shape, option) once on random weights through the runtime's quantized layer
    (quant_kernels), and an fp32 F.linear per shape; layers of equal shape share the measurement."""
    from quant_kernels import backend_info

    from .bench import median_ms
    from .checkpoint import pack_layer
    from .quantize.quantizer import rtn
    from .runtime import QuantLinear

    device = device or torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    by_shape: dict[tuple[int, int], dict[str, float]] = {}
    fp32: dict[tuple[int, int], float] = {}
    for shape in dict.fromkeys(shapes.values()):
        out_f, in_f = shape
        W = (torch.randn(out_f, in_f, generator=g, device="cpu") * 0.02).to(device)
        x = torch.randn(tokens, in_f, generator=g, device="cpu").to(device)
        fp32[shape] = median_ms(lambda: torch.nn.functional.linear(x, W), repeats)
        row = {}
        for opt in options:
            layer = QuantLinear(pack_layer(rtn(W, opt.spec(symmetric))), None, act_bits=opt.act_bits)
            row[opt.label] = median_ms(lambda: layer(x), repeats)
        by_shape[shape] = row
        if progress:
            progress(1)
    return LatencyTable(tokens=tokens, layers={n: dict(by_shape[s]) for n, s in shapes.items()},
                        fp32={n: fp32[s] for n, s in shapes.items()},
                        machine=(torch.cuda.get_device_name(device) if device.type == "cuda" else
                                 f"{platform.machine()} {platform.processor()} {torch.get_num_threads()} threads"),
                        backend=str(backend_info()))
