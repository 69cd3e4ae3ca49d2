"""Stage 5 as library calls: evaluate a model reference or a checkpoint folder (perplexity, embedding cosine,
image agreement) on the pinned protocols; the CLI's `eval` and `run` call these."""
from __future__ import annotations

from dataclasses import asdict

import torch

from .device import model_device
from .errors import UserError
from .hooks import Hooks, Silent
from .options import EvalOptions


def evaluate_any(ref: str | None, opts: EvalOptions | None = None, rep: Hooks | None = None, *,
                 trust_remote_code: bool = False, reference: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32, offload: bool = False,
                 max_memory: int | None = None) -> dict:
    """Evaluate a model reference or a hawqtool checkpoint folder with `opts` (EvalOptions: data, seqlen, windows,
    batch size), as a dict: perplexity for causal LMs; for encoders, embedding cosine against `reference` (default:
    the checkpoint's source model). `sizes`: bits per linear weight and whole-file bits per parameter (sizes.py)."""
    from .sizes import checkpoint_sizes, model_sizes

    rep = rep or Silent()
    opts = opts or EvalOptions()

    from .checkpoint import is_checkpoint, read_manifest
    from .data import eval_windows, with_special_tokens
    from .evaluate import embedding_fidelity, perplexity
    from .models import load_model, model_task
    from .streaming import streamer_of

    source = ref
    manifest = read_manifest(ref, verify=False) if ref is not None and is_checkpoint(ref) else {}
    from .vision.loading import is_vision_ref

    if manifest.get("task") == "image-classification" or (not manifest and is_vision_ref(ref)):
        return _evaluate_vision(ref, manifest, reference, rep, device, dtype)
    if ref is not None and is_checkpoint(ref):
        from transformers import AutoConfig, AutoTokenizer

        from .runtime import load_quantized

        from .checkpoint_stream import wants_streaming

        stream = wants_streaming(ref, device or torch.device("cpu"), offload, max_memory)
        model = load_quantized(ref, device=device, dtype=dtype, offload=stream)
        sizes = checkpoint_sizes(ref)
        task = model_task(AutoConfig.from_pretrained(ref))
        source = read_manifest(ref, verify=False).get("source_model")
        try:
            tok = AutoTokenizer.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise UserError(f"checkpoint {ref} has no tokenizer files; copy them from the source model") from e
    else:
        loaded = load_model(ref, trust_remote_code=trust_remote_code, device=device, dtype=dtype, offload=offload,
                            max_memory=max_memory)
        model, tok, task, sizes = loaded.model, loaded.tokenizer, loaded.task, model_sizes(loaded.model)
    windows = eval_windows(tok, opts.data, opts.seqlen, opts.windows)
    if task == "causal-lm":
        with rep.bar("eval windows", len(windows)) as adv:
            res = perplexity(model, windows, batch_size=opts.batch_size, progress=adv)
        return {"task": task, **asdict(res), "sizes": sizes, "device": str(model_device(model)),
                "offload": streamer_of(model) is not None}
    reference = reference or source
    if reference is None:
        raise UserError("an encoder is scored against its full-precision model; pass --reference MODEL")
    ref_model = load_model(reference, trust_remote_code=trust_remote_code, device=device, dtype=dtype).model
    with rep.bar("eval windows", len(windows)) as adv:
        fid = embedding_fidelity(ref_model, model, with_special_tokens(windows, tok), progress=adv)
    return {"task": task, "reference": str(reference), **asdict(fid), "sizes": sizes}


EVAL_IMAGES = 1000  # Fashion-MNIST images beside the sample photos, drawn with EVAL_IMAGE_SEED
EVAL_IMAGE_SEED = 12345


def vision_eval_images(model, n_fashion: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pinned image set: the 12 evaluation photos + `n_fashion` (default EVAL_IMAGES) of the evaluation half of the
    Fashion-MNIST test images drawn with EVAL_IMAGE_SEED, none of them ever used for calibration (RGB
    models), or the whole Fashion-MNIST test split with its labels (1-channel models such as the FMNIST ViT)."""
    from .vision.images import sample_images
    from .vision.timm_models import data_config

    cfg = data_config(model)
    size = int(cfg["input_size"][-1])
    if int(cfg["input_size"][0]) == 1:
        from .vision.fashion import fashion_mnist, to_model_input

        images, labels = fashion_mnist("test")
        return to_model_input(images, cfg["mean"], cfg["std"], size), labels
    n_fashion = EVAL_IMAGES if n_fashion is None else n_fashion
    return sample_images(size, n_fashion=n_fashion, seed=EVAL_IMAGE_SEED, part="eval", mean=cfg["mean"],
                         std=cfg["std"], crop_pct=float(cfg.get("crop_pct", 0.875)),
                         interpolation=str(cfg.get("interpolation", "bicubic"))), None


def _evaluate_vision(ref: str | None, manifest: dict, reference: str | None, rep,
                     device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Top-1 agreement and mean KL against the full-precision model on the pinned image set (+ accuracy
    against the labels where the set has them)."""
    from .evaluate import classification_fidelity
    from .models import load_model
    from .runtime import load_quantized

    reference = reference or manifest.get("source_model") or ref
    ref_model = load_model(reference, device=device, dtype=dtype).model
    model = load_quantized(ref, device=device, dtype=dtype) if manifest else ref_model
    images, labels = vision_eval_images(ref_model)
    with rep.bar("eval images", len(images)) as adv:
        fid = classification_fidelity(ref_model, model, images, progress=adv)
    from .sizes import checkpoint_sizes, model_sizes

    out = {"task": "image-classification", "reference": str(reference), **asdict(fid),
           "sizes": checkpoint_sizes(ref) if manifest else model_sizes(model)}
    if labels is not None:
        from .vision.fashion import accuracy

        out.update(accuracy=accuracy(model, images, labels), reference_accuracy=accuracy(ref_model, images, labels))
    return out
