"""A timm model as the pipeline's LoadedModel (BatchNorm folded), and its calibration images.

MODEL references: `efficientnet-lite0` or `timm:efficientnet-lite0` (the embedded default vision
model) and `timm:NAME:WEIGHTS` (a timm architecture and a local weights file; a `.safetensors` file's
`timm_kwargs`/`mean`/`std`/`input_size` metadata shape and preprocess the model, see timm_models).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger("hawqtool")
DEFAULT_VISION = "efficientnet-lite0"
TASK = "image-classification"


def is_vision_ref(ref: str | None) -> bool:
    """True for references `load_vision` handles."""
    return ref is not None and (str(ref).startswith("timm:") or str(ref) == DEFAULT_VISION)  # paths are not


def load_vision(ref: str):
    """LoadedModel of a timm classifier, fp32, eval, BatchNorm folded into the convolutions."""
    from ..models import LoadedModel
    from .fold import fold_batchnorm
    from .timm_models import default_vision_model, lite0_weights_file, load_timm

    spec = ref[len("timm:"):] if ref.startswith("timm:") else ref
    if spec == DEFAULT_VISION:
        model, files = default_vision_model(), [lite0_weights_file()]
    else:
        name, sep, weights = spec.partition(":")
        if not sep or not weights:
            raise UserError(f"{ref}: give the weights too, as timm:{name or 'NAME'}:/path/to/weights.safetensors "
                            "(hawqtool never downloads or quantizes random weights)")
        model, files = load_timm(name, weights), [Path(weights).expanduser()]
    folded = fold_batchnorm(model)
    log.info("folded %d BatchNorm layers into their convolutions", folded)
    return LoadedModel(model=model, tokenizer=None, source=ref, files=files, task=TASK)


def calibration_images(model: torch.nn.Module, calib: str, n: int, seed: int = 0) -> torch.Tensor:
    """`n` preprocessed images [n, C, H, W] for the model: the calibration half of the sample photos and of the
    Fashion-MNIST test images for RGB models (the other half is the evaluation set); Fashion-MNIST *train*
    images only for 1-channel ones (test is for accuracy)."""
    from .images import sample_images
    from .timm_models import data_config

    if calib not in ("images", "wiki"):
        raise UserError(f"--calib {calib!r}: vision models calibrate on the built-in image set; use --calib images")
    if n < 1:
        raise UserError(f"need at least one calibration image, got {n}")
    cfg = data_config(model)
    chans, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
    if chans == 1:
        from .fashion import calibration_fashion

        return calibration_fashion(n, seed, cfg["mean"], cfg["std"], size)
    imgs = sample_images(size, n_fashion=max(0, n), seed=seed, part="calib", mean=cfg["mean"], std=cfg["std"],
                         crop_pct=float(cfg.get("crop_pct", 0.875)), interpolation=str(cfg.get("interpolation", "bicubic")))
    order = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(seed))[:n]
    return imgs[order].contiguous()


def vision_manifest(loaded) -> dict:
    """What a checkpoint needs to rebuild a timm model without its source: task, architecture and,
    for models created with kwargs or file mean/std, `timm_kwargs` and `timm_data`."""
    from .timm_models import creation_record

    arch = (getattr(loaded.model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise UserError(f"cannot tell the timm architecture of {loaded.source}; load it as timm:NAME:WEIGHTS")
    return {"task": TASK, "timm_arch": arch, **creation_record(loaded.model)}


def vision_skeleton(arch: str, kwargs: dict | None = None, data: dict | None = None) -> torch.nn.Module:
    """The timm architecture (created with `kwargs`, preprocessing `data` = mean/std/input_size, both as
    recorded by vision_manifest) with BatchNorm already folded away (random weights to be overwritten)."""
    from .fold import fold_batchnorm
    from .timm_models import load_timm

    model = load_timm(arch, kwargs=kwargs, data=data)
    fold_batchnorm(model)
    return model
