"""The arithmetic of a training run: optimizer steps, warmup, batch per attempt, optimizer.

    plan = make_plan(params, rows=1000, batch=8, accum=2, processes=1)
    plan.total_steps, plan.warmup_steps      # 189, 6 with 3 epochs and warmup_ratio 0.03

Computed the way transformers 5 computes them, so the numbers in meta.json and
metrics/train.json are the ones the Trainer runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from medqlora.core.config import Params

log = logging.getLogger(__name__)
CUDA_ONLY_OPTIMS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")


def total_optimizer_steps(rows: int, batch: int, accum: int, epochs: float,
                          max_steps: int, processes: int = 1) -> int:
    """Optimizer steps the Trainer will run, computed the way transformers 5 does.

    max_steps > 0 wins. Otherwise: micro-batches per epoch = ceil(rows / batch); optimizer
    steps per epoch = ceil(micro-batches / accum); total = ceil(epochs x steps per epoch).
    E.g. 1,000 rows / batch 8 = 125 micro-batches; / accum 2 = 63 steps; x 3 epochs = 189.
    With several processes each takes every N-th micro-batch (accelerate shards the batches):
    125 micro-batches / 2 processes = 63 each; / accum 1 = 63 steps, as 1 x accum 2.
    """
    if max_steps > 0:
        return max_steps
    micro_batches = math.ceil(math.ceil(rows / batch) / processes)
    per_epoch = max(math.ceil(micro_batches / accum), 1)
    return math.ceil(epochs * per_epoch)


def warmup_steps(ratio: float, total_steps: int) -> int:
    """train.warmup_ratio -> warmup_steps (transformers 5 dropped the ratio): ceil(ratio x total).

    E.g. 0.03 x 189 = 5.67 -> 6 warmup steps; 0.03 x 10 = 0.3 -> 1; ratio 0 -> 0.
    """
    return math.ceil(ratio * total_steps - 1e-9)


def resolve_optim(name: str, device: str) -> tuple[str, list[str]]:
    """The optimizer this device can run, and the fallback note when it had to change."""
    if name in CUDA_ONLY_OPTIMS and device != "cuda":
        note = f"train.optim: {name} needs CUDA (bitsandbytes paged/8-bit); using adamw_torch"
        log.warning(note)
        return "adamw_torch", [note]
    return name, []


def effective_optim(name: str, device: str, fused: bool) -> tuple[str, list[str]]:
    """The optimizer that actually runs: resolve_optim, then the fast path's fused AdamW
    (`fused`: train.fast_path.fused_optimizer applies here) in place of adamw_torch."""
    optim, notes = resolve_optim(name, device)
    if fused and optim == "adamw_torch":
        optim = "adamw_torch_fused"  # the same update in one kernel (medqlora/train/fast/fastpath.py)
    return optim, notes


@dataclass(frozen=True)
class Plan:
    """What one attempt runs with (batch/accumulation change on CUDA OOM)."""
    batch: int
    accum: int
    total_steps: int
    warmup_steps: int
    processes: int = 1  # launched processes (GPUs) training together

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step: micro x accumulation x processes."""
        return self.batch * self.accum * self.processes


def make_plan(params: Params, rows: int, batch: int, accum: int, processes: int = 1) -> Plan:
    """Batch, steps and warmup for one attempt over `rows` training rows."""
    t = params.train
    total = total_optimizer_steps(rows, batch, accum, t.num_train_epochs, t.max_steps, processes)
    return Plan(batch, accum, total, warmup_steps(t.warmup_ratio, total), processes)
