"""Stage 5 (run): read a checkpoint folder into a model whose layers stay packed (runtime.py's modules).

Everything read is validated before the model is allocated (folder shape, sha256, manifest types, every
tensor against the model config.json describes, built first on the meta device); any problem is a
one-line UserError. Weights are read with safetensors only (no unpickling). A quantized input embedding
(manifest "embedding") becomes a QuantEmbedding, and a head tied to it a QuantLinear on the same codes.
A layer in a ggml block type (manifest "ggml_type") has no kernel here: it is loaded as an nn.Linear holding its
exactly dequantized weight (llama.cpp runs those bytes natively after `export --format gguf`).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quant_kernels import PackedWeight

from .checkpoint import MANIFEST, WEIGHTS, read_manifest, verify_folder
from .errors import UserError
from .runtime import QuantConv2d, QuantEmbedding, QuantLinear, conv_act_granularity

def _meta_int(meta: dict, key: str, name: str) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(f"layer {name} in the checkpoint has {key}={v!r} (expected an integer); "
                        "re-create it with `hawqtool quantize`")
    return v


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


def packed_from_tensors(t: dict[str, torch.Tensor], name: str, meta: dict) -> PackedWeight:
    """The layer's PackedWeight from the checkpoint tensors and its manifest entry, fully validated."""
    if not isinstance(meta, dict):
        raise UserError(f"layer {name!r} in the checkpoint manifest is not an object; re-create the checkpoint")
    if not isinstance(meta.get("symmetric"), bool):
        raise UserError(f"layer {name} in the checkpoint has symmetric={meta.get('symmetric')!r} (expected true/false);"
                        " re-create it with `hawqtool quantize`")
    coded = "scale_bits" in meta
    if any(k not in t for k in (f"{name}.qweight", f"{name}.qscales" if coded else f"{name}.scales")):
        raise UserError(f"layer {name} in the checkpoint has no packed weight tensors; re-create the checkpoint")
    try:
        scales = packed_scales(t, name, meta)
        pw = PackedWeight(qweight=t[f"{name}.qweight"], scales=scales, qzeros=t.get(f"{name}.qzeros"),
                          bits=_meta_int(meta, "bits", name), group_size=_meta_int(meta, "group_size", name),
                          in_features=_meta_int(meta, "in_features", name),
                          out_features=_meta_int(meta, "out_features", name),
                          symmetric=meta["symmetric"], g_idx=t.get(f"{name}.g_idx"))
        pw.validate()
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"layer {name} in the checkpoint is malformed ({e}); re-create it with `hawqtool quantize`") from e
    return pw


def packed_scales(t: dict[str, torch.Tensor], name: str, meta: dict) -> torch.Tensor:
    """The layer's fp16 scales: NAME.scales, or formed from scale codes (NAME.qscales, NAME.scale_step; meta tensors
    give a meta tensor of their shape); ValueError if malformed."""
    from .quantize.scale_codes import stored_scales

    if "scale_bits" not in meta:
        return t[f"{name}.scales"]
    k, out_f, gs, in_f = (_meta_int(meta, key, name) for key in ("scale_bits", "out_features", "group_size", "in_features"))
    return stored_scales(t[f"{name}.qscales"], t.get(f"{name}.scale_step"), k, out_f, math.ceil(in_f / gs) if gs > 0 else 0)


def ggml_from_tensors(t: dict[str, torch.Tensor], name: str, meta: dict):
    """The QuantizedWeight of a ggml layer from its NAME.ggml bytes and manifest entry, fully validated."""
    from .quantize.quantizer import QuantSpec, ggml_from_bytes

    raw = t.get(f"{name}.ggml")
    try:
        spec = QuantSpec.for_ggml(str(meta.get("ggml_type")))
        if raw is None:
            raise ValueError(f"no tensor {name}.ggml")
        return ggml_from_bytes(raw, spec, _meta_int(meta, "in_features", name))
    except ValueError as e:
        raise UserError(f"layer {name} in the checkpoint is malformed ({e}); re-create it with `hawqtool quantize`") from e


def _layer_shape(t: dict[str, torch.Tensor], name: str, meta: dict):
    """PackedWeight of a packed layer, or the QuantizedWeight of a ggml one (both checked); `.out_features`
    and `.in_features` are what _target needs."""
    if isinstance(meta, dict) and "ggml_type" in meta:
        qw = ggml_from_tensors(t, name, meta)
        out_f, in_f = qw.q.shape
        return SimpleNamespace(out_features=out_f, in_features=in_f, qw=qw)
    return packed_from_tensors(t, name, meta)


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


def _hf_skeleton(path: Path, config, attn_implementation: str, meta: bool | str) -> nn.Module:
    """The transformers model config.json describes, without memory: everything on the meta device (`meta`
    True: to check shapes), or (`meta="params"`) only its parameters, buffers computed at construction (rotary
    frequencies) real, to be filled by load_state_dict(assign=True)."""
    from accelerate import init_empty_weights

    from .models import model_class, model_task

    place = init_empty_weights(include_buffers=False) if meta == "params" else torch.device("meta")
    try:
        with place:
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
    emb = _embedding_entry(manifest, path)
    if emb is not None:
        _check_embedding(model, emb, tensors)
    for name, meta in layers.items():
        pw = _layer_shape(tensors, name, meta)
        _target(model, name, pw)
        _bias(tensors, name, pw.out_features)
        _act_granularity(meta, name, model.get_submodule(name), _act_static(meta, name))
        _act_bits(meta, name)
    owners = _packed_owners(layers, emb)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in owners)}
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in owners)}
    missing = sorted(set(expected) - set(tied) - set(rest))
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} tensors (e.g. {missing[0]}); re-create it")
    for k, v in rest.items():
        if k in expected and (v.shape != expected[k].shape or v.is_floating_point() != expected[k].is_floating_point()):
            raise UserError(f"checkpoint tensor {k} is {list(v.shape)} {v.dtype}, the model expects "
                            f"{list(expected[k].shape)} {expected[k].dtype}; re-create the checkpoint")


def _embedding_entry(manifest: dict, path: Path) -> dict | None:
    """The manifest's quantized-embedding entry (None when the embedding is stored as it was), its names checked;
    its numbers are checked by packed_from_tensors."""
    emb = manifest.get("embedding")
    if emb is None:
        return None
    if (not isinstance(emb, dict) or not isinstance(emb.get("name"), str) or not emb["name"]
            or not (emb.get("tied_head") is None or isinstance(emb["tied_head"], str) and emb["tied_head"])):
        raise UserError(f"{path / MANIFEST} has a malformed 'embedding' entry; re-create the checkpoint")
    if manifest.get("tied"):
        raise UserError(f"{path / MANIFEST} lists tied tensors beside a quantized embedding, which hawqtool never "
                        "writes; re-create the checkpoint")
    return emb


def _packed_owners(layers: dict, emb: dict | None) -> list[str]:
    """Modules whose tensors the checkpoint stores packed: the layers, and a quantized embedding with its tied head."""
    return [*layers, *([emb["name"]] + ([emb["tied_head"]] if emb["tied_head"] else []) if emb else [])]


def _check_embedding(model: nn.Module, emb: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The packed table fits the model's nn.Embedding of that name, and a tied head is a Linear of its shape."""
    name, head = emb["name"], emb["tied_head"]
    pw = packed_from_tensors(tensors, name, emb)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if type(module) is not nn.Embedding or tuple(module.weight.shape) != (pw.out_features, pw.in_features):
        raise UserError(f"checkpoint embedding {name} is {pw.out_features}×{pw.in_features}, which is not an "
                        "nn.Embedding of that shape in the model config.json describes; re-create the checkpoint")
    if head is not None:
        try:
            h = model.get_submodule(head)
        except AttributeError:
            h = None
        if not isinstance(h, nn.Linear) or (h.out_features, h.in_features) != (pw.out_features, pw.in_features):
            raise UserError(f"checkpoint embedding {name} names tied head {head!r}, which is not a "
                            f"{pw.out_features}×{pw.in_features} Linear of the model; re-create the checkpoint")
        _bias(tensors, head, pw.out_features)


def load_quantized(path: str | Path, *, verify: bool = True, attn_implementation: str = "eager",
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   offload: bool = False) -> nn.Module:
    """Model from a hawqtool checkpoint, quantized layers as QuantLinear (a quantized embedding as QuantEmbedding,
    its tied head as a QuantLinear on the same codes), in eval mode (transformers models
    with `attn_implementation`: eager by default, as evaluation and sensitivity use; bench runs sdpa).

    Everything read is validated before the model is allocated: the folder (exactly the listed files, no
    symlinks, each file's sha256 unless verify=False), manifest types, and every tensor's shape/dtype
    against the model config.json describes, built first on the meta device; any problem is a one-line
    UserError. `offload`: the repeated blocks' packed tensors are read only while each block runs, and checked
    then (checkpoint_stream.py; only code that walks the blocks, such as evaluation, runs such a model)."""
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    verify_folder(path, manifest, hashes=verify)  # the folder's shape always; the sha256 unless verify=False
    tied = manifest.get("tied") or {}
    if not isinstance(tied, dict) or not all(isinstance(k, str) for k in tied):
        raise UserError(f"{path / MANIFEST} has a malformed 'tied' entry; re-create the checkpoint")
    if offload:  # built from the file's header; each block's tensors are read (and checked) when it runs
        from .checkpoint_stream import attach_streamer, check_streamable, header_tensors

        check_streamable(path, manifest)
        model, emb = _packed_model(path, manifest, header_tensors(path / WEIGHTS), attn_implementation)
        if dtype is not None and dtype != torch.float32:  # as a whole load's model.to(dtype): buffers made at
            model.to(dtype=dtype)  # construction (rotary frequencies) too; packed scales stay fp16 (runtime._Packed)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return attach_streamer(model, emb, path, manifest, dev, dtype or torch.float32)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS} cannot be read ({str(e).splitlines()[0]}); re-create the checkpoint") from e
    model, emb = _packed_model(path, manifest, tensors, attn_implementation)
    owners = _packed_owners(manifest["layers"], emb)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in owners)}
    own = model.state_dict()
    rest = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in rest.items()}
    model.load_state_dict(rest, strict=False, assign=True)  # meta parameters take the file's tensors (no copy)
    if tied:
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise UserError(f"{path / WEIGHTS} lacks {empty[0]} (and {len(empty) - 1} more tensors) that config.json "
                        "describes; re-create the checkpoint")
    model.eval()
    if dtype is not None and dtype != torch.float32:  # the float parts; packed scales stay fp16 (runtime._Packed)
        model.to(dtype=dtype)
        for m in model.modules():
            if isinstance(m, QuantEmbedding):
                m.dtype = dtype
    if device is not None:
        model.to(device)
        share_tied_codes(model, emb)  # Module.to moved the embedding's and the head's buffers one module at a time
    return model


def share_tied_codes(model: nn.Module, emb: dict | None) -> None:
    """A quantized embedding's tied head re-pointed at the embedding's packed codes, scales and zeros (the file
    stores them once, under the embedding's name), so memory holds one copy after a move or a streamed read."""
    if emb is not None and emb["tied_head"] is not None:
        table, head = model.get_submodule(emb["name"]), model.get_submodule(emb["tied_head"])
        head.qweight, head.scales, head.qzeros = table.qweight, table.scales, table.qzeros
        head.rebind()


def _packed_model(path: Path, manifest: dict, tensors: dict[str, torch.Tensor],
                  attn_implementation: str) -> tuple[nn.Module, dict | None]:
    """The checkpoint's model, checked against `tensors` (real, or meta ones of the stored shapes), with its packed
    layers (and embedding) in place as runtime modules on those tensors; its other parameters still on the meta
    device. Returns it and the manifest's embedding entry."""
    if manifest.get("task") == "image-classification":
        model = _vision_skeleton(path, manifest)
        _check_fits(model, manifest, tensors, path)
    else:
        config = _hf_config(path, len(tensors))
        _check_fits(_hf_skeleton(path, config, attn_implementation, meta=True), manifest, tensors, path)
        model = _hf_skeleton(path, config, attn_implementation, meta="params")  # filled from the file below
        if "act_fn" in manifest:
            _replace_activations(model, manifest["act_fn"], path / MANIFEST)
    for name, meta in manifest["layers"].items():
        if "ggml_type" in meta:
            target = model.get_submodule(name)
            if not isinstance(target, nn.Linear):
                raise UserError(f"checkpoint layer {name} is in {meta['ggml_type']}, which is for Linear layers only; "
                                "re-create the checkpoint")
            target.weight = nn.Parameter(ggml_from_tensors(tensors, name, meta).dequantize().float(),
                                         requires_grad=False)  # the skeleton's own is on the meta device
            bias = _bias(tensors, name, target.out_features)
            if (bias is None) != (target.bias is None):
                raise UserError(f"checkpoint layer {name} {'lacks the bias' if bias is None else 'has a bias'} "
                                "the model's Linear has not; re-create the checkpoint")
            if bias is not None:
                target.bias = nn.Parameter(bias.float(), requires_grad=False)
            continue
        pw = packed_from_tensors(tensors, name, meta)
        target, bias, act = model.get_submodule(name), _bias(tensors, name, pw.out_features), _act_bits(meta, name)
        static = _act_static(meta, name)
        granularity = _act_granularity(meta, name, target, static)
        layer = (QuantConv2d(pw, target, bias, act, static, granularity) if isinstance(target, (nn.Conv1d, nn.Conv2d))
                 else QuantLinear(pw, bias, act_bits=act, act_static=static))
        _set_module(model, name, layer)
    emb = _embedding_entry(manifest, path)
    if emb is not None:
        pw = packed_from_tensors(tensors, emb["name"], emb)
        _set_module(model, emb["name"], QuantEmbedding(pw, model.get_submodule(emb["name"]).weight.dtype))
        if emb["tied_head"] is not None:  # the same packed codes: one copy serves the lookup and the logits
            _set_module(model, emb["tied_head"], QuantLinear(pw, _bias(tensors, emb["tied_head"], pw.out_features)))
    return model, emb
