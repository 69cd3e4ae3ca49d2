"""rich tables for the CLI's end-of-command summaries."""
from __future__ import annotations

from rich.table import Table

from .artifacts import LayerSensitivity, Plan, SensitivityReport

SENSITIVITY_COLUMNS = ("layer", "params", "trace", "± s.e.", "trace/param", "probes")


def most_sensitive(layers: list[LayerSensitivity], top: int | None = None) -> list[LayerSensitivity]:
    """Layers by trace per parameter, most sensitive first: the one order every table and report uses."""
    return sorted(layers, key=lambda x: -x.trace / x.n_params)[:top]


def sensitivity_row(ls: LayerSensitivity) -> list[str]:
    """One layer's cells for SENSITIVITY_COLUMNS, so the CLI table and the Markdown/HTML report agree."""
    return [ls.name, f"{ls.n_params:,}", f"{ls.trace:.4g}", f"{ls.stderr:.2g}", f"{ls.trace / ls.n_params:.3g}",
            str(ls.probes)]


def sensitivity_table(report: SensitivityReport, top: int = 20) -> Table:
    """Layers sorted by trace per parameter (most sensitive first)."""
    t = Table(title=f"Hessian trace ({report.objective}, Hutchinson) — top {top} of {len(report.layers)}")
    for col in SENSITIVITY_COLUMNS:
        t.add_column(col, justify="left" if col == "layer" else "right")
    for ls in most_sensitive(report.layers, top):
        t.add_row(*sensitivity_row(ls))
    return t


def embedding_line(plan: Plan) -> str:
    """What the plan does with the input embedding, in words."""
    e = plan.embedding
    if e is None:
        return "embedding: kept as the model has it (--embed-bits 16)"
    scales = "one fp16 scale per row" if e.group_size == -1 else f"fp16 scales per {e.group_size} hidden units"
    return (f"embedding {e.name}: {e.bits}-bit, {scales}, {e.storage_bytes / 1e6:.2f} MB"
            f"{f', codes shared with tied head {e.tied_head}' if e.tied_head else ''}"
            f"{', inside --max-bytes' if e.in_budget else ', outside the --avg-bits budget (linear layers only)'}")


def plan_size_lines(plan: Plan) -> list[str]:
    """Bits per linear weight, the embedding, and the whole file's bits per parameter (predicted when the plan
    was made with the model at hand)."""
    from .sizes import size_line

    whole = (size_line(plan.file, "predicted: ") if plan.file else
             f"{plan.avg_bits:.3f} bits per linear weight; whole file not predicted (pass `allocate --model`)")
    return [whole, embedding_line(plan)]


def plan_table(plan: Plan) -> Table:
    """Bits histogram and totals of a plan (plan_size_lines go below it: bits per linear weight and whole file)."""
    t = Table(title=f"plan: {plan.avg_bits:.3f} bits per linear weight, {plan.total_bytes / 1e6:.2f} MB of linear "
                    f"layers, Ω={plan.predicted_omega:.4g}, solved in {plan.solve_seconds:.2f}s")
    t.add_column("bits", justify="right")
    formats = sorted({(lp.group_size, lp.scale_bits) for lp in plan.layers if not lp.ggml_type})
    detailed = len(formats) > 1 or any(k != 16 for _, k in formats)  # group sizes / scale codes are choices too
    if detailed:
        t.add_column("groups", justify="right")
        t.add_column("scales", justify="right")
    t.add_column("layers", justify="right")
    t.add_column("params", justify="right")
    for b in plan.bit_choices:
        for g, k in formats if detailed else [(None, None)]:
            ls = [lp for lp in plan.layers if lp.bits == b and (g is None or (lp.group_size, lp.scale_bits) == (g, k)
                                                               and not lp.ggml_type)]
            if detailed and not ls:
                continue
            fmt = ["per row" if g == -1 else str(g), "fp16" if k == 16 else f"{k}-bit codes"] if detailed else []
            t.add_row(str(b), *fmt, str(len(ls)), f"{sum(lp.n_params for lp in ls):,}")
    return t


def summary_table(s: dict) -> Table:
    """Baseline vs uniform vs mixed: perplexity (LMs) or top-1 agreement and KL (vision), bits, size, seconds."""
    vision, encoder = s.get("task") == "image-classification", s.get("task") == "encoder"
    if vision:
        t = Table(title=f"hawqtool run — {s['model']} ({s['eval_images']:,} eval images, vs full precision)")
        scores = ("top-1 agree", "mean KL")
    elif encoder:
        t = Table(title=f"hawqtool run — {s['model']} ({s['eval_windows']} eval windows × {s['eval_seqlen']} tokens, "
                        "mean-pooled embedding vs full precision)")
        scores = ("cosine", "min cosine")
    else:
        t = Table(title=f"hawqtool run — {s['model']} ({s['eval_tokens']:,} eval tokens)")
        scores = ("ppl",)
    for col in ("model", *scores, "bits/linear weight", "MB (quantized layers)", "file bits/param", "file MB",
                "quantize s", "eval s"):
        t.add_column(col, justify="right")
    sec = s.get("seconds", {})
    if vision or encoder:  # the reference itself: agreement/cosine 1, KL 0 by definition (not measured)
        t.add_row("full precision", "1.0000", "0" if vision else "1.0000", "32", "-", _bits(s, "baseline"), "-", "-",
                  "-")
    else:
        t.add_row("baseline", f"{s['baseline_ppl']:.3f}", "32", "-", _bits(s, "baseline"), "-", "-",
                  f"{sec.get('baseline_eval', 0):.0f}")
    ub = s["uniform_bits"]
    for key, label in (("uniform", f"uniform {ub}" + ("-bit" if isinstance(ub, int) else "")), ("mixed", "mixed (HAWQ)")):
        if s.get(key + "_ppl", s.get(key + "_cosine", s.get(key + "_top1_agreement", 0))) is None:
            continue  # no uniform checkpoint: a ggml budget no single type meets, or `run --no-uniform`
        cells = ([f"{s[key + '_top1_agreement']:.4f}", f"{s[key + '_mean_kl']:.4g}"] if vision
                 else [f"{s[key + '_cosine']:.4f}", f"{s[key + '_cosine_min']:.4f}"] if encoder
                 else [f"{s[key + '_ppl']:.3f}"])
        t.add_row(label, *cells, f"{s[key + '_avg_bits']:.3f}", f"{s[key + '_bytes'] / 1e6:.2f}", _bits(s, key),
                  f"{s[key + '_file_bytes'] / 1e6:.2f}" if key + "_file_bytes" in s else "-",
                  f"{sec.get(key + '_quantize', 0):.0f}", f"{sec.get(key + '_eval', 0):.0f}")
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
    emb = s.get("embed_bits", 16)
    emb = "embedding kept as the model has it" if emb == 16 else f"embedding (and tied head) {emb}-bit"
    if s.get("formats"):
        emb = f"ggml types {', '.join(s['formats'])} (`export --format gguf`); {emb}"
    t.caption = (f"{emb}; file bits/param: every stored tensor / every parameter (tied once); "
                 f"stage seconds: {secs}; peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    return t


def _bits(s: dict, key: str) -> str:
    v = s.get(f"{key}_file_bits_per_param")
    return "-" if v is None else f"{v:.3f}"


def bench_table(res) -> Table:
    """`hawqtool bench` summary: quantized vs full precision end to end, then the slowest layers."""
    q, f = res.quantized, res.full_precision
    mode = f", torch.compile'd, {res.graph_breaks} graph breaks" if res.compiled else ", eager"
    t = Table(title=f"bench — {res.checkpoint} vs {res.reference} ({res.threads} threads{mode})")
    for col in ("model", "prefill ms", "decode tok/s", "RSS added (MB)"):
        t.add_column(col, justify="right")
    t.add_row("quantized", f"{q.prefill_ms:.1f}", f"{q.decode_tokens_per_s:.1f}", f"{q.load_rss_bytes / 1e6:.0f}")
    t.add_row("full precision", f"{f.prefill_ms:.1f}", f"{f.decode_tokens_per_s:.1f}", f"{f.load_rss_bytes / 1e6:.0f}")
    layer_ms = sum(r.decode_ms for r in res.layers)
    fp_ms = sum(r.decode_fp32_ms for r in res.layers)
    layers = f"quantized layers at 1 token: {layer_ms:.2f} ms vs fp32 {fp_ms:.2f} ms; " if res.layers else ""
    t.caption = (f"decode {res.decode_speedup:.2f}×, prefill {res.prefill_speedup:.2f}× vs fp32; {layers}"
                 f"prompt {res.prompt_tokens}, decode {res.decode_tokens} tokens, median of {res.repeats}; "
                 f"peak RSS {res.peak_rss_bytes / 2**30:.2f} GiB; kernels {res.backend}")
    return t


def bench_layers_table(res, top: int = 12) -> Table:
    """`hawqtool bench` per layer: the `top` layers with the most decode time, quantized vs fp32."""
    t = Table(title=f"slowest {min(top, len(res.layers))} of {len(res.layers)} quantized layers (1 token / prompt)")
    t.add_column("layer", overflow="fold", min_width=26)
    for col in ("bits", "out×in", "1-tok ms", "fp32", "×fp32", "prompt ms", "fp32 "):
        t.add_column(col, justify="right", no_wrap=True)
    for r in sorted(res.layers, key=lambda r: -r.decode_ms)[:top]:
        t.add_row(r.name, str(r.bits), f"{r.shape[0]}×{r.shape[1]}", f"{r.decode_ms:.3f}", f"{r.decode_fp32_ms:.3f}",
                  f"{r.decode_fp32_ms / r.decode_ms:.2f}×" if r.decode_ms > 0 else "-", f"{r.prefill_ms:.3f}",
                  f"{r.prefill_fp32_ms:.3f}")
    return t


def batch_table(rows: list[dict]) -> Table:
    """One row per run of `hawqtool batch`: state, bits, bytes, score, seconds, peak memory."""
    t = Table(title="hawqtool batch")
    for col in ("job", "run", "state", "bits/weight", "bytes", "score", "seconds", "peak RSS GiB"):
        t.add_column(col, justify="left" if col in ("job", "run", "state") else "right")
    for r in rows:
        score = "" if r["score"] is None else f"{r['score']:.4g} {r['score_kind']}"
        t.add_row(r["job"], r["run"], r["state"] if r["state"] == "done" else f"[red]{r['state']}[/red]",
                  "" if r["bits"] is None else f"{r['bits']:.3f}", "" if r["bytes"] is None else f"{r['bytes']:,.0f}",
                  score, f"{r['seconds']:.0f}", "" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}")
    return t
