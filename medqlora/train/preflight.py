"""Preflight: the peak GPU memory of each stage of the configured run, before anything loads.

    medqlora preflight params.yaml       # train table + evaluate and merge; exit 3 when one won't fit

The arithmetic lives in medqlora/core/memory.py (one memory model, no params); this module reads
the params (train, data.max_seq_length, runner.distributed for the process count and FSDP;
evaluate and merge for `medqlora preflight`) and names the knob to turn. The train stage runs
`check` (train only) before loading anything.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from medqlora.core.memory import (DTYPE_BYTES, GIB, PROJECTIONS, Arch, CannotEstimate, Estimate,
                                  Setup, device_limit, estimate, estimate_evaluate, estimate_merge,
                                  fits, inference_weights, keeps_dropout_copies, kv_cache_bytes,
                                  read_model_config, table)

EXIT_WONT_FIT = 3


class WontFit(RuntimeError):
    """The train stage's estimated peak exceeds the limit (the message names what to change)."""


def setup_from(params, device: str = "cuda") -> Setup:
    """The Setup of a Params as it would run on `device` (fast path auto = on for CUDA)."""
    from medqlora.train.fast.fastpath import micro_batch_rows, resolve
    t, q, fast = params.train, params.quantization, params.train.fast_path
    dist = params.runner.distributed
    fsdp = dist.strategy == "fsdp" and dist.num_processes > 1
    plan = resolve(fast if not fsdp else replace(fast, enabled="off"), device)
    if device == "cuda" and fast.enabled != "off" and not fsdp:  # not applied under FSDP
        # Planned on a host without liger-kernel: assume the GPU image has it (it does).
        plan = replace(plan, fused_kernels=fast.fused_kernels,
                       fused_cross_entropy=fast.fused_cross_entropy)
    targets = PROJECTIONS if params.lora.target_modules == "all-linear" else \
        tuple(params.lora.target_modules)
    checkpointing = t.gradient_checkpointing and plan.checkpoint_policy != "none"
    # with checkpointing the estimate holds one layer while it is recomputed
    copies = keeps_dropout_copies(params.lora.lora_dropout > 0, plan.fused_lora,
                                  recomputed=checkpointing)
    return Setup(
        batch=micro_batch_rows(t.per_device_train_batch_size, params.data.max_seq_length,
                               plan.micro_batch_tokens),
        seq=params.data.max_seq_length,
        load_in_4bit=q.load_in_4bit, double_quant=q.bnb_4bit_use_double_quant,
        compute_bytes=DTYPE_BYTES[q.bnb_4bit_compute_dtype], r=params.lora.r, targets=targets,
        optim=t.optim, checkpointing=checkpointing,
        fast_frozen_bf16=plan.frozen_in_compute_dtype, fast_kernels=plan.fused_kernels,
        fused_ce=plan.fused_cross_entropy, dropout_copies=copies,
        swiglu_recomputed=plan.fused_lora, cuda_graphs=plan.cuda_graphs,
        world=dist.num_processes,
        strategy=dist.strategy)


def advice(arch: Arch, setup: Setup, limit: int, accum: int) -> list[str]:
    """Single knob changes that would fit under `limit`, most useful first."""
    hints = []
    if not setup.checkpointing and fits(arch, replace(setup, checkpointing=True), limit):
        hints.append("enable train.gradient_checkpointing (true) would fit")
    batch = setup.batch // 2
    while batch >= 1 and not fits(arch, replace(setup, batch=batch), limit):
        batch //= 2
    if batch >= 1:
        factor = setup.batch // batch
        hints.append(f"train.per_device_train_batch_size: {setup.batch} -> {batch} would fit "
                     f"(gradient_accumulation_steps {accum} -> {accum * factor} keeps the "
                     "effective batch)")
    seq = setup.seq // 2
    while seq >= 64 and not fits(arch, replace(setup, seq=seq), limit):
        seq //= 2
    if seq >= 64:
        hints.append(f"data.max_seq_length: {setup.seq} -> {seq} would fit")
    if not hints:
        hints.append(f"even train.per_device_train_batch_size 1 needs "
                     f"{estimate(arch, replace(setup, batch=1)).total / GIB:.1f} GiB: lower "
                     "lora.r, use an 8-bit optimizer (train.optim: paged_adamw_8bit) or a "
                     "larger GPU")
    return hints


@dataclass
class Verdict:
    """Outcome of a preflight: the report lines and whether the run may start."""
    ok: bool
    lines: list[str]
    estimate: Estimate | None = None


def train_report(arch: Arch, params, limit: int | None, what: str) -> tuple[bool, list[str], Estimate]:
    """The train stage's estimate against the limit, with the knob to turn when it won't fit."""
    setup = setup_from(params, "cuda")
    est = estimate(arch, setup)
    lines = [f"preflight: {params.model.base}, {setup.batch} x {setup.seq} tokens per "
             f"micro-batch, LoRA r={setup.r}, checkpointing={setup.checkpointing}"
             + (f", {setup.strategy} over {setup.world} processes" if setup.world > 1 else ""),
             table(est)]
    if limit is None:
        return True, lines + [f"no limit to check against ({what})"], est
    if est.total <= limit:
        return True, lines + [f"fits: {est.total / GIB:.2f} GiB <= {what}"], est
    lines.append(f"will not fit: estimated {est.total / GIB:.2f} GiB > {what}")
    lines += [f"  {hint}" for hint in advice(arch, setup, limit,
                                             params.train.gradient_accumulation_steps)]
    return False, lines, est


@dataclass(frozen=True)
class LaterStages:
    """What evaluate and merge are sized by (from the `evaluate` and `merge` sections; the
    train stage never reads those, so `medqlora preflight` passes them in)."""
    batch_size: int
    max_examples: int | None
    max_new_tokens: int
    merge_enabled: bool
    merge_dtype: str


def later_stages_report(arch: Arch, setup: Setup, later: LaterStages, prompt: int,
                        limit: int | None, what: str) -> tuple[bool, list[str]]:
    """evaluate and merge, estimated from the same config (prompts bounded by
    data.max_seq_length, so the evaluate figure is an upper bound)."""
    rows = min(later.batch_size, later.max_examples or later.batch_size)
    if limit is not None:  # medqlora.evaluate.generation caps rows so the KV cache takes <= half the free
        free = limit - sum(inference_weights(arch, setup).values())
        per_row = kv_cache_bytes(arch, prompt + later.max_new_tokens, setup.compute_bytes)
        rows = max(1, min(rows, free // 2 // per_row))
    evaluate = estimate_evaluate(arch, setup, rows, prompt, later.max_new_tokens)
    lines = [f"evaluate: at most {evaluate.total / GIB:.2f} GiB ({rows} rows generated together, "
             f"prompts <= {prompt} + {later.max_new_tokens} new tokens)"]
    if not later.merge_enabled:
        return True, lines + ["merge: disabled"]
    merge = estimate_merge(arch, setup, prompt)
    lines.append(f"merge: {merge.total / GIB:.2f} GiB (the base in float32, as the merge "
                 f"computes it; stored as {later.merge_dtype})")
    if limit is not None and merge.total > limit:
        lines.append(f"merge will not fit: estimated {merge.total / GIB:.2f} GiB > {what}; the "
                     "merge stage will then ship the adapter alone (set merge.enabled: false "
                     "to say so up front, or merge on a larger GPU)")
        return False, lines
    return True, lines


def preflight(params, later: LaterStages | None = None) -> Verdict:
    """Estimate train's peak (and evaluate's and merge's with `later`), compare with the limit,
    name the knob when one won't fit."""
    try:
        arch = Arch.from_config(read_model_config(params.model))
    except CannotEstimate as err:
        return Verdict(True, [f"warning: {err}"])
    except KeyError as err:
        return Verdict(True, [f"warning: model.base: config.json has no {err}; cannot estimate"])
    limit, what = device_limit(params.train.memory_budget_gib)
    ok, lines, est = train_report(arch, params, limit, what)
    if later is not None:
        later_ok, more = later_stages_report(arch, setup_from(params, "cuda"), later,
                                             params.data.max_seq_length, limit, what)
        ok, lines = ok and later_ok, lines + more
    return Verdict(ok, lines, est)


def check(params) -> None:
    """The train stage's preflight: log the estimate; raise WontFit (the stage exits 3) naming
    the knob when it won't fit."""
    import logging
    verdict = preflight(params)
    log = logging.getLogger(__name__)
    for line in "\n".join(verdict.lines).splitlines():
        level = logging.WARNING if line.startswith("warning") else (
            logging.INFO if verdict.ok else logging.ERROR)
        log.log(level, line)
    if not verdict.ok:
        raise WontFit("train: refusing to start, the estimated peak memory exceeds the limit; "
                      "change one of the settings above (`medqlora preflight` re-checks)")
