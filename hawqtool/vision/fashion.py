"""Labelled Fashion-MNIST (train/test idx files, Debian `dataset-fashion-mnist`) for 28×28 models.

The train split is for training and calibration, the test split only for accuracy. Images are
uint8 [N, 28, 28] tensors, labels int64 [N]; `to_model_input` makes the float [N, 1, 28, 28]
batch a 1-channel model takes, normalised with its mean/std.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .images import fashion_mnist_file, read_idx_images

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)  # of the 60k train images, pixel values in [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}
INSTALL_HINT = "apt-get install dataset-fashion-mnist"


def fashion_mnist_dir() -> Path | None:
    """The folder holding the Fashion-MNIST idx files, if the dataset is installed."""
    path = fashion_mnist_file()
    return None if path is None else path.parent


def read_idx_labels(path: Path) -> np.ndarray:
    """int64 array [N] from an idx1 uint8 label file (gzipped or not), validated like the images."""
    raw = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
    if len(raw) < 8 or raw[:4] != b"\x00\x00\x08\x01":
        raise UserError(f"{str(path)!r} is not an idx1 uint8 label file: reinstall dataset-fashion-mnist")
    n = int.from_bytes(raw[4:8], "big")
    if len(raw) != 8 + n:
        raise UserError(f"{str(path)!r} is truncated ({len(raw)} bytes for {n} labels): reinstall it")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of the `train` or `test` split; UserError if absent."""
    if split not in _PREFIX:
        raise UserError(f"Fashion-MNIST split {split!r}: use 'train' or 'test'")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    prefix = _PREFIX[split]
    img_path = None if folder is None else folder / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = None if folder is None else folder / f"{prefix}-labels-idx1-ubyte.gz"
    if img_path is None or not img_path.is_file() or not lab_path.is_file():
        where = f" in {str(folder)!r}" if folder is not None else ""
        raise UserError(f"Fashion-MNIST {split} files not found{where}: {INSTALL_HINT}")
    images, labels = read_idx_images(img_path), read_idx_labels(lab_path)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise UserError(f"{img_path.name} holds {len(images)} images of {list(images.shape[1:])} but "
                        f"{lab_path.name} {len(labels)} labels: reinstall dataset-fashion-mnist")
    if labels.size and labels.max() >= len(CLASSES):
        raise UserError(f"{lab_path.name} has label {int(labels.max())} outside 0..9: reinstall it")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def to_model_input(images: torch.Tensor, mean=FASHION_MEAN, std=FASHION_STD,
                   size: int | None = None) -> torch.Tensor:
    """uint8 [N, H, W] -> normalised float [N, 1, H, W] (bilinear-resized to `size` if given)."""
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise UserError(f"expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
    if len(tuple(mean)) != 1 or len(tuple(std)) != 1:
        raise UserError(f"a 1-channel input needs one mean and one std, got mean {mean} and std {std}")
    x = images.float().div_(255.0)[:, None]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - float(tuple(mean)[0])) / float(tuple(std)[0])


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class [N] of `model` on the preprocessed `inputs`, in batches (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk).argmax(-1) for chunk in inputs.split(batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on preprocessed `inputs` [N, C, H, W] against `labels` [N]."""
    if len(inputs) != len(labels) or len(labels) == 0:
        raise UserError(f"accuracy needs as many labels as inputs (>0), got {len(labels)} and {len(inputs)}")
    return float((predict(model, inputs, batch_size).cpu() == labels.cpu()).double().mean())


def calibration_fashion(n: int, seed: int, mean, std, size: int = 28) -> torch.Tensor:
    """`n` Fashion-MNIST *train* images [n, 1, size, size] drawn without replacement with `seed`."""
    images, _ = fashion_mnist("train")
    if n > len(images):
        raise UserError(f"asked for {n} calibration images but Fashion-MNIST train has {len(images)}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return to_model_input(images[idx], mean, std, size).contiguous()
