"""The train stage: QLoRA on the prepared data with checkpoints, resume and early stopping.

    python stages/train.py --params params.yaml --data data/prepared --out models/adapter \
        --checkpoints checkpoints/train --live dvclive/train --metrics metrics/train.json

Reads top to bottom: load the base (NF4 through bitsandbytes, CPU too) -> prepare it for k-bit
training -> attach LoRA (or continue `train.init_adapter`) -> Hugging Face Trainer with our
collator, dvclive curves and early stopping -> resume from the newest complete checkpoint of
*this* config -> write the adapter (safetensors only) atomically with its meta.json, and
metrics/train.json. On CUDA out-of-memory the micro-batch halves and accumulation doubles
(same effective batch) and the run resumes.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medqlora import adapter_io, checkpoints, fastpath, launch, modeling, preflight
from medqlora.config import Params
from medqlora.outputs import atomic_dir, sha256_tree, write_json
from medqlora.provenance import write_meta

log = logging.getLogger(__name__)
SECTIONS = ("seed", "model", "quantization", "lora", "train")
CUDA_ONLY_OPTIMS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------- arithmetic

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


# ---------------------------------------------------------------- data

@dataclass
class Collator:
    """Pads a batch to its longest row: input_ids with the pad id, labels with -100.

    Unpacked rows get an attention_mask (1 on real tokens). Packed rows (train_packed.parquet)
    carry position_ids that restart at 0 for every example; they get no attention_mask, so
    transformers builds a block-diagonal causal mask from the position_ids and examples packed
    together do not attend to each other. Their padding is given positions 0..k-1 as well,
    which makes it one more (fully masked-out, label -100) "example".
    """
    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        packed = "position_ids" in rows[0]
        batch: dict[str, list] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for row in rows:
            size = len(row["input_ids"])
            pad = longest - size
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            if packed:
                batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * size + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def load_split(path: Path):
    """A prepared parquet file as a datasets.Dataset of the columns training uses."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage (`dvc repro prepare`)")
    names = pq.read_schema(path).names
    columns = [c for c in ("input_ids", "labels", "position_ids") if c in names]
    return Dataset(pq.read_table(path, columns=columns))


def load_data(data_dir: Path):
    """(train, val): train_packed.parquet when prepare packed, else train.parquet."""
    packed = data_dir / "train_packed.parquet"
    train = load_split(packed if packed.is_file() else data_dir / "train.parquet")
    val = load_split(data_dir / "val.parquet")
    log.info("train rows: %d (%s), val rows: %d", len(train),
             "packed" if packed.is_file() else "one example per row", len(val))
    return train, val


# ---------------------------------------------------------------- model

def find_adapter(path: str | Path) -> Path:
    """The adapter folder inside `path` (itself, or a package folder holding one)."""
    path = Path(path)
    candidates = [path] + sorted(p.parent for p in path.rglob("adapter_config.json"))
    for folder in candidates:
        if all((folder / name).is_file() for name in ADAPTER_FILES):
            return folder
    raise FileNotFoundError(f"train.init_adapter: {path} holds no {' + '.join(ADAPTER_FILES)}")


def build_model(params: Params, precision: modeling.Precision, lora_from: Path | None = None):
    """Base (4-bit or not) prepared for training, with a trainable LoRA adapter attached.

    `lora_from`: a checkpoint whose adapter_model.safetensors is loaded into the new adapter
    (FSDP resume: the Trainer's own FSDP checkpoints hold no LoRA weight; see adapter_io).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    base = modeling.load_base(params.model, params.quantization, precision)
    if params.quantization.load_in_4bit:
        modeling.keep_4bit_layout_trainable(base)  # see its docstring: a bitsandbytes CPU trap
    checkpointing = params.train.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks frozen-input grads
    # FSDP flattens each wrapped layer into one tensor of ONE dtype: peft's fp32 upcast of the
    # norms would break that, so under FSDP the base stays in the storage/compute dtype (as
    # TRL does for sharded QLoRA) and only checkpointing + input grads are set up.
    if params.quantization.load_in_4bit and not launch.uses_fsdp(params):
        # Casts norms/embeddings to fp32 for stability and enables input grads.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs=ckpt_kwargs)
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        base.enable_input_require_grads()
    if params.train.init_adapter:
        folder = find_adapter(params.train.init_adapter)
        log.info("continuing from adapter %s (its LoRA settings are kept)", folder)
        model = modeling.load_adapter(base, folder, trainable=True)
    else:
        model = get_peft_model(base, modeling.lora_config(params.lora))
    if lora_from is not None:
        log.info("FSDP resume: %d LoRA tensors loaded from %s",
                 adapter_io.load_lora(model, lora_from), lora_from)
    return model


def resolve_optim(name: str, device: str) -> tuple[str, list[str]]:
    """The optimizer this device can run, and the fallback note when it had to change."""
    if name in CUDA_ONLY_OPTIMS and device != "cuda":
        note = f"train.optim: {name} needs CUDA (bitsandbytes paged/8-bit); using adamw_torch"
        log.warning(note)
        return "adamw_torch", [note]
    return name, []


# ---------------------------------------------------------------- dvclive

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


def _callback(obj):
    """Wrap a duck-typed callback as a transformers TrainerCallback."""
    from transformers import TrainerCallback
    cls = type(type(obj).__name__, (TrainerCallback,), {
        name: getattr(obj, name) for name in ("on_train_begin", "on_log", "on_train_end",
                                              "on_step_begin", "on_step_end", "on_save",
                                              "on_pre_optimizer_step")
        if hasattr(obj, name)})
    return cls()


# ---------------------------------------------------------------- trainer

@dataclass(frozen=True)
class Plan:
    """What one attempt runs with (batch/accumulation change on CUDA OOM)."""
    batch: int
    accum: int
    total_steps: int
    warmup_steps: int
    optim: str
    notes: tuple[str, ...]
    processes: int = 1  # launched processes (GPUs) training together

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step: micro x accumulation x processes."""
        return self.batch * self.accum * self.processes


def make_plan(params: Params, rows: int, device: str, batch: int, accum: int) -> Plan:
    """Batch, steps and warmup for one attempt."""
    t = params.train
    processes = launch.world_size()
    total = total_optimizer_steps(rows, batch, accum, t.num_train_epochs, t.max_steps, processes)
    optim, notes = resolve_optim(t.optim, device)
    return Plan(batch, accum, total, warmup_steps(t.warmup_ratio, total), optim, tuple(notes),
                processes)


def training_args(params: Params, plan: Plan, precision: modeling.Precision, run_dir: Path,
                  fresh: bool):
    """TrainingArguments from the `train` section (names kept; see the schema)."""
    from transformers import TrainingArguments
    t = params.train
    early = t.early_stopping_patience > 0
    return TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=plan.batch, gradient_accumulation_steps=plan.accum,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=plan.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=plan.optim,
        bf16=precision.bf16, fp16=precision.fp16, use_cpu=precision.device == "cpu",
        logging_steps=t.logging_steps, eval_strategy="steps", eval_steps=t.eval_steps,
        eval_on_start=fresh,  # the starting validation loss, once per run (not on resume)
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model="eval_loss", greater_is_better=False,
        # The best checkpoint is kept out of rotation and its path lives in trainer_state.json,
        # so this survives a resume; it needs saves to land on evaluation steps.
        load_best_model_at_end=early and t.save_steps % t.eval_steps == 0,
        seed=params.seed, data_seed=params.seed,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, report_to="none", disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN: DivergenceGuard stops it
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # several processes: every LoRA weight gets a grad
    )


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumed from, read before training: save_total_limit may delete
    that folder while the run goes on."""
    path: Path
    step: int
    tokens_seen: int

    @classmethod
    def read(cls, path: Path) -> "ResumePoint":
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return cls(path, int(state.get("global_step", 0)),
                   int(state.get("num_input_tokens_seen", 0)))


def fit(params: Params, precision: modeling.Precision, tokenizer, data, run_dir: Path,
        live_dir: Path | None, plan: Plan):
    """One training attempt; returns (trainer, ResumePoint or None, seconds)."""
    from transformers import EarlyStoppingCallback, Trainer, set_seed
    set_seed(params.seed)  # LoRA init and dropout; data order comes from data_seed
    resume = checkpoints.latest_complete(run_dir)
    fsdp = launch.uses_fsdp(params)
    model = build_model(params, precision, lora_from=resume if fsdp else None)
    args = training_args(params, plan, precision, run_dir, fresh=resume is None)
    clock = StepClock()
    guard = DivergenceGuard(params.train.divergence_factor, params.train.divergence_steps,
                            scaled=precision.fp16)
    # The guard first: it must raise before dvclive logs a NaN and before a checkpoint is saved.
    callbacks = [_callback(guard), _callback(clock), _callback(StopAtEnd())]
    if live_dir is not None:  # None: no loss curves (runs outside DVC, e.g. bench/)
        callbacks.append(_callback(LiveCallback(live_dir)))
    lora_saver = adapter_io.SaveLoraInCheckpoints()
    if fsdp:  # whole LoRA tensors in every checkpoint (adapter_io)
        callbacks.append(_callback(lora_saver))
    if params.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(params.train.early_stopping_patience,
                                               params.train.early_stopping_threshold))
    # --- fast path (train.fast_path; medqlora/fastpath.py, measured by bench/bench_train.py) ---
    collator = Collator(tokenizer.pad_token_id)
    if fsdp:  # its fused LoRA reads adapter weights FSDP keeps sharded
        log.warning("train.fast_path: not applied under runner.distributed.strategy fsdp")
    else:
        model, collator, args = fastpath.apply(model, params, args, collator)
    # --- end fast path ---
    trainer = Trainer(model=model, args=args, train_dataset=data[0], eval_dataset=data[1],
                      data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks)
    trainer.step_clock = clock  # read by train_metrics
    lora_saver.trainer = trainer
    resumed = ResumePoint.read(resume) if resume is not None else None
    if resumed is not None:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NothingLeftToTrain:
        log.info("%s is the run's last step: its weights are the result", resume)
        trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)
    return trainer, resumed, time.perf_counter() - started


def fit_adaptive(params, precision, tokenizer, data, run_dir, live_dir):
    """fit(), halving the micro-batch and doubling accumulation on CUDA out-of-memory."""
    t = params.train
    # --- distributed: keep_effective_batch divides accumulation by the process count ---
    batch, accum = t.per_device_train_batch_size, launch.accumulation(params, launch.world_size())
    # --- end distributed ---
    while True:
        plan = make_plan(params, len(data[0]), precision.device, batch, accum)
        try:
            return (*fit(params, precision, tokenizer, data, run_dir, live_dir, plan), plan)
        except torch.cuda.OutOfMemoryError:
            if not (t.adaptive_batch_size and precision.device == "cuda" and batch > 1
                    and launch.world_size() == 1):  # one rank retrying alone would hang the rest
                raise
            log.warning("CUDA out of memory at per_device_train_batch_size=%d: retrying with "
                        "%d x %d accumulation (same effective batch %d); set "
                        "train.per_device_train_batch_size=%d to skip this next time",
                        batch, batch // 2, accum * 2, batch * accum, batch // 2)
            batch, accum = batch // 2, accum * 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- outputs

def peak_memory_gib(device: str) -> float:
    """CUDA max allocated, or the process's peak RSS on CPU (Linux reports KiB)."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def final_eval_loss(trainer) -> float:
    """Validation loss of the weights being saved, without a redundant extra pass.

    With load_best_model_at_end those are the best checkpoint's (state.best_metric); else the
    evaluation logged at the final step when there was one; else one more evaluation.
    """
    state = trainer.state
    if trainer.args.load_best_model_at_end and state.best_metric is not None:
        return float(state.best_metric)
    evals = [e for e in state.log_history if "eval_loss" in e]
    if evals and evals[-1].get("step") == state.global_step:
        return float(evals[-1]["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def train_metrics(trainer, plan: Plan, resumed: ResumePoint | None, seconds: float,
                  device: str) -> dict:
    """metrics/train.json: final losses, steps, throughput, memory, parameter counts."""
    state = trainer.state
    history = state.log_history
    # Each logged "loss" is the mean over its logging window; a run shorter than one window
    # only has the Trainer's whole-run mean ("train_loss").
    losses = [e["loss"] for e in history if "loss" in e] or [
        e["train_loss"] for e in history if "train_loss" in e]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    final_eval = final_eval_loss(trainer)
    tokens_at_resume = resumed.tokens_seen if resumed else 0
    trainable, total = modeling.trainable_parameters(trainer.model)
    tokens = int(state.num_input_tokens_seen)
    return {
        "train_loss": losses[-1] if losses else None,
        "eval_loss": final_eval,
        "eval_loss_start": evals[0] if evals else None,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": tokens,
        # None when this run trained nothing (resumed from the run's final checkpoint)
        "tokens_per_second": ((tokens - tokens_at_resume) / seconds
                              if seconds and tokens > tokens_at_resume else None),
        "step_seconds_median": trainer.step_clock.median() if hasattr(trainer, "step_clock")
        else None,
        # real tokens / positions computed, over the micro-batches the fast path's collator
        # made (training and validation); None when the plain collator ran
        "packing_efficiency": getattr(trainer.data_collator, "efficiency", None),
        "peak_memory_gib": peak_memory_gib(device),
        # every process's peak, rank order (collective: all ranks compute metrics)
        "peak_memory_gib_per_process": launch.gather(peak_memory_gib(device)),
        "trainable_params": trainable,
        "total_params": total,
        "effective_batch": plan.effective_batch,  # micro x accumulation x processes
        "num_processes": plan.processes,
        "per_device_train_batch_size": plan.batch,
        "gradient_accumulation_steps": plan.accum,
        "warmup_steps": plan.warmup_steps,
        "total_steps_planned": plan.total_steps,
        "resumed_from_step": resumed.step if resumed else 0,
    }


def base_info(params: Params) -> dict[str, Any]:
    """Which base weights the adapter belongs to (sha256 of a local folder, else null)."""
    model = params.model
    return {"id": model.base, "revision": model.revision,
            "sha256": sha256_tree(model.base) if model.is_local else None}


def _sort_target_modules(config_path: Path) -> None:
    """peft writes target_modules from a set, in hash order: sort it so equal runs give equal
    bytes (the package manifest and DVC hashes depend on them)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")


def save_adapter(trainer, tokenizer, params: Params, precision: modeling.Precision,
                 plan: Plan, data_dir: Path, out_dir: Path, base: dict[str, Any],
                 lora: dict | None = None) -> None:
    """models/adapter/: safetensors adapter, tokenizer and meta.json, written atomically."""
    inputs: dict[str, Path] = {"prepared": data_dir}
    init = find_adapter(params.train.init_adapter) if params.train.init_adapter else None
    if init is not None:
        inputs["init_adapter"] = init
    with atomic_dir(out_dir) as tmp:
        adapter_io.save(trainer, tmp, lora)  # lora: the tensors gathered under FSDP
        _sort_target_modules(tmp / "adapter_config.json")
        tokenizer.save_pretrained(str(tmp))
        write_meta(tmp, stage="train", params=params.section(*SECTIONS), inputs=inputs, extra={
            "precision": {
                "device": precision.device,
                "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
                "bf16": precision.bf16, "fp16": precision.fp16,
                "notes": [*precision.notes, *plan.notes],
            },
            "base": base,
            "init_adapter": str(init) if init else None,
            "effective": {"per_device_train_batch_size": plan.batch,
                          "gradient_accumulation_steps": plan.accum, "optim": plan.optim,
                          "warmup_steps": plan.warmup_steps, "num_processes": plan.processes,
                          "effective_batch": plan.effective_batch,
                          "strategy": (params.runner.distributed.strategy
                                       if plan.processes > 1 else None)},
        })


def diverged_outcome(params: Params, run_dir: Path, out_dir: Path,
                     metrics_path: str | Path) -> tuple[str, ...]:
    """What a diverged run left behind and what to change, one line each."""
    kept = checkpoints.checkpoints(run_dir)
    t, lora = params.train, params.lora
    return (
        f"nothing was published: {out_dir} and {metrics_path} were left as they were",
        f"last good checkpoint: {kept[0]} (kept)" if kept else
        f"no checkpoint had been saved yet (train.save_steps: {t.save_steps})",
        f"lower train.learning_rate ({t.learning_rate:g}) or lora.lora_alpha "
        f"({lora.lora_alpha:g}), or clip harder with train.max_grad_norm ({t.max_grad_norm:g}); "
        "changing them starts a fresh run (a re-run with the same params resumes from the "
        "checkpoint above and diverges again)",
    )


def run(params: Params, data_dir: str | Path, out_dir: str | Path, checkpoints_dir: str | Path,
        live_dir: str | Path | None, metrics_path: str | Path) -> dict[str, Any]:
    """The whole train stage; returns the metrics written to `metrics_path`.

    `live_dir` None writes no dvclive curves (`--live none`: runs outside DVC, such as the
    GPU benchmarks, where dvc and dvclive need not be installed).
    """
    launch.join_launch()  # a launched worker dies with its launcher, never trains on orphaned
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    precision = modeling.resolve_precision(params.quantization, params.train.mixed_precision)
    # --- preflight (medqlora/preflight.py): WontFit (exit 3) before loading anything ---
    preflight.check(params)
    # --- end preflight ---
    data = load_data(data_dir)
    base = base_info(params)  # hashed once: it names the checkpoint folder and goes in meta.json
    # FSDP checkpoints (sharded) cannot resume a DDP/single run or the reverse: own folder.
    fsdp = {"fsdp": True} if launch.uses_fsdp(params) else {}
    key = checkpoints.fingerprint({**params.section(*SECTIONS), "base": base, **fsdp},
                                  sha256_tree(data_dir))
    run_dir = Path(checkpoints_dir) / key
    log.info("checkpoints: %s (fingerprint of params + prepared data)", run_dir)
    tokenizer = modeling.load_tokenizer(params.model)
    try:
        trainer, resumed, seconds, plan = fit_adaptive(params, precision, tokenizer, data,
                                                       run_dir, Path(live_dir) if live_dir else None)
    except Diverged as err:
        raise Diverged(err.step, err.reason, diverged_outcome(params, run_dir, out_dir,
                                                              metrics_path)) from None
    metrics = train_metrics(trainer, plan, resumed, seconds, precision.device)
    # --- distributed: every rank joins the FSDP gather; only rank 0 writes the outputs ---
    lora = adapter_io.gather_lora(trainer.model) if trainer.is_fsdp_enabled else None
    if not launch.is_main():
        return metrics
    # --- end distributed ---
    save_adapter(trainer, tokenizer, params, precision, plan, data_dir, out_dir, base, lora)
    write_json(metrics_path, metrics)
    log.info("train: step %d, eval loss %.4f -> %.4f, %.0f tokens/s", metrics["global_step"],
             metrics["eval_loss_start"] or float("nan"), metrics["eval_loss"],
             metrics["tokens_per_second"] or 0)
    return metrics
