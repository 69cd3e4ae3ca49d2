"""Calibration images that install offline: scikit-image's sample photos and Fashion-MNIST.

Photos are resized (shorter side to size / crop_pct, antialiased) and centre-cropped as timm
does for evaluation; grayscale ones are repeated to 3 channels. Fashion-MNIST test images
(Debian package `dataset-fashion-mnist`, idx gz files) are upsampled from 28×28 to `size`
and repeated to 3 channels. Everything is normalised with the given mean/std: pass the
model's `data_config(model)` values.
Calibration and evaluation never share an image: `part="eval"` takes the even-indexed photos and
Fashion-MNIST test images, `part="calib"` the odd-indexed ones (each then drawn with its own seed).
"""
from __future__ import annotations

import gzip
import os
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

log = logging.getLogger("hawqtool")

# sample photos bundled in the scikit-image wheel (no download); grayscale ones last
COLOR_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right",
                "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo")
GRAY_PHOTOS = ("camera", "coins", "moon", "text", "page", "clock", "brick", "grass", "gravel", "cell",
               "microaneurysms", "horse")
PHOTOS = COLOR_PHOTOS + GRAY_PHOTOS
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise UserError("scikit-image is not installed: pip install 'hawqtool[vision]'") from None
    return skimage.data


def _photo_array(name: str) -> np.ndarray:
    data = _skimage_data()
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    if name not in PHOTOS:
        raise UserError(f"unknown sample photo {name!r}: choose one of {', '.join(PHOTOS)}")
    return getattr(data, name)()


def _to_chw(img: np.ndarray) -> torch.Tensor:
    """uint8/bool/float HxW or HxWxC (gray, RGB, RGBA over white) -> float [3, H, W] in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(img)).float()
    if img.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] == 4:  # composite RGBA over white
        x = x[..., :3] * x[..., 3:] + (1.0 - x[..., 3:])
    return x.permute(2, 0, 1).expand(3, -1, -1)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def photo(name: str, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875,
          interpolation: str = "bicubic") -> torch.Tensor:
    """One sample photo as a normalised float tensor [3, size, size]."""
    x = _to_chw(_photo_array(name))[None]
    h, w = x.shape[-2:]
    scale = size / crop_pct / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
    x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return _normalise(x[0, :, top:top + size, left:left + size], mean, std)


def fashion_mnist_file() -> Path | None:
    """The Fashion-MNIST test-images idx file, if installed (dpkg -L dataset-fashion-mnist).
    HAWQTOOL_FASHION_MNIST overrides the search: a t10k-images idx3 file, or a folder holding
    `t10k-images-idx3-ubyte.gz` (a folder without it hides an installed copy)."""
    override = os.environ.get("HAWQTOOL_FASHION_MNIST")
    if override:
        p = Path(override)
        if p.is_dir():
            p = p / "t10k-images-idx3-ubyte.gz"
        return p if p.is_file() else None
    dirs = list(FASHION_DIRS)
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                 text=True, timeout=20).stdout
            dirs += [Path(p).parent for p in out.splitlines() if p.endswith("t10k-images-idx3-ubyte.gz")]
        except (OSError, subprocess.SubprocessError):
            pass
    return next((d / "t10k-images-idx3-ubyte.gz" for d in dirs
                 if (d / "t10k-images-idx3-ubyte.gz").is_file()), None)


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 array [N, H, W] from an idx3 file (gzipped or not)."""
    raw = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise UserError(f"{str(path)!r} is not an idx3 uint8 image file: reinstall dataset-fashion-mnist")
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise UserError(f"{str(path)!r} is truncated ({len(raw)} bytes for {n}×{h}×{w}): reinstall it")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


PARTS = {"eval": 0, "calib": 1}  # which parity of photo and Fashion-MNIST index each part owns


def sample_images(size: int, n_fashion: int = 2000, seed: int = 0, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, crop_pct: float = 0.875, interpolation: str = "bicubic",
                  fashion_file: str | Path | None = None, *, part: str) -> torch.Tensor:
    """Float batch [N, 3, size, size]: the part's sample photos (PHOTOS order, every other one) then `n_fashion`
    Fashion-MNIST test images of the part's half drawn without replacement with `seed`. Fashion-MNIST missing:
    photos only, with a warning. Memory is N·3·size²·4 bytes (2000 at 224: 1.2 GB)."""
    if size < 8:
        raise UserError(f"image size {size} is too small: use at least 8 (e.g. the model's 224)")
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    photos = []
    for name in PHOTOS[PARTS[part]::2]:
        try:
            photos.append(photo(name, size, mean, std, crop_pct, interpolation))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a photo skimage cannot load here (optional deps)
            log.warning("skipping sample photo %s: %s", name, e)
    batches = [torch.stack(photos)] if photos else []
    if n_fashion > 0:
        path = Path(fashion_file) if fashion_file is not None else fashion_mnist_file()
        if path is None or not path.is_file():
            log.warning("Fashion-MNIST not found (apt-get install dataset-fashion-mnist): "
                        "using the %d sample photos only", len(photos))
        else:
            imgs = read_idx_images(path)[PARTS[part]::2]
            idx = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(seed))[:n_fashion]
            for chunk in idx.split(256):
                x = torch.from_numpy(imgs[chunk.numpy()]).float().div_(255.0)[:, None]
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                batches.append(_normalise(x.expand(-1, 3, -1, -1), mean, std))
    if not batches:
        raise UserError("no calibration images could be loaded: pip install 'hawqtool[vision]'")
    return torch.cat(batches)


def check_images(x: torch.Tensor, model_cfg: dict) -> None:
    """Raise UserError unless `x` is [N, C, H, W] matching model_cfg['input_size'] (C, H, W)."""
    c, h, w = tuple(model_cfg["input_size"])
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = f"{x.ndim}-D tensor {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"images must be a 4-D batch [N, {c}, {h}, {w}], got {got}: add a batch dimension")
    if x.shape[1] != c:
        raise UserError(f"images need {c} channels, got {x.shape[1]} (shape {list(x.shape)}): "
                        "repeat grayscale to 3 channels or use channels-first [N, C, H, W]")
    if tuple(x.shape[2:]) != (h, w):
        raise UserError(f"images must be {h}×{w}, got {x.shape[2]}×{x.shape[3]}: resize them to "
                        "the model's input size")
