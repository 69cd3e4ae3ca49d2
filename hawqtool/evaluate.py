"""Stage 5 (evaluate): perplexity (causal LMs) and embedding fidelity (encoders), pinned protocols.

Protocol (GPTQ-style, documented in the README): the evaluation slice (last 20% of the
source's tokens) is cut into non-overlapping windows of `seqlen` tokens from its start,
at most `max_windows`; each window is scored independently (no context carried over);
ppl = exp(Σ NLL / Σ predicted tokens), with seqlen−1 predicted tokens per window.
Encoders get the same windows wrapped in [CLS] … [SEP]; the score is the mean cosine of
mean-pooled embeddings against the full-precision model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .options import EvalOptions


@dataclass
class PerplexityResult:
    """Perplexity and the exact token count behind it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int
    windows: int
    seqlen: int
    seconds: float


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = EvalOptions.batch_size,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of a causal LM over [k, seqlen] token windows. Under torch.distributed each rank scores its
    strided share of the batches; the per-batch sums are gathered and added in batch order (1-rank result)."""
    from .device import model_device
    from .distributed import gather_list, my_share, world
    from .streaming import streamed_window_outputs, streamer_of

    t0 = time.perf_counter()
    sums: list[tuple[float, int]] = []
    model.eval()
    dev = model_device(model)
    rank, size = world()
    every = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    batches = [{"input_ids": w.to(dev)} for w in my_share(every, rank, size)]
    if streamer_of(model) is not None:  # block by block over all windows, then each window's tail on its own
        outputs = streamed_window_outputs(model, batches, use_cache=False)
    else:
        outputs = ((j, model(**b, use_cache=False)) for j, b in enumerate(batches))
    with torch.no_grad():
        for j, ids, nll in _window_nlls(outputs, batches):
            if not torch.isfinite(nll):
                raise FloatingPointError(f"non-finite loss in evaluation window {(j * size + rank) * batch_size}; "
                                         "the model produces NaN/inf")
            sums.append((float(nll), ids[:, 1:].numel()))
            if progress:
                progress(len(ids) * size)
    total, count = 0.0, 0
    for s, c in gather_list(sums, len(every)):  # in batch order: the sum one process forms
        total += s
        count += c
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(windows),
                            seqlen=windows.shape[1], seconds=time.perf_counter() - t0)


def _window_nlls(outputs, batches: list[dict]):
    """(batch index, its ids, Σ NLL of its windows) from (batch index, output) pairs that hold a whole batch or, in
    order, one window of it (a streamed model's). The cross-entropy runs window by window either way: its float copies
    and log-softmax are one window's (4 × 512 × 49152 fp32 logits are 0.4 GB; each full-batch copy was another)."""
    row, total = 0, 0.0
    for j, out in outputs:
        ids = batches[j]["input_ids"]
        logits = out.logits
        del out
        for b in range(len(logits)):
            total = total + F.cross_entropy(logits[b, :-1].float(), ids[row + b, 1:], reduction="sum")
        row += len(logits)
        del logits
        if row == len(ids):
            yield j, ids, total
            row, total = 0, 0.0


@dataclass
class FidelityResult:
    """Agreement of an encoder's embeddings with its full-precision reference."""

    cosine: float  # mean over windows of cos(mean-pooled embedding, reference's)
    cosine_min: float
    windows: int
    seqlen: int
    seconds: float


def mean_pooled(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden state over positions (sentence-transformers' pooling for MiniLM-style encoders)."""
    from .device import model_device

    return model(input_ids=ids.to(model_device(model))).last_hidden_state.float().mean(dim=1).cpu()


def embedding_fidelity(reference: nn.Module, model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                       progress: Callable[[int], None] | None = None) -> FidelityResult:
    """Cosine similarity of mean-pooled embeddings of `model` and `reference` over [k, seqlen] token windows."""
    t0 = time.perf_counter()
    cos = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            a, b = mean_pooled(reference, ids), mean_pooled(model, ids)
            c = F.cosine_similarity(a.double(), b.double(), dim=-1)
            if not torch.isfinite(c).all():
                raise FloatingPointError(f"non-finite embeddings in evaluation window {i}; the model produces NaN/inf")
            cos.append(c)
            if progress:
                progress(len(ids))
    c = torch.cat(cos)
    return FidelityResult(cosine=float(c.mean()), cosine_min=float(c.min()), windows=len(windows),
                          seqlen=windows.shape[1], seconds=time.perf_counter() - t0)


@dataclass
class ClassificationFidelity:
    """Agreement of an image classifier with its full-precision reference on a fixed image set."""

    top1_agreement: float  # fraction of images whose argmax class matches the reference's
    mean_kl: float  # mean over images of KL(p_reference ‖ p_model), nats
    images: int
    seconds: float


def classification_fidelity(reference: nn.Module, model: nn.Module, images: torch.Tensor, *, batch_size: int = 32,
                            progress: Callable[[int], None] | None = None) -> ClassificationFidelity:
    """Top-1 agreement and mean KL of `model`'s class distribution against `reference` on [N, C, H, W] images."""
    t0 = time.perf_counter()
    agree, kl = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            lp_ref = F.log_softmax(_on_device(reference, x).double(), dim=-1)
            lp = F.log_softmax(_on_device(model, x).double(), dim=-1)
            if not torch.isfinite(lp).all():
                raise FloatingPointError(f"non-finite logits in evaluation batch {i}; the model produces NaN/inf")
            agree.append(lp.argmax(-1) == lp_ref.argmax(-1))
            kl.append((lp_ref.exp() * (lp_ref - lp)).sum(-1))
            if progress:
                progress(len(x))
    return ClassificationFidelity(top1_agreement=float(torch.cat(agree).double().mean()),
                                  mean_kl=float(torch.cat(kl).mean()), images=len(images),
                                  seconds=time.perf_counter() - t0)


def _on_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) with x moved to the model's device; the output back on the CPU (results are compared there)."""
    from .device import model_device, model_dtype

    return model(x.to(model_device(model), model_dtype(model) if x.is_floating_point() else x.dtype)).cpu()
