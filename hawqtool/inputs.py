"""Model inputs for any task: calibration tensors and the batches every estimator and hook runs.

Text models take token windows under `input_ids`; vision models take image batches under `x`
(timm's forward argument).
"""
from __future__ import annotations

import torch

from .models import LoadedModel


def input_key(loaded: LoadedModel) -> str:
    """Keyword the model's forward takes its input under."""
    return "x" if loaded.task == "image-classification" else "input_ids"


def calibration_inputs(loaded: LoadedModel, calib: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[n, seqlen] token windows of `calib` text, or [n, C, H, W] images for a vision model."""
    if loaded.task == "image-classification":
        from .vision.loading import calibration_images

        return calibration_images(loaded.model, calib, n, seed)
    from .data import calibration_windows

    return calibration_windows(loaded.tokenizer, calib, n, seqlen, seed=seed)


def batches_of(loaded: LoadedModel, x: torch.Tensor, batch_size: int) -> list[dict]:
    """Split calibration inputs into model-keyword batches, on the model's device."""
    from .device import model_device, model_dtype

    key, dev = input_key(loaded), model_device(loaded.model)
    if x.is_floating_point():  # images take the model's dtype (a bf16 conv refuses fp32 inputs)
        x = x.to(model_dtype(loaded.model))
    return [{key: x[i:i + batch_size].to(dev)} for i in range(0, len(x), batch_size)]


def calibration_key(loaded: LoadedModel, calib: str, x: torch.Tensor, seed: int) -> str:
    """Fingerprint of the calibration data: the source text for text models, the image tensor itself for vision."""
    from .artifacts import fingerprint

    if loaded.task == "image-classification":
        import hashlib

        return fingerprint("images", hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest(), seed)
    from .data import data_fingerprint

    return fingerprint(data_fingerprint(calib), seed)
