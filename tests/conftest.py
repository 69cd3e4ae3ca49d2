"""Shared fixtures: a tiny Llama built from a config with its own small tokenizer, and text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import hawqtool  # noqa: F401 - first, so a CUDA-built torchvision (vision extra) cannot break transformers imports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy neighbour

# The longest test files (about 5 minutes each on 2 cores, `--durations`): started first, so that under `make test`'s
# two workers (--dist loadfile) neither is left running alone at the end while the other worker idles.
LONGEST_FIRST = ("test_quality_tuning.py", "test_quality_smollm2.py", "test_vision_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its order


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """~150k characters of real English text from the built-in corpus."""
    from hawqtool.data import builtin_wiki_text

    return builtin_wiki_text()[:150_000]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, corpus_text) -> Path:
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(corpus_text, encoding="utf-8")
    return p


def make_tiny_llama(folder: Path, corpus: str, *, vocab: int = 320, hidden: int = 32, layers: int = 2,
                    seed: int = 0, bias: bool = False) -> Path:
    """Save a randomly initialised tiny Llama + a byte-level BPE tokenizer trained on `corpus` (bias: every
    projection has one, as Qwen2's q/k/v do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([corpus[i:i + 2000] for i in range(0, len(corpus), 2000)],
                           trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg)
    if bias:  # non-zero, so a bias lost on the way would show
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, corpus_text) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), corpus_text)


def write_idx3_gz(path: Path, images) -> Path:
    """Write uint8 images [N, H, W] as a gzipped idx3 file (the Fashion-MNIST file format)."""
    import gzip

    import numpy as np

    a = np.ascontiguousarray(images, dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(int(x).to_bytes(4, "big") for x in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + a.tobytes())
    return path


def photo_crops(n: int, seed: int):
    """`n` 28×28 uint8 crops of four of scikit-image's sample photos (112×112 regions, area-downsampled),
    cycling through the photos, and each crop's label: the index of its photo (a learnable 4-class task)."""
    import numpy as np
    import skimage.data
    import torch.nn.functional as F

    photos = [skimage.data.camera(), skimage.data.coins(), skimage.data.moon(), skimage.data.page()]
    g = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        p = photos[i % len(photos)].astype(np.float32)
        y, x = g.integers(0, p.shape[0] - 112), g.integers(0, p.shape[1] - 112)
        t = torch.from_numpy(p[y:y + 112, x:x + 112])[None, None]
        crops.append(F.interpolate(t, size=(28, 28), mode="area")[0, 0].round().clamp(0, 255).numpy())
    return np.stack(crops), np.arange(n) % len(photos)


def write_idx1_gz(path: Path, labels) -> Path:
    """Write uint8 labels [N] as a gzipped idx1 file (the Fashion-MNIST label format)."""
    import gzip

    import numpy as np

    a = np.ascontiguousarray(labels, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + len(a).to_bytes(4, "big") + a.tobytes())
    return path


@pytest.fixture
def own_fashion_file(tmp_path_factory, monkeypatch) -> Path:
    """A Fashion-MNIST-format data set made here from scikit-image's sample photos (a test dependency, so
    what the README's set-up installs): train (512) and t10k (256) 28×28 images with labels, in the four
    idx files of the real data set. HAWQTOOL_FASHION_MNIST points at its t10k images file (the train split
    is found beside it), in place of any installed copy: no test depends on, or skips without, the Debian
    package dataset-fashion-mnist. Returns the t10k images file."""
    folder = tmp_path_factory.mktemp("fashion")
    for prefix, n, seed in (("t10k", 256, 0), ("train", 512, 1)):
        images, labels = photo_crops(n, seed)
        write_idx3_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx1_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    path = folder / "t10k-images-idx3-ubyte.gz"
    monkeypatch.setenv("HAWQTOOL_FASHION_MNIST", str(path))
    return path


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M, 16×512 calibration tokens, 4×512 validation-slice tokens, its weights to restore,
    and a cache of results the module's tests share (tests/quality_helpers.py)."""
    import copy

    from hawqtool.data import VALID_FRACTION, calibration_windows, eval_windows
    from hawqtool.models import load_model

    # real model: both cores (conftest sets one for the tiny ones), unless a second pytest worker has the other
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    loaded = load_model(None)
    calib = calibration_windows(loaded.tokenizer, "wiki", 16, 512, seed=0)
    windows = eval_windows(loaded.tokenizer, "wiki", 512, 4, fraction=VALID_FRACTION)
    state = copy.deepcopy(loaded.model.state_dict())
    yield loaded, calib, windows, state, {}
    torch.set_num_threads(1)
