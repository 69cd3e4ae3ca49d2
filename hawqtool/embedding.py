"""The input embedding (and an output head tied to it) as a plan option: which module, what it costs.

SmolLM2's tied embedding/head is 21% of its parameters; kept in fp32 it dominates the file once the
linear layers are at 3 bits. `--embed-bits 8|6|4` stores the table as b-bit codes with one fp16 scale
per row (group size -1, the default) or per group along the hidden size, on the searched grid
(quantize/embedding.py); the lookup dequantizes only the rows it gathers, and a tied head computes its
logits from the same packed codes (runtime.QuantEmbedding / QuantLinear). 16 keeps the table as it is:
the default, so plans, fingerprints and checkpoints made without the option stay what they were.

Budgets: `--avg-bits` counts the linear layers only (its meaning does not change); `--max-bytes` counts
the quantized embedding too when one is given (EmbeddingPlan.in_budget). An output head that is not tied
to the embedding is an ordinary Linear of the plan (GPTQ like the others).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .artifacts import EmbeddingPlan
from .errors import UserError
from .models import tied_head_name
from .quantize.quantizer import QuantSpec

KEEP = 16  # --embed-bits 16: the table stays as the model has it
EMBED_BITS = (4, 6, 8, KEEP)  # what the command line offers; the library takes any width 1..8


def input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(module name, module) of the model's input embedding; a one-line UserError when there is none or its
    forward does more than a lookup (a subclass may scale rows, max_norm renormalises them)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise UserError("--embed-bits: the model has no input embedding (get_input_embeddings); leave it at 16")
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        raise UserError(f"--embed-bits: the input embedding is a {type(emb).__name__}"
                        f"{' with max_norm' if type(emb) is nn.Embedding else ''}, whose forward is more than a row "
                        "lookup, so hawqtool cannot replace it; leave --embed-bits at 16")
    name = next(n for n, m in model.named_modules() if m is emb)
    return name, emb


def embedding_spec(ep: EmbeddingPlan) -> QuantSpec:
    """The quantizer spec of a plan's embedding entry."""
    return QuantSpec(ep.bits, ep.group_size, ep.symmetric)


def check_embed_options(bits: int, group_size: int) -> bool:
    """True if `--embed-bits bits` asks for a quantized embedding; a one-line UserError for a width outside 1..8
    and 16, a bad group size, or a group size given while the embedding is kept (it would be ignored)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not (1 <= bits <= 8 or bits == KEEP):
        raise UserError(f"--embed-bits must be one of {', '.join(map(str, EMBED_BITS))} (16 keeps it), got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
        raise UserError(f"--embed-group-size must be -1 (one scale per row) or positive, got {group_size!r}")
    if bits == KEEP and group_size != -1:
        raise UserError(f"--embed-group-size {group_size} needs --embed-bits 4, 6 or 8 (16 keeps the embedding as "
                        "it is); drop one of them")
    return bits != KEEP


def embedding_plan(model: nn.Module, bits: int, group_size: int = -1, symmetric: bool = False,
                   planned: Iterable[str] = ()) -> EmbeddingPlan | None:
    """The plan's embedding entry for `--embed-bits bits` (None for 16: keep). `planned` are the plan's layer
    names: a tied head among them is quantized as its own Linear (untied), so the entry names no tied head."""
    if not check_embed_options(bits, group_size):
        return None
    name, emb = input_embedding(model)
    vocab, hidden = (int(d) for d in emb.weight.shape)
    head = tied_head_name(model)
    if head in set(planned):
        head = None
    spec = QuantSpec(bits, group_size, symmetric)
    return EmbeddingPlan(name=name, bits=bits, group_size=group_size, symmetric=symmetric, shape=[vocab, hidden],
                         n_params=vocab * hidden, storage_bytes=spec.storage_bits(vocab, hidden) / 8, tied_head=head)


def check_embedding_matches(ep: EmbeddingPlan | None, model: nn.Module) -> None:
    """One-line UserError unless the model's input embedding (and the head tied to it, after the plan's own
    head was untied) is the one the plan's entry describes."""
    if ep is None:
        return
    name, emb = input_embedding(model)
    if name != ep.name or list(emb.weight.shape) != list(ep.shape):
        raise UserError(f"plan does not match the model: its embedding entry is {ep.name} {ep.shape}, the model's "
                        f"input embedding is {name} {list(emb.weight.shape)}; re-run `hawqtool allocate` on this model")
    head = tied_head_name(model)
    if head != ep.tied_head:
        raise UserError(f"plan does not match the model: the plan's embedding serves tied head {ep.tied_head!r}, the "
                        f"model's tied head is {head!r}; re-run `hawqtool allocate` on this model")
