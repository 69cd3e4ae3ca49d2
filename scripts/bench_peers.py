"""Intel AutoRound (PyPI `auto-round` 0.16.1) on the embedded SmolLM2-135M, scored on hawqtool's own windows.

    python scripts/bench_peers.py --configs ar:3:128:sym:iters=0,ar:4:128:sym:iters=0 --slice eval --windows 40
    python scripts/bench_peers.py --configs ar:3:128:sym:rtn,ar:3:128:sym:iters=200 --seeds 0,1,2 --append

A config is `ar:BITS:GROUP:sym|asym[:OPTION...]` (GROUP -1 = per output channel) with the options
`iters=N` (AutoRound's signed-gradient tuning steps per block, default 200 as in AutoRound; 0 = its
imatrix-weighted "optimised RTN"), `rtn` (AutoRound's plain RTN: iters=0, disable_opt_rtn=True) and
`fp32` (amp=False: AutoRound quantizes in fp32 instead of its CPU default, bf16).

Same model (`load_model(None)`), same calibration token windows as hawqtool (`calibration_windows`:
NSAMPLES × SEQLEN tokens from the first 60% of the built-in text, per seed), handed to AutoRound as its
`dataset` (a list of [1, SEQLEN] token tensors: it never loads its default hub set), same evaluation
(`eval_windows` + `perplexity` on the valid or eval slice). Every quantized Linear's integer codes are
recovered from AutoRound's in-memory output (fake-quantized weight, per-group scale and zero) and the
layer is rebuilt as fp32 scale16 · (q − zero) in a fresh fp32 copy of the model, so only the 210 decoder
Linear weights differ from the baseline; an assert checks that the rebuilt weights equal AutoRound's own.
Bits per linear weight are counted as hawqtool counts them (QuantSpec.storage_bits: codes, fp16 scales,
b-bit zeros when asymmetric, ceil(in/group) groups per row) and checked against AutoRound's scale shapes.
hawqtool's rows on the same windows come from scripts/bench_grid.py.

auto-round is not a dependency and nothing is installed here: `pip install auto-round==0.16.1 --no-deps`
after torch, plus `py-cpuinfo`; when `datasets` is missing a stand-in that refuses to load anything is
put in its place (auto_round imports it at start-up but needs it only for hub data sets).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record, seed_rows  # noqa: E402

SKIP_MESSAGE = ("auto-round is not installed (pip install auto-round==0.16.1 --no-deps after torch): "
                "AutoRound rows skipped")
DEFAULT_ITERS = 200  # AutoRound's own default


@dataclass(frozen=True)
class ArConfig:
    """One AutoRound configuration parsed from `ar:BITS:GROUP:sym|asym[:OPTION...]`."""

    text: str
    bits: int
    group: int
    sym: bool
    iters: int = DEFAULT_ITERS
    rtn: bool = False
    fp32: bool = False


def parse_config(text: str) -> ArConfig:
    """An ArConfig from one --configs entry (ValueError with the reason on a malformed one)."""
    parts = text.strip().split(":")
    if parts[0] != "ar":
        raise ValueError(f"{text!r}: must start with 'ar:' (hawqtool rows come from scripts/bench_grid.py)")
    if len(parts) < 4:
        raise ValueError(f"{text!r}: expected ar:BITS:GROUP:sym|asym[:iters=N|rtn|fp32]")
    try:
        bits, group = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"{text!r}: BITS and GROUP must be integers") from None
    if not 2 <= bits <= 8:
        raise ValueError(f"{text!r}: BITS must be 2..8")
    if group != -1 and group <= 0:
        raise ValueError(f"{text!r}: GROUP must be positive or -1")
    if parts[3] not in ("sym", "asym"):
        raise ValueError(f"{text!r}: expected 'sym' or 'asym', got {parts[3]!r}")
    opts: dict = {}
    for opt in parts[4:]:
        if opt in ("rtn", "fp32"):
            opts[opt] = True
        elif opt.startswith("iters="):
            try:
                opts["iters"] = int(opt[len("iters="):])
            except ValueError:
                raise ValueError(f"{text!r}: iters must be an integer") from None
            if opts["iters"] < 0:
                raise ValueError(f"{text!r}: iters must be >= 0")
        else:
            raise ValueError(f"{text!r}: unknown option {opt!r} (iters=N, rtn, fp32)")
    if opts.get("rtn"):
        if opts.get("iters", 0) != 0:
            raise ValueError(f"{text!r}: rtn means iters=0")
        opts["iters"] = 0
    return ArConfig(text=text.strip(), bits=bits, group=group, sym=parts[3] == "sym", **opts)


def parse_configs(text: str) -> list[ArConfig]:
    """Every comma-separated entry of --configs, parsed."""
    entries = [e for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("no configuration given")
    return [parse_config(e) for e in entries]


def parse_seeds(text: str) -> list[int]:
    """Comma-separated integer seeds."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return seeds


def layer_storage_bits(shape: tuple[int, int], bits: int, group: int, sym: bool) -> int:
    """Bits to store one [out, in] layer, counted by hawqtool's own QuantSpec.storage_bits."""
    from hawqtool.quantize.quantizer import QuantSpec

    return QuantSpec(bits, group, sym).storage_bits(*shape)


def bits_per_linear_weight(shapes: dict[str, tuple[int, int]], bits: int, group: int, sym: bool,
                           unquantized: frozenset[str] = frozenset()) -> float:
    """Average stored bits per weight over the layers; those left unquantized count as fp16."""
    total = sum(16 * o * i if n in unquantized else layer_storage_bits((o, i), bits, group, sym)
                for n, (o, i) in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def autoround_storage_bits(shape: tuple[int, int], bits: int, scale, zp) -> int:
    """Bits of one layer as AutoRound produced it: codes, fp16 per scale, b bits per stored zero."""
    import torch

    zeros = zp.numel() if isinstance(zp, torch.Tensor) and zp.numel() > 1 else 0  # scalar: symmetric
    return shape[0] * shape[1] * bits + 16 * scale.numel() + bits * zeros


def dequantize(weight, scale, zp, bits: int, group: int):
    """fp32 scale16·(q − zero) of a layer from AutoRound's fake-quantized weight, scale, zero (asserted equal)."""
    import torch

    out, inf = weight.shape
    g = inf if group == -1 else group
    ng = -(-inf // g)
    w = torch.nn.functional.pad(weight.float(), (0, ng * g - inf)).view(out, ng, g)
    s = scale.float().reshape(out, ng, 1)
    per_group = isinstance(zp, torch.Tensor) and zp.numel() > 1  # asymmetric; symmetric: one constant zero
    z = zp.float().reshape(out, ng, 1) if per_group else torch.tensor(float(zp))
    x = w / s + z
    q = x.round()
    assert (x - q).abs().max().item() < 0.05, "AutoRound's weight is not scale·(integer − zero)"
    assert q.min().item() >= 0 and q.max().item() <= 2**bits - 1, "codes outside [0, 2^bits − 1]"
    deq = (scale.to(torch.float16).float().reshape(out, ng, 1) * (q - z)).reshape(out, ng * g)[:, :inf]
    assert torch.allclose(deq, weight.float(), rtol=2**-7, atol=1e-7), "rebuilt weight differs from AutoRound's"
    return deq.contiguous()


def _stub_datasets() -> None:
    """Put a stand-in `datasets` module in place (auto_round imports it at start-up) that loads nothing."""
    mod = types.ModuleType("datasets")

    def refuse(*_a, **_k):
        raise RuntimeError("bench_peers: AutoRound tried to load a hub data set; it must use the given windows")

    for name in ("Dataset", "IterableDataset", "Features", "Sequence", "Value"):
        setattr(mod, name, type(name, (), {}))
    mod.load_dataset = mod.load_from_disk = mod.concatenate_datasets = refuse
    sys.modules["datasets"] = mod


def auto_round_importable() -> bool:
    """Whether `auto_round` imports (offline; a stand-in `datasets` when that is missing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("AR_WORK_SPACE", tempfile.mkdtemp(prefix="bench_peers_ar_"))
    try:
        if importlib.util.find_spec("auto_round") is None:
            return False
        if importlib.util.find_spec("datasets") is None:
            _stub_datasets()
        importlib.import_module("auto_round")
    except ImportError:
        return False
    return True


def run_autoround(cfg: ArConfig, seed: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """Quantize a fresh model with AutoRound; (fp32 dequantized weights by layer name, run facts)."""
    from auto_round import AutoRound

    from hawqtool.data import calibration_windows
    from hawqtool.models import load_model, quantizable_layers

    loaded = load_model(None)
    calib = calibration_windows(loaded.tokenizer, "wiki", args.nsamples, args.seqlen, seed=seed)
    extra = {"disable_opt_rtn": True} if cfg.rtn else {}
    ar = AutoRound(loaded.model, tokenizer=loaded.tokenizer, scheme=f"W{cfg.bits}A16", bits=cfg.bits,
                   group_size=cfg.group, sym=cfg.sym, iters=cfg.iters, dataset=[w[None] for w in calib],
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=seed,
                   device_map="cpu", low_cpu_mem_usage=False, amp=not cfg.fp32, **extra)
    t0 = time.perf_counter()
    model, _ = ar.quantize()
    quant_s = time.perf_counter() - t0
    deq, ar_bits, skipped = {}, 0, []
    for name, m in quantizable_layers(model).items():
        shape = tuple(m.weight.shape)
        if getattr(m, "scale", None) is None:
            skipped.append(name)
            ar_bits += 16 * shape[0] * shape[1]
            continue
        assert (m.bits, m.group_size, bool(m.sym)) == (cfg.bits, cfg.group, cfg.sym), f"{name}: other format"
        deq[name] = dequantize(m.weight.data, m.scale, m.zp, cfg.bits, cfg.group)
        ar_bits += autoround_storage_bits(shape, cfg.bits, m.scale, m.zp)
    n_blocks = len(model.model.layers)
    return deq, dict(quant_s=quant_s, ar_bits=ar_bits, skipped=skipped, n_blocks=n_blocks)


def score(deq: dict, windows, batch_size: int | None):
    """Perplexity of a fresh fp32 model whose listed Linear weights are replaced by `deq`."""
    from hawqtool.evaluate import perplexity
    from hawqtool.models import load_model, quantizable_layers

    loaded = load_model(None)
    layers = quantizable_layers(loaded.model)
    for name, w in deq.items():
        layers[name].weight.data.copy_(w)
    return perplexity(loaded.model, windows) if batch_size is None else perplexity(loaded.model, windows,
                                                                                   batch_size=batch_size)


def run_config(cfg: ArConfig, seed: int, args: argparse.Namespace, windows, shapes: dict) -> dict:
    """One AutoRound config at one calibration seed: quantize, check the bits, score."""
    deq, facts = run_autoround(cfg, seed, args)
    avg = bits_per_linear_weight(shapes, cfg.bits, cfg.group, cfg.sym, frozenset(facts["skipped"]))
    ar_avg = facts["ar_bits"] / sum(o * i for o, i in shapes.values())
    assert abs(avg - ar_avg) < 1e-9, f"bits: hawqtool count {avg} vs AutoRound's scales {ar_avg}"
    r = score(deq, windows, args.eval_batch_size)
    return dict(config=cfg.text, seed=seed, ppl=r.ppl, tokens=r.tokens, avg_bits=avg, quant_s=facts["quant_s"],
                s_per_block=facts["quant_s"] / facts["n_blocks"], unquantized=facts["skipped"])


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ar:3:128:sym:iters=0", help="comma-separated ar:BITS:GROUP:sym|asym[:opts]")
    ap.add_argument("--slice", choices=["valid", "eval"], default="eval")
    ap.add_argument("--windows", type=int, default=40, help="512-token windows scored")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="AutoRound's batch size (its default 8)")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="perplexity batch (hawqtool's default)")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    return ap


def validate(args: argparse.Namespace) -> tuple[list[ArConfig], list[int]]:
    """Parsed configs and seeds; ValueError with a one-line reason on bad input."""
    configs, seeds = parse_configs(args.configs), parse_seeds(args.seeds)
    for flag in ("windows", "nsamples", "seqlen", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    return configs, seeds


def table(rows: list[dict], base_ppl: float) -> list[str]:
    """The markdown table: one row per config, seeds side by side."""
    lines = ["| config | bits per linear weight | ppl per seed | median | quantize s | s per block |",
             "|---|---|---|---|---|---|",
             f"| fp32 baseline | 32 | {base_ppl:.2f} | {base_ppl:.2f} | – | – |"]
    lines += [f"| AutoRound {r['config']} | {r['avg_bits']:.3f} | {' / '.join(f'{p:.2f}' for p in r['ppls'])} | "
              f"{r['median']:.2f} | {r['quant_s']:.0f} | {r['s_per_block']:.1f} |" for r in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse, check that auto_round imports, run every config × seed, print (and append) the table."""
    args = build_parser().parse_args(argv)
    try:
        configs, seeds = validate(args)
    except ValueError as e:
        print(f"bench_peers.py: error: {e}", file=sys.stderr)
        return 1
    if not auto_round_importable():
        print(SKIP_MESSAGE, flush=True)
        return 0  # hawqtool's rows come from scripts/bench_grid.py: nothing else to do here
    import auto_round
    import torch

    from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, eval_windows
    from hawqtool.evaluate import perplexity
    from hawqtool.models import load_model, quantizable_layers

    torch.manual_seed(0)
    base = load_model(None)
    frac = VALID_FRACTION if args.slice == "valid" else EVAL_FRACTION
    windows = eval_windows(base.tokenizer, "wiki", 512, args.windows, fraction=frac)
    shapes = {n: tuple(m.weight.shape) for n, m in quantizable_layers(base.model).items()}
    fp = perplexity(base.model, windows)
    del base
    print(json.dumps(dict(config="baseline", ppl=fp.ppl, tokens=fp.tokens, linear_layers=len(shapes))), flush=True)
    rows = seed_rows(configs, seeds, lambda cfg, seed: run_config(cfg, seed, args, windows, shapes))
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, auto-round {auto_round.__version__}; {len(shapes)} decoder Linear layers; "
               f"calibration {args.nsamples}×{args.seqlen} tokens (wiki, first 60%, seeds {args.seeds}) as "
               f"AutoRound's dataset, its batch size {args.batch_size}, amp (bf16) unless `fp32`; weights rebuilt "
               f"as fp32 fp16-scale·(q−zero) in a fresh fp32 model; scored on the {args.slice} slice: "
               f"{fp.tokens} predicted tokens ({args.windows}×512); baseline ppl {fp.ppl:.3f}; load: {load_now()}")
    record("AutoRound beside hawqtool, same windows (SmolLM2-135M)", details, table(rows, fp.ppl), args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
