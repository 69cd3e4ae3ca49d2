"""Calibration and evaluation text: sources, disjoint slices, fixed-length token windows.

A DATA reference is `wiki` (the built-in corpus: the shortened English Wikipedia dump that
ships in the `gensim` wheel, cleaned with gensim's own wiki filter), a `.txt` file, or a
`.jsonl` file with a "text" field. Every source is split by token position: calibration
windows come only from the first 60% of its tokens, evaluation windows only from the last
20%, so the same source can serve both without overlap.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .paths import cache_dir

BUILTIN = "wiki"
CALIB_FRACTION = (0.0, 0.6)
EVAL_FRACTION = (0.8, 1.0)
VALID_FRACTION = (0.6, 0.8)  # untouched by calibration and evaluation: for choosing options
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def builtin_wiki_text() -> str:
    """Plain text of the gensim test Wikipedia dump (articles joined by blank lines), cached."""
    target = cache_dir() / "data" / "gensim-enwiki.txt"
    if target.exists():
        return target.read_text(encoding="utf-8")
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in `wiki` corpus needs the `gensim` package; "
                        "`pip install gensim` or pass --calib/--data with a text file")
    dump = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _WIKI_FILE
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    import bz2

    articles = []
    with bz2.open(dump, "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text).strip()
            if clean:
                articles.append(f"{title}\n\n{clean}")
    body = "\n\n".join(articles)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, target)
    return body


def read_text(ref: str) -> str:
    """Text of a DATA reference (see module docstring)."""
    if ref == BUILTIN:
        return builtin_wiki_text()
    p = Path(ref).expanduser()
    if not p.is_file():
        raise UserError(f"data file {ref} does not exist; pass a .txt/.jsonl file or `wiki`")
    raw = _decode_utf8(p, ref)
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{ref} line {i + 1} is not a JSON object with a \"text\" field; fix that line") from e
        return "\n\n".join(texts)
    return raw


def _decode_utf8(p: Path, ref: str) -> str:
    """The file's text; a file that is not UTF-8 is refused (naming the line), never decoded with
    replacement characters that would silently change the tokens."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"data file {ref} is not UTF-8 text (byte {e.start}, line {line}: "
                        f"{data[e.start:e.start + 1].hex()}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def data_fingerprint(ref: str) -> str:
    """sha256 of the source text (for stage fingerprints)."""
    return hashlib.sha256(read_text(ref).encode("utf-8")).hexdigest()


@dataclass
class TokenSlice:
    """A token stream cut from one fraction of a source."""

    tokens: torch.Tensor  # int64 [n]
    source: str
    fraction: tuple[float, float]


def token_slice(tokenizer, ref: str, fraction: tuple[float, float]) -> TokenSlice:
    """Tokenize the whole source once, then keep the token positions in `fraction`."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer; text data cannot be used with it")
    text = read_text(ref)
    if not text.strip():
        raise UserError(f"data {ref} is empty; give a text with at least a few thousand words")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and len(ids) and float((ids == unk).float().mean()) > 0.5:
        raise UserError(f"the model's tokenizer turns {float((ids == unk).float().mean()):.0%} of {ref} into its "
                        f"unknown token (a vocabulary of {len(tokenizer)}); put the model's own tokenizer files "
                        "beside it")
    lo, hi = int(fraction[0] * len(ids)), int(fraction[1] * len(ids))
    return TokenSlice(tokens=ids[lo:hi].clone(), source=ref, fraction=fraction)


def calibration_windows(tokenizer, ref: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """n random windows of seqlen tokens from the calibration slice (GPTQ-style), [n, seqlen]."""
    sl = token_slice(tokenizer, ref, CALIB_FRACTION)
    if len(sl.tokens) < seqlen + 1:
        raise UserError(f"calibration text {ref} has {len(sl.tokens)} tokens in its calibration slice "
                        f"(first 60%), fewer than one window of {seqlen}; give more text or lower --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(sl.tokens) - seqlen, (n,), generator=g)
    return torch.stack([sl.tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, ref: str, seqlen: int, max_windows: int | None = None,
                 fraction: tuple[float, float] = EVAL_FRACTION) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens from the start of the evaluation slice, [k, seqlen]
    (pass fraction=VALID_FRACTION for the validation slice used to choose options)."""
    sl = token_slice(tokenizer, ref, fraction)
    k = len(sl.tokens) // seqlen
    if max_windows is not None:
        k = min(k, max_windows)
    if k == 0:
        raise UserError(f"evaluation text {ref} has {len(sl.tokens)} tokens in its evaluation slice "
                        f"(last 20%), fewer than one window of {seqlen}; give more text or lower --seqlen")
    return sl.tokens[: k * seqlen].view(k, seqlen)


def with_special_tokens(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """Wrap each window in the tokenizer's [CLS] ... [SEP] (encoders expect them), keeping the length:
    the window's last two tokens make room."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        return windows
    k = windows.shape[0]
    return torch.cat([torch.full((k, 1), cls), windows[:, :-2], torch.full((k, 1), sep)], dim=1)
