"""Fashion-MNIST labels/accuracy, timm models created from file kwargs, and the ViT training script."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import hawqtool  # noqa: F401 - declares torchvision's op schemas before timm imports it
import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hawqtool.errors import UserError  # noqa: E402
from hawqtool.vision import fashion  # noqa: E402
from hawqtool.vision.loading import calibration_images, load_vision, vision_manifest, vision_skeleton  # noqa: E402
from hawqtool.vision.timm_models import data_config, load_timm  # noqa: E402

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1,
        "num_heads": 2}
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_vit_fmnist.py"


def _user_error(fn, *args, match: str, **kwargs) -> str:
    """Call fn, expect a one-line UserError matching `match`, return its message."""
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def _write_gz(path: Path, data: bytes) -> Path:
    """Write `data` gzipped to `path`."""
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def _idx1(labels: list[int], magic: bytes = b"\x00\x00\x08\x01", n: int | None = None) -> bytes:
    """An idx1 label file's bytes (header count `n` defaults to len(labels))."""
    return magic + (len(labels) if n is None else n).to_bytes(4, "big") + bytes(labels)


def _idx3(images: torch.Tensor) -> bytes:
    """An idx3 uint8 image file's bytes for [N, H, W]."""
    n, h, w = images.shape
    return b"\x00\x00\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, h, w)) + images.numpy().tobytes()


def test_label_reader_validates_magic_and_length(tmp_path):
    good = _write_gz(tmp_path / "good-labels-idx1-ubyte.gz", _idx1([3, 0, 9, 1]))
    labels = fashion.read_idx_labels(good)
    assert labels.dtype.name == "int64" and labels.tolist() == [3, 0, 9, 1]
    plain = tmp_path / "plain-idx1-ubyte"
    plain.write_bytes(_idx1([7, 2]))
    assert fashion.read_idx_labels(plain).tolist() == [7, 2]
    bad = _write_gz(tmp_path / "bad.gz", _idx1([1, 2], magic=b"\x00\x00\x08\x03"))
    _user_error(fashion.read_idx_labels, bad, match="not an idx1")
    _user_error(fashion.read_idx_labels, _write_gz(tmp_path / "short.gz", b"\x00\x00"), match="not an idx1")
    cut = _write_gz(tmp_path / "cut.gz", _idx1([1, 2, 3], n=5))
    _user_error(fashion.read_idx_labels, cut, match="truncated")


def test_split_reader_pairs_images_with_labels(tmp_path):
    imgs = torch.arange(3 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 28, 28)
    _write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", _idx3(imgs))
    _write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx1([4, 5, 6]))
    x, y = fashion.fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and torch.equal(x, imgs) and y.dtype == torch.int64 and y.tolist() == [4, 5, 6]
    _write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx1([4, 5]))
    _user_error(fashion.fashion_mnist, "test", root=tmp_path, match="2 labels")
    msg = _user_error(fashion.fashion_mnist, "train", root=tmp_path, match="not found")
    assert "apt-get install dataset-fashion-mnist" in msg
    _user_error(fashion.fashion_mnist, "val", root=tmp_path, match="'train' or 'test'")
    x01 = fashion.to_model_input(imgs, (0.5,), (0.25,))
    assert x01.shape == (3, 1, 28, 28) and torch.allclose(x01, (imgs.float()[:, None] / 255 - 0.5) / 0.25)


def test_accuracy_matches_hand_count():
    class FirstThree(torch.nn.Module):
        """Logits = the first three input values, so the predicted class is their arg-max."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :3]

    x = torch.zeros(5, 1, 2, 2)
    for i, cls in enumerate([0, 1, 2, 2, 1]):  # predictions
        x.view(5, -1)[i, cls] = 1.0
    labels = torch.tensor([0, 1, 1, 2, 0])  # right, right, wrong, right, wrong
    assert fashion.accuracy(FirstThree(), x, labels, batch_size=2) == pytest.approx(3 / 5)
    _user_error(fashion.accuracy, FirstThree(), x, labels[:4], match="as many labels")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A random tiny 1×28×28 ViT saved with creation metadata like the training script writes."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, **TINY).eval()
    path = tmp_path_factory.mktemp("vit") / "tiny.safetensors"
    meta = {"timm_arch": ARCH, "timm_kwargs": json.dumps(TINY), "mean": "[0.286]", "std": "[0.353]",
            "input_size": "[1, 28, 28]", "test_accuracy": "0.1"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return model, path


def test_kwargs_from_file_metadata_rebuild_the_model(tiny_vit):
    model, path = tiny_vit
    loaded = load_vision(f"timm:{ARCH}:{path}")
    cfg = data_config(loaded.model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.286,) and cfg["std"] == (0.353,)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    manifest = vision_manifest(loaded)
    assert manifest["timm_arch"] == ARCH and manifest["timm_kwargs"] == TINY
    assert manifest["timm_data"] == {"mean": [0.286], "std": [0.353], "input_size": [1, 28, 28]}
    manifest = json.loads(json.dumps(manifest))  # as read back from a checkpoint
    skel = vision_skeleton(manifest["timm_arch"], manifest["timm_kwargs"], manifest["timm_data"])
    assert {k: v.shape for k, v in skel.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert data_config(skel)["mean"] == (0.286,)
    assert timm.create_model(ARCH, pretrained=False).pretrained_cfg["input_size"] == (3, 224, 224)  # registry untouched
    assert "timm_kwargs" not in vision_manifest(type(loaded)(model=load_timm("resnet18"), tokenizer=None, source="r",
                                                             files=[], task=loaded.task))


def test_malformed_kwargs_fail_in_one_line(tiny_vit, tmp_path):
    model, _ = tiny_vit
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = {"{not json": "not valid JSON", "[1, 2]": "not an object", '{"img_size": {"a": 1}}': "not a simple value",
             '{"pretrained": true}': "not an architecture setting", '{"no_such_arg": 3}': "rejects timm_kwargs"}
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(sd, str(path), metadata={"timm_kwargs": text})
        _user_error(load_vision, f"timm:{ARCH}:{path}", match=match)
    path = tmp_path / "mean.safetensors"
    save_file(sd, str(path), metadata={"timm_kwargs": json.dumps(TINY), "mean": "[0.1, 0.2, 0.3]"})
    _user_error(load_timm, ARCH, path, match="mean must be a list of 1 numbers")
    _user_error(load_timm, "deit_tiny_patch16_224", tiny_vit[1], match="saved from timm model")
    _user_error(vision_skeleton, ARCH, {"embed_dim": [[1]]}, match="not a simple value")
    assert vision_skeleton("resnet18").fc.out_features == 1000  # the old call still works


def test_calibration_of_a_one_channel_model_draws_train_images(tiny_vit, own_fashion_file):
    """A 1-channel 28×28 model calibrates on the train split (found beside the t10k file the override names)."""
    _, path = tiny_vit
    model = load_vision(f"timm:{ARCH}:{path}").model
    x = calibration_images(model, "images", 6, seed=3)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    train, _ = fashion.fashion_mnist("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:6]
    assert torch.equal(x, fashion.to_model_input(train[idx], (0.286,), (0.353,)))
    assert not torch.equal(x, calibration_images(model, "images", 6, seed=4))


def test_training_script_smoke(tmp_path, capsys, own_fashion_file):
    """The training script runs end to end on the Fashion-MNIST-format set made here (no Debian package)."""
    spec = importlib.util.spec_from_file_location("train_vit_fmnist", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "vit.safetensors"
    args = ["--steps", "3", "--limit", "256", "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["timm_kwargs"]) == script.KW and meta["timm_arch"] == ARCH
    assert 0.0 <= float(meta["test_accuracy"]) <= 1.0 and meta["test_images"] == "256"
    loaded = load_vision(f"timm:{ARCH}:{out}").model
    assert data_config(loaded)["input_size"] == (1, 28, 28)
    assert not list(tmp_path.glob("*tmp"))  # written atomically, nothing left behind
    assert script.main(args) == 0 and "cached" in capsys.readouterr().out
