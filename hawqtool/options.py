"""Each stage's settings and their one default (issue 17): the CLI flags, `RunConfig`/recipes and the library
functions take their defaults from these classes, and a test compares them by introspection. Pure Python, so the
CLI can read them without importing torch (fast --help)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

FISHER_OBJECTIVES = ("self-kl", "output-mse", "pooled-cosine")  # the sampled-label Fisher's (sensitivity/fisher.py)


@dataclass
class SensitivityOptions:
    """How per-layer sensitivity is measured (compute_sensitivity)."""

    objective: str = "self-kl"  # self-kl | labels | output-mse | pooled-cosine
    estimator: str = "auto"  # auto | hutchinson | fisher
    nsamples: int = 8  # calibration windows
    seqlen: int = 256
    batch_size: int = 2  # windows per probe
    target_rel_se: float = 0.10  # stop when every major layer's relative s.e. is below this
    min_probes: int = 8
    max_probes: int = 32
    # Widths whose ‖Q(W)−W‖² the report records, and so the ones `allocate` and `run` offer. 5 and 6 since 2026-12-07:
    # scripts/bench_alloc_signal.py --bits on the validation slice (benchmarks/RESULTS.md, 2026-12-07), SmolLM2, GPTQ
    # without tuning, 3 calibration seeds, the same bytes: median ppl 30.00 against 30.20 (2, 3, 4, 8) at 3.16 bits,
    # 23.68 against 23.76 at 3.67, 21.46 against 21.89 at 4.17: lower in the median at every budget, on 7 of 9 seeds.
    # GPTQ's export packs 2, 3, 4 and 8 only (`--bits 2,3,4,8` for it).
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_size: int = 128  # the one group size measured when group_sizes is ()
    # The storage formats the report measures, and so the ones the allocator offers by default: each layer's group
    # size among these, its group scales as 6-bit codes under one fp16 step per row (quantize/scale_codes.py; 16 =
    # fp16 scales). Chosen by scripts/bench_alloc_signal.py --max-bpw 3.1484 on the validation slice, at the default
    # run's bytes (benchmarks/RESULTS.md, 2026-12-06 "Scale codes at the default quantizer"): with the default
    # quantizer 24.91 against 26.29 for g128 with fp16 scales (seed 0); without tuning -9.7/-10.4/-8.6% (3 seeds).
    group_sizes: tuple[int, ...] = (32, 64, 128)
    scale_bits: int = 6
    sym: tuple[bool, ...] = (False, True)  # asymmetric and/or symmetric grids measured
    formats: tuple[str, ...] = ()  # ggml types measured too (allocate --formats)
    quantize_head: bool = False  # also measure an output head tied to the embedding (untied first)
    checkpoint_blocks: bool = False  # activation checkpointing of the blocks: less memory, one more forward
    # Weight of each window's first position in the inputs' importance that weights ‖Q(W)−W‖²; the CLI and `run`
    # pass QuantizeOptions' for causal LMs, so sensitivity and GPTQ's H weigh tokens alike.
    first_token_weight: float = 1.0
    only: str | None = None  # a regex: measure only the layers whose names it matches
    max_seconds: float | None = None  # stop probing after this long (the layers' estimates so far)
    eigen: bool = False  # also each layer's top Hessian eigenvalue (power iteration, HAWQ-V1)
    eigen_iters: int = 20  # its power-iteration limit per layer

    def groups(self) -> tuple[int, ...]:
        """The group sizes whose quantization error is measured."""
        return tuple(self.group_sizes) or (self.group_size,)

    def resolved_estimator(self) -> str:
        """What `auto` picks: the sampled-label Fisher for self-kl/output-mse (measured 8-19x cheaper at lower
        error, benchmarks/RESULTS.md 2026-11-24; its plan ties Hutchinson's once tuned, validation slice 2026-12-06,
        scripts/bench_alloc_signal.py and bench_grid.py), Hutchinson otherwise."""
        if self.estimator != "auto":
            return self.estimator
        return "fisher" if self.objective in FISHER_OBJECTIVES else "hutchinson"

    def fingerprint(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeOptions:
    """How the quantize stage runs (per-layer bits come from the plan)."""

    method: str = "gptq"  # gptq | rtn | aphq (block reconstruction: quantize/aphq_driver.py)
    act_mode: str = "dynamic"  # activation-quantized layers: per-token at run time, or static per-tensor
    act_calib: str = "mse"  # static ranges: minmax | percentile | mse (on the quantized network's inputs)
    blocksize: int = 128
    # the reference GPTQ's; 0.001 and 0.1 were no better on the validation slice over 3 seeds (scripts/bench_grid.py
    # --percdamp, RESULTS 2026-12-06 06:51–)
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    # Each group's scale/zero: "search" minimises the diag(H)-weighted error (quantize/grid.py),
    # "minmax" takes the group's range (GPTQ's reference rule).
    grid: str = "search"
    true_sequential: bool = True
    # Fit each layer to the float model's outputs (W x_fp) rather than its own on the quantized chain's inputs (W x):
    # GPTAQ's asymmetric calibration, so errors of earlier layers are compensated, not carried forward.
    float_target: bool = False
    # After GPTQ, tune each block's rounding (and optionally scales) by signed gradient descent on the block's output
    # error against the float model (quantize/tune.py, SignRound as in AutoRound): steps per block, 0 = off.
    # 50 steps, rounding only, MSE: chosen by scripts/bench_grid.py on the validation slice (benchmarks/RESULTS.md,
    # 2026-12-05 11:16 and 14:24): uniform 3-bit g128 32.89 -> 27.99 (20 steps) -> 27.72 (50); scales tuned too
    # 29.16, relative loss 28.52 (20 steps); loss "weighted" (first position ×64) 28.91 against mse's 27.72 (50 steps).
    tune_iters: int = 50
    tune_lr: float = 0.0  # the rounding offsets' signed step, decayed linearly to 0; 0 = 1 / tune_iters (AutoRound's)
    tune_scale_lr: float = 0.0  # the log-scales' step, relative to tune_lr (0 = scales stay GPTQ's)
    # The descent's forward and backward under autocast to this dtype (bfloat16: AutoRound's amp); the keep-or-not
    # comparison and the stored codes stay float32. float32 by scripts/bench_grid.py --tune-dtype on the validation
    # slice (RESULTS, 2026-12-06): uniform 3-bit g128, 128 windows, 50 steps: 26.46 float32, 27.04 bfloat16 (one
    # seed), the quantize 1.6x faster (a block's 50 steps 2.4x, scripts/bench_tune_block.py) on an AVX512-BF16 CPU.
    tune_dtype: str = "float32"  # float32 | bfloat16 | float16
    tune_loss: str = "mse"  # mse (AutoRound's) | relative (each token's output error over its norm) | weighted (mse,
    # each window's first position weighted first_token_weight, as in GPTQ's H)
    batch_size: int = 8
    # Weight of each calibration window's first position in H. That token becomes the
    # attention sink whose value vector every later token reads, so its error counts many
    # times over; at weight 1 GPTQ's v_proj loses to RTN on SmolLM2 (benchmarks/RESULTS.md).
    # 64 was chosen on the validation slice (60-80% of the text), not on the eval slice.
    first_token_weight: float = 64.0
    aphq_iters: int = 1000  # APHQ: optimisation steps per block
    aphq_mlp_relu: bool = True  # APHQ: GELU -> clamped ReLU with fc1/fc2 refit (MLP reconstruction)
    # Calibration windows (the CLI's; quantize_model takes the windows themselves). 128 (AutoRound's default count)
    # was chosen by scripts/bench_grid.py --nsamples on the validation slice (benchmarks/RESULTS.md, 2026-12-05
    # 21:16): uniform 3-bit g128 with 50 tuning steps 27.72 at 32 windows -> 26.46 at 128, the quantize ~1.4x longer.
    nsamples: int = 128
    # An encoder's (the CLI's and `run`'s default when no count is given: quantize.driver.nsamples_for): 512 windows
    # lowered 1 - cosine of the pooled embedding on every calibration seed, by 5.2% at 512 tokens and 10.6% at 128
    # (medians of 3 seeds), for 1.5-2x the quantize time: scripts/bench_encoder.py --nsamples on the validation slice
    # (benchmarks/RESULTS.md, 2026-12-07). A class constant, not a field: the windows themselves are the input.
    encoder_nsamples: ClassVar[int] = 512
    seqlen: int = 512

    def fingerprint(self) -> dict:
        """What the checkpoint depends on (the calibration size enters through the data key)."""
        fp = {k: v for k, v in asdict(self).items() if k not in ("nsamples", "seqlen")}
        if not self.float_target:  # added later: checkpoints made without them keep their fingerprint
            del fp["float_target"]
        if self.tune_dtype == "float32":  # added later: checkpoints made before it keep their fingerprint
            del fp["tune_dtype"]
        if not self.tune_iters:
            for k in ("tune_iters", "tune_lr", "tune_scale_lr", "tune_loss", "tune_dtype"):
                fp.pop(k, None)
        return fp


@dataclass
class EvalOptions:
    """The pinned evaluation protocol's settings (evaluate.py, README)."""

    data: str = "wiki"
    seqlen: int = 512
    windows: int = 40
    batch_size: int = 4

    def fingerprint(self) -> dict:
        return asdict(self)


@dataclass
class AllocateOptions:
    """The integer program's choices besides the budget (allocate_bits): which options each layer gets and which
    layers must agree."""

    group_sizes: tuple[int, ...] = ()  # group sizes offered (() = the stage's group_size, or every one the report measured)
    act_bits: tuple[int, ...] = (16,)  # 8 adds W8A8 options
    pins: dict = field(default_factory=dict)  # {layer regex: bits}
    allowed: dict = field(default_factory=dict)  # {layer regex: [bits, ...]}
    ties: tuple[str, ...] = ()  # regexes: the layers each matches get one width
    auto_ties: bool = False  # tie layers that read one input (q/k/v, gate/up)
    trace_ucb: float = 0.0  # z > 0: plan on max(Tr, 0) + z·s.e. (noisy near-zero traces buy no 2-bit layer)
    # 4..8: grouped layers store k-bit scale codes and one fp16 step per row (quantize/scale_codes.py), where that
    # saves bytes; 16: fp16 scales; None: as the report measured them (SensitivityOptions.scale_bits)
    scale_bits: int | None = None
    # budgets besides the size one (allocate/budgets.py), and what they need
    max_bytes: float | None = None  # size budget in bytes of the quantized layers (and of a quantized embedding),
    # instead of `run`'s avg_bits
    pairs: str = ""  # extra weight:activation pairs, e.g. "4:8,4:4"
    max_bops: float | None = None  # BOPs per token (MACs × weight bits × activation bits)
    bops_frac: float | None = None  # BOPs as a fraction of 16×16-bit BOPs
    latency_table: str | None = None  # layer × option → ms table (`hawqtool bench --latency-table`)
    max_latency_ms: float | None = None
    latency_frac: float | None = None  # latency as a fraction of the table's fp32 time
    sweep: bool = False  # also write the Pareto frontiers (plan.sweep.json/.png)

    def kwargs(self) -> dict:
        """allocate_bits' constraint keyword arguments (defaults left out, so the plan fingerprint is what it
        was); the budgets and what they need are built by the caller (run.py, cli/allocate_cmd.py)."""
        base = AllocateOptions()
        return {k: v for k, v in asdict(self).items() if k in CONSTRAINTS and v != getattr(base, k)}

    def needs_profile(self) -> bool:
        """BOPs budgets and activation-quantized options need the model's MACs/activation profile."""
        return (self.max_bops is not None or self.bops_frac is not None or min(self.act_bits) < 16
                or bool(self.pairs))


CONSTRAINTS = ("group_sizes", "act_bits", "pins", "allowed", "ties", "auto_ties", "trace_ucb", "scale_bits")

# The stage settings a recipe sets in its nested `sensitivity:` / `quantize:` sections: every field of the options
# class that is not already a top-level run setting (nsamples, seqlen, probes, bits, method, act_order, ...).
NESTED = {"sensitivity": (SensitivityOptions, ("objective", "estimator", "batch_size", "max_seconds", "checkpoint_blocks",
                                                 "quantize_head", "only", "eigen", "eigen_iters")),
          "allocate": (AllocateOptions, CONSTRAINTS + ("max_bytes", "pairs", "max_bops", "bops_frac", "latency_table",
                                                       "max_latency_ms", "latency_frac", "sweep")),
          "quantize": (QuantizeOptions, ("act_mode", "act_calib", "blocksize", "percdamp", "static_groups", "grid",
                                         "true_sequential", "float_target", "tune_iters", "tune_lr", "tune_scale_lr", "tune_loss", "tune_dtype", "batch_size", "first_token_weight",
                                         "aphq_iters", "aphq_mlp_relu"))}
