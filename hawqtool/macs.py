"""Per-layer profile measured with forward hooks on a real batch: MACs and activation crest factor.

MACs are per *sample unit*: per token for token models (input_ids), per image otherwise.
Linear / HF Conv1D: rows × in × out; Conv1d/Conv2d: output elements × in/groups × kernel.
The crest factor max(x²)/mean(x²) of each layer's input, per token (row) or per image (per image
and channel for depthwise convs, per pixel for 1×1 convs, as the runtime scales them), averaged,
sizes the noise of dynamic activation quantization (see allocate.plan).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

PROFILE_VERSION = 2  # 2: crest per (image, channel) for depthwise convs, per pixel for 1×1 convs


@dataclass
class LayerProfile:
    """What the allocator needs to know about a layer beyond its weights."""

    macs: float  # multiply-accumulates per sample unit
    crest: float  # mean over rows of max(x²)/mean(x²) of the layer input
    unit: str  # "token" or "image"
    weight_sq: float = 0.0  # ‖W‖²_F


def _macs_and_rows(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """MACs of one call and the input as rows that are quantized together."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        k = m.in_channels // m.groups
        for s in m.kernel_size:
            k *= s
        from .runtime import conv_act_granularity  # rows scaled together at run time

        g = conv_act_granularity(m)
        rows = (x.transpose(1, -1).reshape(-1, x.shape[1]) if g == "pixel"
                else x.reshape(x.shape[0] * (x.shape[1] if g == "channel" else 1), -1))
        return float(y.numel() * k), rows
    in_f = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0] if isinstance(m, Conv1D) else x.shape[-1]
    rows = x.reshape(-1, in_f)
    return float(rows.shape[0] * in_f * (y.shape[-1])), rows


@torch.no_grad()
def profile_layers(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict]) -> dict[str, LayerProfile]:
    """Run the batches once with hooks on `layers`; MACs and crest factor per layer."""
    macs = {n: 0.0 for n in layers}
    crest_sum = {n: 0.0 for n in layers}
    crest_n = {n: 0 for n in layers}

    def hook(name: str):
        def fn(m, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            x = args[0] if args else next(iter(kwargs.values()))
            c, rows = _macs_and_rows(m, x, y)
            macs[name] += c
            sq = rows.float().pow(2)
            ms = sq.mean(dim=1).clamp_min(1e-30)
            crest_sum[name] += float((sq.max(dim=1).values / ms).sum())
            crest_n[name] += rows.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    units = 0
    unit = "image"
    try:
        for b in batches:
            model(**b)
            if "input_ids" in b:
                unit, units = "token", units + b["input_ids"].numel()
            else:
                first = next(iter(b.values()))
                units += first.shape[0]
    finally:
        for h in handles:
            h.remove()
    from .models import weight_matrix

    units = max(units, 1)
    return {n: LayerProfile(macs=macs[n] / units, crest=crest_sum[n] / max(crest_n[n], 1), unit=unit,
                            weight_sq=float(weight_matrix(m).double().pow(2).sum())) for n, m in layers.items()}


def load_or_measure_profile(report, model_ref: str | None, calib: str, cache: Path,
                            trust_remote_code: bool = False, n_windows: int = 2) -> dict[str, LayerProfile]:
    """Profile of the report's layers, cached in `cache` (JSON keyed by the report's fingerprint)."""
    import json

    from .artifacts import write_atomic
    from .inputs import batches_of, calibration_inputs
    from .models import load_model, quantizable_layers, untie_head

    if cache.is_file():
        try:
            d = json.loads(cache.read_text())
            if d.get("sensitivity_fingerprint") == report.fingerprint and d.get("calib") == calib and \
                    d.get("version") == PROFILE_VERSION:
                return {n: LayerProfile(**v) for n, v in d["layers"].items()}
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # unreadable cache: measure again and overwrite it
    loaded = load_model(model_ref or report.model, trust_remote_code=trust_remote_code)
    seqlen = int(report.settings.get("seqlen", 256)) if isinstance(report.settings, dict) else 256
    ids = calibration_inputs(loaded, calib, n_windows, seqlen, seed=0)
    names = [ls.name for ls in report.layers]
    untie_head(loaded.model, set(names))
    layers = quantizable_layers(loaded.model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise UserError(f"sensitivity report names layer {missing[0]} that the model lacks; pass the right --model")
    prof = profile_layers(loaded.model, {n: layers[n] for n in names}, batches_of(loaded, ids, len(ids)))
    write_atomic(cache, json.dumps({"version": PROFILE_VERSION, "sensitivity_fingerprint": report.fingerprint,
                                    "calib": calib,
                                    "layers": {n: asdict(p) for n, p in prof.items()}}, indent=1))
    return prof
