"""A packed checkpoint run block by block (`eval CKPT --offload`, issue 16): the model is built from the file's
header on the meta device, its packed layers as runtime modules on meta buffers, and each repeated block's codes,
scales and zeros are read from model.safetensors only while the block runs (streaming.Streamer); the embedding,
final norm and head are read at once. Memory then holds one block's packed weights, not the whole file."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WEIGHTS
from .errors import UserError

# safetensors' dtype names (its header) -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def wants_streaming(path: Path, device: torch.device, offload: bool, max_memory: int | None, *,
                    strict: bool = True) -> bool:
    """Whether a stage that can run a streamed model should stream the checkpoint at `path`: --offload, or what a
    whole load needs more than `max_memory` (without one, 80% of the device's free memory), as for a model's own
    files. On the CPU a whole load needs twice the file: the fast kernels keep a layout of every packed weight
    beside it (codes as bytes, fp32 scales; quant_kernels/fast_cpu.py: repack), 5.1 GB for a 2.1 GB file.
    A checkpoint without a streamed form (not_streamable) is refused where --offload asked for it and `strict`
    (`eval CKPT --offload`), else loaded whole with a warning (`run --offload`'s evaluations, the automatic choice)."""
    from .checkpoint import read_manifest
    from .streaming import exceeds

    file = Path(path) / WEIGHTS
    if not file.is_file():
        return offload  # the loader's folder check names what is missing
    if not (offload or exceeds(2 * file.stat().st_size if device.type == "cpu" else file.stat().st_size, device,
                               max_memory)):
        return False
    why = not_streamable(Path(path), read_manifest(Path(path), verify=False))
    if why is None:
        return True
    if offload and strict:
        raise UserError(f"{path} {why}; drop --offload/--max-memory")
    logging.getLogger("hawqtool").warning("%s %s: loaded whole", path, why)
    return False


def header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a meta tensor of its stored shape and dtype (only the header is read)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(file), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                dt = _DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise UserError(f"{file} stores {k} as {sl.get_dtype()}, which no checkpoint holds; re-create it")
                out[k] = torch.empty(sl.get_shape(), dtype=dt, device="meta")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} cannot be read ({str(e).splitlines()[0]}); re-create the checkpoint") from e
    return out


def not_streamable(path: Path, manifest: dict) -> str | None:
    """Why the checkpoint at `path` has no streamed form (None: it has one): image classifiers and encoders are
    scored whole, and layers in ggml types load as dequantized dense Linear layers."""
    if manifest.get("task") == "image-classification":
        return "holds an image classifier, which is loaded whole"
    ggml = [n for n, m in manifest.get("layers", {}).items() if isinstance(m, dict) and "ggml_type" in m]
    if ggml:
        return f"has layers in ggml types ({ggml[0]}), which load whole as dequantized Linear layers"
    from transformers import AutoConfig

    from .models import model_task

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None  # the loader says what is wrong with config.json
    if model_task(config) != "causal-lm":
        return "holds an encoder, whose embeddings are scored with the model whole"
    return None


def check_streamable(path: Path, manifest: dict) -> None:
    """Refuse, in one line, a checkpoint that has no streamed form (not_streamable)."""
    why = not_streamable(path, manifest)
    if why is not None:
        raise UserError(f"{path} {why}; drop --offload/--max-memory")


class CheckpointSource:
    """A checkpoint's tensors by name for the Streamer (streaming.WeightSource), plus the fp16 `NAME.scales` of layers
    stored with scale codes, formed from their NAME.qscales and NAME.scale_step when their block is read."""

    def __init__(self, path: Path, manifest: dict):
        from .streaming import WeightSource

        self.files = WeightSource(path)
        self.coded = {f"{n}.scales": n for n, m in manifest.get("layers", {}).items()
                      if isinstance(m, dict) and "scale_bits" in m}
        self.meta = manifest.get("layers", {})

    def has(self, name: str) -> bool:
        return name in self.coded or self.files.has(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.coded:
            return self.files.get(name)
        from .loader import packed_scales

        n = self.coded[name]
        return packed_scales({k: self.files.get(k) for k in (f"{n}.qscales", f"{n}.scale_step") if self.files.has(k)},
                             n, self.meta[n])

    def total_bytes(self) -> int:
        return self.files.total_bytes()


def attach_streamer(model: nn.Module, emb: dict | None, path: Path, manifest: dict, device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
    """`model` (loader._packed_model built on header_tensors) made a streamed model (streaming.streamer_of finds its
    Streamer): what lies outside the blocks is read now, float parts in `dtype`, packed ones as stored; eval mode."""
    from .streaming import Streamer

    # float tensors the checkpoint stores once (a tied head) are tied as when it is loaded whole
    streamer = Streamer(model, CheckpointSource(path, manifest), device, dtype, tie=bool(manifest.get("tied")))
    if emb is not None:
        from .loader import share_tied_codes

        model.get_submodule(emb["name"]).dtype = dtype
        share_tied_codes(model, emb)
    empty = [n for n, t in model.state_dict(keep_vars=True).items()
             if t.device.type == "meta" and not n.startswith(streamer.block_prefix)]
    if empty:
        raise UserError(f"{path / WEIGHTS} lacks {empty[0]} (and {len(empty) - 1} more tensors) that config.json "
                        "describes; re-create the checkpoint")
    model._hawq_streamer = streamer
    return model.eval()
