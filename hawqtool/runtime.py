"""Stage 5 (run): rebuild a model from a checkpoint with layers that stay packed and
compute through quant_kernels. Weights are read with safetensors only (no unpickling)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quant_kernels import PackedWeight, dequantize, qmatmul, qmatmul_w8a8
from quant_kernels.int8_ops import (ActSpec, conv2d_int8, fake_quant, int8_conv_supported, int8_linear_fn,
                                    int8_linear_supported)

from .checkpoint import MANIFEST, WEIGHTS, read_manifest, verify_folder
from .errors import UserError


def _act_spec(act_bits: int, act_static, granularity: str = "image") -> ActSpec | None:
    """The input quantizer of a layer: None (float input), dynamic (conv inputs scaled per `granularity`), or
    static (scale, zero)."""
    if act_bits >= 16:
        return None
    return ActSpec(act_bits, *act_static) if act_static is not None else ActSpec(act_bits, granularity=granularity)


def _act_repr(layer) -> str:
    """', act_bits=…' with the quantizer's kind and which kernel runs, for a layer's repr ('' for float input)."""
    a = layer.act
    if a is None:
        return ""
    kind = ", static" if a.static else (f", per {a.granularity}" if a.granularity != "image" else "")
    return f", act_bits={layer.act_bits}{kind}, kernel={'int8' if layer.int8 else 'fake-quant'}"


def _cpu_float(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


class QuantLinear(nn.Module):
    """A Linear whose weight is kept packed; forward calls quant_kernels. With act_bits < 16 the input is
    quantized (per token, or with the static range act_static = (scale, zero)) and, where quant_kernels has
    an integer kernel for the weight (codes ≤ 4 bits, symmetric per-channel 8-bit), the sums are int32;
    otherwise the same arithmetic runs fake-quantized (`kernel` in the repr says which)."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None, act_bits: int = 16, act_static=None):
        super().__init__()
        self.act_static = act_static
        self.act = _act_spec(int(act_bits), act_static)
        self.int8 = self.act is not None and int8_linear_supported(pw)
        self.in_features, self.out_features = pw.in_features, pw.out_features
        self.bits, self.group_size, self.act_bits = pw.bits, pw.group_size, int(act_bits)
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.register_buffer("g_idx", pw.g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.pw = pw
        self._int8_fn = None  # bound integer-kernel call, built on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return qmatmul(x, self.pw, self.bias)
        if self.int8 and _cpu_float(x):
            if self._int8_fn is None:
                self._int8_fn = int8_linear_fn(self.pw, self.bias, self.act)
            if x.dtype is torch.float32 and x.is_contiguous():  # the decode hot path: no copies, no casts
                return self._int8_fn(x.view(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
            y = self._int8_fn(x.reshape(-1, self.in_features).to(torch.float32).contiguous())
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.act == ActSpec(8):
            return qmatmul_w8a8(x, self.pw, self.bias)  # the Triton W8A8 kernel on GPU
        return qmatmul(fake_quant(x, self.act), self.pw, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype)

    def prepare(self) -> None:
        """Build the kernel layouts now (one call on a zero row), e.g. before torch.compile traces the layer."""
        with torch.inference_mode():
            self(torch.zeros(1, self.in_features, device=self.pw.device))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
                f"{_act_repr(self)}")


def _meta_int(meta: dict, key: str, name: str) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(f"layer {name} in the checkpoint has {key}={v!r} (expected an integer); "
                        "re-create it with `hawqtool quantize`")
    return v


def is_depthwise(m: nn.Module) -> bool:
    """A Conv2d with one input channel per output channel (and more than one channel)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_pointwise(m: nn.Module) -> bool:
    """A 1×1 Conv2d without groups or padding: every output pixel is a token of a Linear layer."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and not isinstance(m.padding, str) and tuple(m.padding) == (0, 0))


def conv_act_granularity(m: nn.Module) -> str:
    """The finest dynamic activation scale a conv's integer kernel applies for free: per (image, channel) for
    depthwise, per pixel for 1×1, per image otherwise."""
    return "channel" if is_depthwise(m) else "pixel" if is_pointwise(m) else "image"


def _act_granularity(meta: dict, name: str, target: nn.Module, static) -> str:
    """`act_granularity` of a layer (image when absent), valid only where conv_act_granularity allows it."""
    g = meta.get("act_granularity", "image")
    if g not in ("image", "channel", "pixel"):
        raise UserError(f"layer {name} in the checkpoint has act_granularity {g!r} (expected image, channel or "
                        "pixel); re-create the checkpoint")
    if g != "image" and (static is not None or conv_act_granularity(target) != g):
        raise UserError(f"layer {name} in the checkpoint asks for per-{g} activation scales, which only dynamic "
                        f"{'depthwise' if g == 'channel' else '1×1'} convolutions have; re-create the checkpoint")
    return g


def _act_static(meta: dict, name: str):
    """(scale, zero) of a layer with static activation quantization, else None."""
    if meta.get("act_mode", "dynamic") == "dynamic":
        return None
    s, z = meta.get("act_scale"), meta.get("act_zero")
    if meta.get("act_mode") != "static" or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in (s, z)) or not s > 0 or not z == z:
        raise UserError(f"layer {name} in the checkpoint has a malformed activation range; re-create it")
    return float(s), float(z)


def _same_pad(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TensorFlow 'SAME' zero padding (timm's Conv2dSame pads like this in its forward)."""
    pads = []
    for i, k, st, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation):
        p = max((-(-i // st) - 1) * st + (k - 1) * d + 1 - i, 0)
        pads.append((p // 2, p - p // 2))
    return torch.nn.functional.pad(x, (*pads[1], *pads[0]))


class QuantConv2d(nn.Module):
    """A Conv2d/Conv1d whose weight is kept packed ([out, in/groups·k] rows, per-channel or grouped scales).
    With act_bits < 16 on CPU, Conv2d layers with zero padding (or timm's Conv2dSame) whose weight has an
    integer kernel (groups=1, or depthwise) run on int8 codes with int32 sums (quant_kernels.int8_ops; dynamic
    inputs scaled per `act_granularity`: image, channel for depthwise, pixel for 1×1). Otherwise the float
    module runs on the weight dequantized once by quant_kernels, with the input fake-quantized by the same
    quantizer (`kernel` in the repr says which)."""

    def __init__(self, pw: PackedWeight, conv: nn.Module, bias: torch.Tensor | None, act_bits: int = 16,
                 act_static=None, act_granularity: str = "image"):
        super().__init__()
        self.act_static = act_static
        self.act = _act_spec(int(act_bits), act_static, act_granularity)
        self.pw, self.act_bits, self.bits, self.group_size = pw, int(act_bits), pw.bits, pw.group_size
        self.register_buffer("qweight", pw.qweight)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("qzeros", pw.qzeros)
        self.shape = tuple(conv.weight.shape)
        self.same = type(conv).__name__ == "Conv2dSame"
        self.int8 = (self.act is not None and isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros"
                     and (self.same or not isinstance(conv.padding, str))
                     and int8_conv_supported(pw, conv.groups, conv.in_channels, conv.out_channels))
        # the float module runs the convolution (its own forward: timm's Conv2dSame pads dynamically); its
        # weight is swapped for the dequantized one per call, so its own storage is freed here
        conv.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        if conv.bias is not None:
            conv.bias = nn.Parameter(torch.empty(0), requires_grad=False)
        object.__setattr__(self, "_conv", conv)  # not a submodule: the checkpoint's tensors are the state
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._w: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._conv
        if self.int8 and _cpu_float(x) and x.dim() == 4:
            padding = (0, 0) if self.same else c.padding
            x = _same_pad(x, c) if self.same else x
            return conv2d_int8(x, self.pw, self.bias, self.act, c.kernel_size, c.stride, padding, c.dilation,
                               c.groups)
        if self._w is None or self._w.dtype != x.dtype:
            self._w = dequantize(self.pw, x.dtype).reshape(self.shape)
        if self.act is not None:
            x = fake_quant(x, self.act, per_image=True)
        params = {"weight": self._w} if self.bias is None else {"weight": self._w, "bias": self.bias}
        return torch.func.functional_call(c, params, (x,))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.pw, dtype).reshape(self.shape)

    def prepare(self) -> None:
        """Build the kernel layouts now (one call on the smallest zero input), e.g. before torch.compile."""
        (kh, kw), (dh, dw) = self._conv.kernel_size, self._conv.dilation
        with torch.inference_mode():
            self(torch.zeros(1, self.shape[1] * self._conv.groups, (kh - 1) * dh + 1, (kw - 1) * dw + 1,
                             device=self.pw.device))

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group={self.group_size}{_act_repr(self)}"


def packed_from_tensors(t: dict[str, torch.Tensor], name: str, meta: dict) -> PackedWeight:
    """The layer's PackedWeight from the checkpoint tensors and its manifest entry, fully validated."""
    if not isinstance(meta, dict):
        raise UserError(f"layer {name!r} in the checkpoint manifest is not an object; re-create the checkpoint")
    if not isinstance(meta.get("symmetric"), bool):
        raise UserError(f"layer {name} in the checkpoint has symmetric={meta.get('symmetric')!r} (expected true/false);"
                        " re-create it with `hawqtool quantize`")
    if f"{name}.qweight" not in t or f"{name}.scales" not in t:
        raise UserError(f"layer {name} in the checkpoint has no packed weight tensors; re-create the checkpoint")
    try:
        pw = PackedWeight(qweight=t[f"{name}.qweight"], scales=t[f"{name}.scales"], qzeros=t.get(f"{name}.qzeros"),
                          bits=_meta_int(meta, "bits", name), group_size=_meta_int(meta, "group_size", name),
                          in_features=_meta_int(meta, "in_features", name),
                          out_features=_meta_int(meta, "out_features", name),
                          symmetric=meta["symmetric"], g_idx=t.get(f"{name}.g_idx"))
        pw.validate()
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"layer {name} in the checkpoint is malformed ({e}); re-create it with `hawqtool quantize`") from e
    return pw


def _target(model: nn.Module, name: str, pw: PackedWeight) -> None:
    """Check that the model has a Linear called `name` of the packed weight's shape."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if (module.weight.shape[0], module.weight[0].numel()) != (pw.out_features, pw.in_features):
            raise UserError(f"checkpoint layer {name} is {pw.out_features}×{pw.in_features} but the model's conv is "
                            f"{list(module.weight.shape)}; re-create the checkpoint")
        return
    if not isinstance(module, nn.Linear):
        raise UserError(f"checkpoint layer {name!r} is not a Linear layer of the model its config.json describes; "
                        "re-create the checkpoint")
    if (module.out_features, module.in_features) != (pw.out_features, pw.in_features):
        raise UserError(f"checkpoint layer {name} is {pw.out_features}×{pw.in_features} but the model's is "
                        f"{module.out_features}×{module.in_features}; re-create the checkpoint")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _act_bits(meta: dict, name: str) -> int:
    act_bits = meta.get("act_bits", 16)
    if not isinstance(act_bits, int) or isinstance(act_bits, bool) or not (2 <= act_bits <= 8 or act_bits == 16):
        raise UserError(f"layer {name} in the checkpoint has act_bits {act_bits!r} (expected 2..8 or 16); "
                        "re-create it with `hawqtool quantize`")
    return act_bits


def _bias(tensors: dict[str, torch.Tensor], name: str, out_features: int) -> torch.Tensor | None:
    b = tensors.get(f"{name}.bias")
    if b is not None and (tuple(b.shape) != (out_features,) or not b.is_floating_point()):
        raise UserError(f"layer {name} in the checkpoint has a bias of shape {list(b.shape)} {b.dtype} "
                        f"(expected [{out_features}] float); re-create the checkpoint")
    return b


def _replace_activations(model: nn.Module, act_fn, where: Path) -> None:
    """APHQ's MLP reconstruction: the named GELUs become ReLUs clamped to [0, clip] (nn.Hardtanh)."""
    if not isinstance(act_fn, dict):
        raise UserError(f"{where} has a malformed 'act_fn' entry; re-create the checkpoint")
    for name, clip in act_fn.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or "gelu" not in type(module).__name__.lower():
            raise UserError(f"{where}: act_fn names {name!r}, which is not a GELU of the model; re-create the checkpoint")
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not 0 < clip < float("inf"):
            raise UserError(f"{where}: act_fn clamp of {name} is {clip!r} (expected a positive number); "
                            "re-create the checkpoint")
        _set_module(model, name, nn.Hardtanh(0.0, float(clip)))


def _hf_skeleton(path: Path, config, attn_implementation: str, meta: bool) -> nn.Module:
    """The transformers model config.json describes, random weights (on the meta device: no memory)."""
    from .models import model_class, model_task

    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return model_class(model_task(config)).from_config(config, dtype=torch.float32,
                                                               attn_implementation=attn_implementation)
    except Exception as e:  # noqa: BLE001 - any failure to build from config.json is a bad checkpoint
        raise UserError(f"{path}/config.json does not describe a loadable model ({type(e).__name__}); "
                        "re-create the checkpoint") from e


def _hf_config(path: Path, n_tensors: int):
    """config.json of the checkpoint, refused where it asks for more layers than the weights hold tensors
    (building such a model, even without memory, would take hours)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read config.json is a bad checkpoint
        raise UserError(f"{path}/config.json does not describe a loadable model ({type(e).__name__}); "
                        "re-create the checkpoint") from e
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > n_tensors:
        raise UserError(f"{path}/config.json asks for {layers} layers but the weights hold {n_tensors} tensors; "
                        "re-create the checkpoint")
    return config


def _vision_skeleton(path: Path, manifest: dict) -> nn.Module:
    """The timm architecture the manifest names (kwargs and preprocessing checked by vision.loading)."""
    from .vision.loading import vision_skeleton

    arch = manifest.get("timm_arch")
    if not isinstance(arch, str):
        raise UserError(f"{path / MANIFEST} names no timm architecture; re-create the checkpoint")
    kwargs, data = manifest.get("timm_kwargs"), manifest.get("timm_data")
    if not isinstance(kwargs, (dict, type(None))) or not isinstance(data, (dict, type(None))):
        raise UserError(f"{path / MANIFEST} has malformed timm_kwargs/timm_data; re-create the checkpoint")
    return vision_skeleton(arch, kwargs=kwargs, data=data)


def _check_fits(model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every manifest entry and tensor against the model (shapes, dtypes, layer kinds); `model` may live on
    the meta device, so this runs before anything of the checkpoint's size is allocated. Applies act_fn."""
    if "act_fn" in manifest:
        _replace_activations(model, manifest["act_fn"], path / MANIFEST)
    layers, tied = manifest["layers"], manifest.get("tied") or {}
    for name, meta in layers.items():
        pw = packed_from_tensors(tensors, name, meta)
        _target(model, name, pw)
        _bias(tensors, name, pw.out_features)
        _act_granularity(meta, name, model.get_submodule(name), _act_static(meta, name))
        _act_bits(meta, name)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in layers)}
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    missing = sorted(set(expected) - set(tied) - set(rest))
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} tensors (e.g. {missing[0]}); re-create it")
    for k, v in rest.items():
        if k in expected and (v.shape != expected[k].shape or v.is_floating_point() != expected[k].is_floating_point()):
            raise UserError(f"checkpoint tensor {k} is {list(v.shape)} {v.dtype}, the model expects "
                            f"{list(expected[k].shape)} {expected[k].dtype}; re-create the checkpoint")


def load_quantized(path: str | Path, *, verify: bool = True, attn_implementation: str = "eager") -> nn.Module:
    """Model from a hawqtool checkpoint, quantized layers as QuantLinear, in eval mode (transformers models
    with `attn_implementation`: eager by default, as evaluation and sensitivity use; bench runs sdpa).

    Everything read is validated before the model is allocated: the folder (exactly the listed files, no
    symlinks, each file's sha256 unless verify=False), manifest types, and every tensor's shape/dtype
    against the model config.json describes, built first on the meta device; any problem is a one-line
    UserError."""
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    verify_folder(path, manifest, hashes=verify)  # the folder's shape always; the sha256 unless verify=False
    tied = manifest.get("tied") or {}
    if not isinstance(tied, dict) or not all(isinstance(k, str) for k in tied):
        raise UserError(f"{path / MANIFEST} has a malformed 'tied' entry; re-create the checkpoint")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS} cannot be read ({str(e).splitlines()[0]}); re-create the checkpoint") from e
    if manifest.get("task") == "image-classification":
        model = _vision_skeleton(path, manifest)
        _check_fits(model, manifest, tensors, path)
    else:
        config = _hf_config(path, len(tensors))
        _check_fits(_hf_skeleton(path, config, attn_implementation, meta=True), manifest, tensors, path)
        model = _hf_skeleton(path, config, attn_implementation, meta=False)
        if "act_fn" in manifest:
            _replace_activations(model, manifest["act_fn"], path / MANIFEST)
    layers = manifest["layers"]
    for name, meta in layers.items():
        pw = packed_from_tensors(tensors, name, meta)
        target, bias, act = model.get_submodule(name), _bias(tensors, name, pw.out_features), _act_bits(meta, name)
        static = _act_static(meta, name)
        granularity = _act_granularity(meta, name, target, static)
        layer = (QuantConv2d(pw, target, bias, act, static, granularity) if isinstance(target, (nn.Conv1d, nn.Conv2d))
                 else QuantLinear(pw, bias, act_bits=act, act_static=static))
        _set_module(model, name, layer)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in layers)}
    model.load_state_dict(rest, strict=False)
    if tied:
        model.tie_weights()
    model.eval()
    return model
