"""The Trainer callbacks of the train stage: curves, step clock, stop at the end, divergence,
tokens seen.

    callbacks = [as_trainer_callback(DivergenceGuard(4.0, 20)), ...]   # medqlora/train/training.py

Each is a plain class with the Trainer's hook names (testable without a Trainer);
`as_trainer_callback` turns one into a transformers.TrainerCallback.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from medqlora.train.collation import REAL_TOKENS


class LiveCallback:
    """Per-step loss, learning rate, grad norm and eval loss into dvclive (x: step).

    On resume the checkpoint's log history is replayed first, so the curves are whole.
    """

    KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate",
            "grad_norm": "train/grad_norm", "eval_loss": "eval/loss"}

    def __init__(self, live_dir: Path):
        self.dir, self.live = live_dir, None

    def _log(self, entry: dict[str, Any], step: int) -> None:
        values = {name: entry[key] for key, name in self.KEYS.items() if key in entry}
        if self.live is None or not values:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, float(value))
        self.live.make_summary()

    def on_train_begin(self, args, state, control, **kwargs):
        from dvclive import Live
        if state.is_world_process_zero:
            self.live = Live(str(self.dir), resume=False, save_dvc_exp=False, dvcyaml=None)
            for entry in state.log_history:
                self._log(entry, entry.get("step", 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._log(logs or {}, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
            self.live = None


class StepClock:
    """Wall-clock seconds between optimizer steps; the median ignores evals/saves in between.

    Steady-state throughput (bench/bench_distributed.py) = tokens per step / this median.
    """

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def median(self) -> float | None:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return statistics.median(gaps) if gaps else None


class NothingLeftToTrain(Exception):
    """Raised by StopAtEnd: the run resumed from its final checkpoint."""


class StopAtEnd:
    """Train no step past max_steps when resuming from the run's final checkpoint.

    The Trainer (transformers 5.x) enters its step loop before checking max_steps, so a run
    killed after its last checkpoint but before its outputs were written would train one step
    more on the re-run than the undisturbed run did. This stops it before that step's forward,
    after the checkpoint's weights, optimizer and state have been loaded.
    """

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise NothingLeftToTrain


class Diverged(RuntimeError):
    """Raised by DivergenceGuard: the run stopped before publishing anything."""

    def __init__(self, step: int, reason: str, outcome: tuple[str, ...] = ()):
        self.step, self.reason, self.outcome = step, reason, outcome
        super().__init__("\n".join([f"train: diverged at step {step}: {reason}", *outcome]))


class DivergenceGuard:
    """Stops a diverging run before it can publish an adapter or write a NaN metric.

    - Before every optimizer step the trainable weights' gradients must be finite: a NaN or
      infinite loss makes them non-finite, and clipping keeps them so (0.3 / nan = nan), so the
      step that would write NaN into the weights never runs and every checkpoint stays finite.
    - Every logged loss, grad_norm and eval_loss must be finite (training_args turns off the
      Trainer's logging_nan_inf_filter, which would log the running mean in place of a NaN).
    - The training loss may not stay above `factor` x its first logged value for `steps`
      optimizer steps; while it is above, no checkpoint is saved, so the newest one on disk is
      from before the loss took off (e.g. factor 4: a run starting at 2.5 stops above 10).
    With fp16 the loss scaler skips steps whose gradients overflow (that is how it finds its
    scale), so only the losses are checked there. Raises Diverged; train.run adds what was kept.
    """

    def __init__(self, factor: float | None, steps: int, scaled: bool = False):
        self.factor, self.steps, self.scaled = factor, steps, scaled
        self.start: float | None = None   # the run's first logged training loss
        self.last_ok = 0                  # last logged step within factor x start
        self.above = False
        self.trainable: list | None = None

    def _track(self, loss: float, step: int) -> None:
        self.start = loss if self.start is None else self.start
        self.above = self.factor is not None and self.start > 0 and loss > self.factor * self.start
        if not self.above:
            self.last_ok = step

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.last_ok, self.above = None, 0, False
        for entry in state.log_history:  # on resume: the checkpoint's history
            if "loss" in entry:
                self._track(entry["loss"], entry.get("step", 0))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.scaled or model is None:
            return
        if self.trainable is None:  # the adapter's tensors: a few hundred of a model's thousands
            self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = [(name, p.grad) for name, p in self.trainable if p.grad is not None]
        grads = [(name, g.to_local() if hasattr(g, "to_local") else g) for name, g in grads]
        grads = [(name, g) for name, g in grads if g.numel()]
        if not grads:
            return
        peaks = torch.stack([g.detach().abs().amax().float() for _, g in grads])
        if not bool(torch.isfinite(peaks).all()):  # one device sync per step
            bad = [name for (name, _), ok in zip(grads, torch.isfinite(peaks).tolist()) if not ok]
            raise Diverged(state.global_step + 1, f"the gradient is not finite in {len(bad)} of "
                           f"{len(grads)} trainable tensors (first: {bad[0]}); the loss or its "
                           "gradient overflowed, the optimizer step was not taken")

    def on_step_end(self, args, state, control, **kwargs):
        if self.above:
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "eval_loss") + (() if self.scaled else ("grad_norm",)):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                raise Diverged(state.global_step, f"{key} is {value}")
        if "loss" in logs:
            self._track(logs["loss"], state.global_step)
            if self.above and state.global_step - self.last_ok >= self.steps:
                raise Diverged(state.global_step, (
                    f"the training loss ({logs['loss']:.4g}) has stayed above "
                    f"train.divergence_factor x its first logged value ({self.factor:g} x "
                    f"{self.start:.4g} = {self.factor * self.start:.4g}) for "
                    f"{state.global_step - self.last_ok} steps (train.divergence_steps: "
                    f"{self.steps})"))
        if self.above:
            control.should_save = False


class TokensSeen:
    """state.num_input_tokens_seen counted on the host, without a sync every micro-batch.

    transformers' own count (TrainingArguments.include_num_input_tokens_seen) puts each
    micro-batch's count on the device, gathers it and reads it back: the host waits there for
    the GPU to finish the micro-batch, and the GPU then waits for the host to launch the next
    one (Mistral-7B, 1 x 2048-token micro-batches as CUDA graphs: ~13 ms idle a micro-batch;
    bench/README.md). Here collation.WithTokenCount adds each batch's real token count to the
    batch as an int; a forward pre-hook on the model takes it off and adds it up when the model
    trains (not in evaluation); each step end adds the step's tokens, summed over processes, to
    the state that checkpoints save and a resume continues from.
    """

    def __init__(self, model):
        self.pending = 0
        self.handle = model.register_forward_pre_hook(self._take, with_kwargs=True)

    def _take(self, module, args, kwargs):
        tokens = kwargs.pop(REAL_TOKENS, None)
        if tokens is not None and module.training and torch.is_grad_enabled():
            self.pending += tokens
        return args, kwargs

    def on_step_end(self, args, state, control, **kwargs):
        state.num_input_tokens_seen += _summed_over_processes(self.pending)
        self.pending = 0


def _summed_over_processes(value: int) -> int:
    """`value` summed over the processes of a distributed run (itself in a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def as_trainer_callback(obj):
    """Wrap a duck-typed callback as a transformers TrainerCallback."""
    from transformers import TrainerCallback
    cls = type(type(obj).__name__, (TrainerCallback,), {
        name: getattr(obj, name) for name in ("on_train_begin", "on_log", "on_train_end",
                                              "on_step_begin", "on_step_end", "on_save",
                                              "on_pre_optimizer_step")
        if hasattr(obj, name)})
    return cls()
