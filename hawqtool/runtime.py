"""Stage 5 (run): rebuild a model from a checkpoint with layers that stay packed and
compute through quant_kernels. Weights are read with safetensors only (no unpickling)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quant_kernels import PackedWeight, dequantize, qmatmul
from quant_kernels.activation import fake_quant_per_token

from .checkpoint import WEIGHTS, read_manifest
from .errors import UserError


class QuantLinear(nn.Module):
    """A Linear whose weight is kept packed; forward calls quant_kernels. act_bits < 16 quantizes the
    input per token first (W8A8: dynamic symmetric int8 activations)."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None, act_bits: int = 16):
        super().__init__()
        self.in_features, self.out_features = pw.in_features, pw.out_features
        self.bits, self.group_size, self.act_bits = pw.bits, pw.group_size, int(act_bits)
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.register_buffer("g_idx", pw.g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.pw = pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits < 16:
            x = fake_quant_per_token(x, self.act_bits)
        return qmatmul(x, self.pw, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype)

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits < 16 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}{act}"


def packed_from_tensors(t: dict[str, torch.Tensor], name: str, meta: dict) -> PackedWeight:
    try:
        pw = PackedWeight(qweight=t[f"{name}.qweight"], scales=t[f"{name}.scales"], qzeros=t.get(f"{name}.qzeros"),
                          bits=int(meta["bits"]), group_size=int(meta["group_size"]),
                          in_features=int(meta["in_features"]), out_features=int(meta["out_features"]),
                          symmetric=bool(meta["symmetric"]), g_idx=t.get(f"{name}.g_idx"))
        pw.validate()
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"layer {name} in the checkpoint is malformed ({e}); re-create it with `hawqtool quantize`") from e
    return pw


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_quantized(path: str | Path, *, verify: bool = True) -> nn.Module:
    """Model from a hawqtool checkpoint, quantized layers as QuantLinear, in eval mode."""
    from transformers import AutoConfig

    from .models import model_class, model_task

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS} cannot be read ({str(e).splitlines()[0]}); re-create the checkpoint") from e
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/config.json is unreadable; re-create the checkpoint") from e
    model = model_class(model_task(config)).from_config(config, dtype=torch.float32, attn_implementation="eager")
    for name, meta in manifest["layers"].items():
        act_bits = meta.get("act_bits", 16)
        if not isinstance(act_bits, int) or isinstance(act_bits, bool) or act_bits not in (8, 16):
            raise UserError(f"layer {name} in the checkpoint has act_bits {act_bits!r} (expected 8 or 16); "
                            "re-create it with `hawqtool quantize`")
        _set_module(model, name, QuantLinear(packed_from_tensors(tensors, name, meta), tensors.get(f"{name}.bias"),
                                             act_bits=act_bits))
    rest = {k: v for k, v in tensors.items()
            if not any(k.startswith(n + ".") for n in manifest["layers"])}
    model_keys = set(model.state_dict().keys())
    quant_keys = {k for k in model_keys if any(k.startswith(n + ".") for n in manifest["layers"])}
    needed = model_keys - quant_keys - set(manifest.get("tied", {}))
    missing = sorted(needed - set(rest))
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} tensors (e.g. {missing[0]}); re-create it")
    model.load_state_dict(rest, strict=False)
    if manifest.get("tied"):
        model.tie_weights()
    model.eval()
    return model

