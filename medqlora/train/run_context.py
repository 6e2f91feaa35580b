"""The facts of one training run, resolved once at the start of train and passed down.

    ctx = run_context.build(params)     # device, precision, processes, strategy, fast path, optim
    ctx = ctx.with_attention(model)     # once the model is built and the fast path applied
    ctx.as_dict()                       # the "run" section of meta.json and metrics/train.json

Every phase of medqlora/train/training.py reads these from here instead of asking the environment
again, so the numbers a run records are the ones it ran with. Nothing volatile (no timing, no
commit): the adapter's meta.json must stay byte-identical between rebuilds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medqlora.core import cpu_numerics, modeling
from medqlora.core.config import Params
from medqlora.train import launch, planning
from medqlora.train.fast import attention, fastpath

STRATEGIES = ("single", "ddp", "fsdp")
FSDP_SKIPS_FAST_PATH = "train.fast_path: not applied under runner.distributed.strategy fsdp"


@dataclass(frozen=True)
class RunContext:
    """What this process trains with, after every fallback and launch fact is resolved."""
    precision: modeling.Precision
    world_size: int                  # processes training together (1 when not launched)
    rank: int                        # this process's global rank; 0 writes the outputs
    strategy: str                    # single | ddp | fsdp (what runs, not what was asked)
    fast_path: fastpath.Plan         # the train.fast_path switches that apply here
    optim: str                       # the optimizer that runs (fallbacks and fusion applied)
    optim_notes: tuple[str, ...]     # why optim differs from train.optim, when it does
    attn_implementation: str | None = None  # model.config._attn_implementation, once built

    @property
    def device(self) -> str:
        """"cuda" or "cpu"."""
        return self.precision.device

    @property
    def fsdp(self) -> bool:
        """FSDP-QLoRA: the base keeps one dtype per layer, LoRA tensors are gathered by hand."""
        return self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the stage's outputs."""
        return self.rank == 0

    @property
    def notes(self) -> tuple[str, ...]:
        """Every precision and optimizer fallback taken, for meta.json."""
        return (*self.precision.notes, *self.optim_notes)

    def with_attention(self, model) -> "RunContext":
        """This context with the attention kernel the built model's config names."""
        name = getattr(model.config, "_attn_implementation", None)
        return dataclasses.replace(self, attn_implementation=name)

    def as_dict(self) -> dict[str, Any]:
        """The record written to meta.json and metrics/train.json (JSON types only)."""
        fast = dataclasses.asdict(self.fast_path)
        fast["notes"] = list(fast["notes"])
        return {
            "device": self.device,
            "compute_dtype": str(self.precision.compute_dtype).removeprefix("torch."),
            "mixed_precision": launch.mixed_precision_of(self.precision),
            "world_size": self.world_size, "rank": self.rank, "strategy": self.strategy,
            "optim": self.optim, "fast_path": fast,
            "attn_implementation": self.attn_implementation,
            # what computes attention on packed batches under medqlora's own implementation
            "attention_kernel": (attention.kernel_name(self.device)
                                 if self.attn_implementation == attention.NAME
                                 else self.attn_implementation),
            # kernels, threads, SDPA kernel of a CPU run: equal on two machines, equal bytes
            "cpu_numerics": cpu_numerics.describe() if self.device == "cpu" else None,
        }


def strategy(params: Params, world_size: int) -> str:
    """single for one process; fsdp when launch.uses_fsdp (GPUs); else ddp (a CPU launch is
    always DDP over gloo, see launch.launch_command)."""
    if world_size == 1:
        return "single"
    return "fsdp" if launch.uses_fsdp(params) else "ddp"


def build(params: Params, precision: modeling.Precision | None = None) -> RunContext:
    """The context of this process: `precision` as resolved for the device (resolved here
    when None), the launch facts from the environment accelerate/torchrun set."""
    precision = precision or modeling.resolve_precision(params.quantization,
                                                        params.train.mixed_precision)
    world_size = launch.world_size()
    how = strategy(params, world_size)
    if how == "fsdp":  # its fused LoRA reads adapter weights FSDP keeps sharded: all off
        plan = fastpath.Plan.off((FSDP_SKIPS_FAST_PATH,))
    else:
        plan = fastpath.resolve(params.train.fast_path, precision.device)
    optim, notes = planning.effective_optim(params.train.optim, precision.device,
                                            plan.fused_optimizer)
    return RunContext(precision, world_size, launch.rank(), how, plan, optim, tuple(notes))
