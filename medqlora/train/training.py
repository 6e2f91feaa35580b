"""The train stage as one recipe: setup -> train -> save (torchtune's recipe shape).

    python stages/train.py --params params.yaml --data data/prepared --out models/adapter \
        --checkpoints checkpoints/train --live dvclive/train --metrics metrics/train.json \
        --measured metrics/measured/train.json

`run` at the bottom is the whole stage, read top to bottom:
- setup: resolve the run context once (device, precision, processes, strategy, fast path,
  optimizer: medqlora/train/run_context.py), check the memory preflight, load the prepared data and
  the tokenizer, pick the checkpoint folder of *this* config.
- train: load the base (NF4 through bitsandbytes, CPU too) -> prepare it for k-bit training ->
  attach LoRA (or continue `train.init_adapter`) -> the fast path -> the Hugging Face Trainer
  with our collator (medqlora/train/collation.py) and callbacks (medqlora/train/callbacks.py: dvclive
  curves, divergence guard, early stopping) -> resume from the newest complete checkpoint. On
  CUDA out-of-memory the micro-batch halves and accumulation doubles (same effective batch;
  the arithmetic is medqlora/train/planning.py) and the run resumes.
- save: the adapter (safetensors only) atomically with its meta.json, and metrics/train.json;
  both record the run context ("run"). What this machine measured (speed, memory, the resume)
  goes to metrics/measured/train.json instead (MEASURED).
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medqlora.core import cpu_numerics, modeling
from medqlora.core.config import Params
from medqlora.core.outputs import atomic_dir, sha256_tree, write_json
from medqlora.core.provenance import write_meta
from medqlora.train import adapter_io, checkpoints, launch, preflight, run_context
from medqlora.train.callbacks import (Diverged, DivergenceGuard, LiveCallback, NothingLeftToTrain,
                                      StepClock, StopAtEnd, TokensSeen, as_trainer_callback)
from medqlora.train.collation import Collator, WithTokenCount
from medqlora.train.fast import fastpath
from medqlora.train.planning import Plan, make_plan
from medqlora.train.run_context import RunContext

log = logging.getLogger(__name__)
SECTIONS = ("seed", "model", "quantization", "lora", "train")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What two runs of the same inputs measure differently (wall clock, memory high-water marks,
# whether this run was interrupted and resumed). They go to a file of their own, neither
# git-tracked nor a DVC output (metrics/measured/, git-ignored), so that metrics/train.json,
# its hash in dvc.lock and the package hold only what the same inputs always give, and
# `make repro` leaves `git status` clean on any machine.
MEASURED = ("tokens_per_second", "step_seconds_median", "peak_memory_gib",
            "peak_memory_gib_per_process", "resumed_from_step")


# ---------------------------------------------------------------- setup

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


def find_adapter(path: str | Path) -> Path:
    """The adapter folder inside `path` (itself, or a package folder holding one)."""
    path = Path(path)
    candidates = [path] + sorted(p.parent for p in path.rglob("adapter_config.json"))
    for folder in candidates:
        if all((folder / name).is_file() for name in ADAPTER_FILES):
            return folder
    raise FileNotFoundError(f"train.init_adapter: {path} holds no {' + '.join(ADAPTER_FILES)}")


def build_model(params: Params, precision: modeling.Precision, lora_from: Path | None = None,
                fsdp: bool = False):
    """Base (4-bit or not) prepared for training, with a trainable LoRA adapter attached.

    `lora_from`: a checkpoint whose adapter_model.safetensors is loaded into the new adapter
    (FSDP resume: the Trainer's own FSDP checkpoints hold no LoRA weight; see adapter_io).
    `fsdp`: the run shards the model (RunContext.fsdp).
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
    if params.quantization.load_in_4bit and not fsdp:
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


def training_args(params: Params, ctx: RunContext, plan: Plan, run_dir: Path, fresh: bool):
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
        max_grad_norm=t.max_grad_norm, optim=ctx.optim,
        bf16=ctx.precision.bf16, fp16=ctx.precision.fp16, use_cpu=ctx.device == "cpu",
        logging_steps=t.logging_steps, eval_strategy="steps", eval_steps=t.eval_steps,
        eval_on_start=fresh,  # the starting validation loss, once per run (not on resume)
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model="eval_loss", greater_is_better=False,
        # The best checkpoint is kept out of rotation and its path lives in trainer_state.json,
        # so this survives a resume; it needs saves to land on evaluation steps.
        load_best_model_at_end=early and t.save_steps % t.eval_steps == 0,
        seed=params.seed, data_seed=params.seed,
        include_num_input_tokens_seen="no",  # counted on the host instead: host_counts
        remove_unused_columns=False, report_to="none", disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN: DivergenceGuard stops it
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # several processes: every LoRA weight gets a grad
    )


def host_counts(model, collator):
    """What the Trainer counts after every micro-batch, counted without making the GPU wait:
    returns (collator, TokensSeen callback).

    - Tokens seen: see callbacks.TokensSeen (transformers' count syncs host and GPU).
    - FLOPs (state.total_flos): the Trainer asks num_parameters(exclude_embeddings=True) of the
      model (transformers 5.24 directly, 5.17 through model.floating_point_ops), which walks
      every module and parameter anew: ~10 ms of host time a micro-batch on a 7B model. The
      count cannot change while training, so that question is answered once.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "num_parameters"):
        counted, cache = inner.num_parameters, {}

        def num_parameters(only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
            if only_trainable or not exclude_embeddings:
                return counted(only_trainable=only_trainable,
                               exclude_embeddings=exclude_embeddings)
            if "count" not in cache:
                cache["count"] = counted(exclude_embeddings=True)
            return cache["count"]

        model.num_parameters = inner.num_parameters = num_parameters
    return WithTokenCount(collator), TokensSeen(model)


def trainer_callbacks(params: Params, ctx: RunContext, live_dir: Path | None):
    """The Trainer callbacks of one attempt: (list for the Trainer, StepClock, LoRA saver)."""
    from transformers import EarlyStoppingCallback
    clock = StepClock()
    guard = DivergenceGuard(params.train.divergence_factor, params.train.divergence_steps,
                            scaled=ctx.precision.fp16)
    # The guard first: it must raise before dvclive logs a NaN and before a checkpoint is saved.
    callbacks = [as_trainer_callback(guard), as_trainer_callback(clock),
                 as_trainer_callback(StopAtEnd())]
    if live_dir is not None:  # None: no loss curves (runs outside DVC, e.g. bench/)
        callbacks.append(as_trainer_callback(LiveCallback(live_dir)))
    lora_saver = adapter_io.SaveLoraInCheckpoints()
    if ctx.fsdp:  # whole LoRA tensors in every checkpoint (adapter_io)
        callbacks.append(as_trainer_callback(lora_saver))
    if params.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(params.train.early_stopping_patience,
                                               params.train.early_stopping_threshold))
    return callbacks, clock, lora_saver


# ---------------------------------------------------------------- train

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


@dataclass
class Attempt:
    """A finished training attempt: what save and the metrics read."""
    trainer: Any
    resumed: ResumePoint | None
    seconds: float
    plan: Plan
    ctx: RunContext  # with the attention kernel of the model that trained


def fit(params: Params, ctx: RunContext, tokenizer, data, run_dir: Path,
        live_dir: Path | None, plan: Plan) -> Attempt:
    """One training attempt with the batch/accumulation of `plan`."""
    from transformers import Trainer, set_seed
    set_seed(params.seed)  # LoRA init and dropout; data order comes from data_seed
    resume = checkpoints.latest_complete(run_dir, is_main=ctx.is_main)
    model = build_model(params, ctx.precision, lora_from=resume if ctx.fsdp else None,
                        fsdp=ctx.fsdp)
    args = training_args(params, ctx, plan, run_dir, fresh=resume is None)
    callbacks, clock, lora_saver = trainer_callbacks(params, ctx, live_dir)
    # The fast path (train.fast_path; measured by bench/bench_train.py): off under FSDP and,
    # by default, on CPU; ctx.fast_path says which switches apply.
    model, collator, args = fastpath.apply(model, params, args, Collator(tokenizer.pad_token_id),
                                           plan=ctx.fast_path)
    collator, tokens = host_counts(model, collator)
    callbacks.append(as_trainer_callback(tokens))
    ctx = ctx.with_attention(model)
    log.info("run: %s", json.dumps(ctx.as_dict(), sort_keys=True))
    trainer = Trainer(model=model, args=args, train_dataset=data[0], eval_dataset=data[1],
                      data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
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
    return Attempt(trainer, resumed, time.perf_counter() - started, plan, ctx)


def fit_adaptive(params: Params, ctx: RunContext, tokenizer, data, run_dir: Path,
                 live_dir: Path | None) -> Attempt:
    """fit(), halving the micro-batch and doubling accumulation on CUDA out-of-memory."""
    t = params.train
    # keep_effective_batch divides accumulation by the process count
    batch, accum = t.per_device_train_batch_size, launch.accumulation(params, ctx.world_size)
    while True:
        plan = make_plan(params, len(data[0]), batch, accum, ctx.world_size)
        try:
            return fit(params, ctx, tokenizer, data, run_dir, live_dir, plan)
        except torch.cuda.OutOfMemoryError:
            if not (t.adaptive_batch_size and ctx.device == "cuda" and batch > 1
                    and ctx.world_size == 1):  # one rank retrying alone would hang the rest
                raise
            log.warning("CUDA out of memory at per_device_train_batch_size=%d: retrying with "
                        "%d x %d accumulation (same effective batch %d); set "
                        "train.per_device_train_batch_size=%d to skip this next time",
                        batch, batch // 2, accum * 2, batch * accum, batch // 2)
            batch, accum = batch // 2, accum * 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- save

def peak_memory_gib(device: str, graph_pools: bool = False) -> float:
    """CUDA max allocated (max reserved when CUDA graphs replayed: their private pools are
    invisible to the allocated count), or the process's peak RSS on CPU (Linux reports KiB)."""
    if device == "cuda" and torch.cuda.is_available():
        if graph_pools:
            return torch.cuda.max_memory_reserved() / 2**30
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


def train_metrics(attempt: Attempt) -> dict:
    """Final losses, steps, throughput, memory, parameter counts, the run (split_measured
    parts them into metrics/train.json and metrics/measured/train.json)."""
    trainer, plan, resumed, seconds = attempt.trainer, attempt.plan, attempt.resumed, \
        attempt.seconds
    device = attempt.ctx.device
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
    graphed = getattr(trainer.model, "medqlora_graphs", None)   # train.fast_path.cuda_graphs
    peak = peak_memory_gib(device, graph_pools=graphed is not None and graphed.replays > 0)
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
        "peak_memory_gib": peak,
        # every process's peak, rank order (collective: all ranks compute metrics)
        "peak_memory_gib_per_process": launch.gather(peak),
        # layers graphed, micro-batches replayed / run eagerly (None: cuda_graphs off)
        "cuda_graphs": graphed.summary() if graphed else None,
        "trainable_params": trainable,
        "total_params": total,
        "effective_batch": plan.effective_batch,  # micro x accumulation x processes
        "num_processes": plan.processes,
        "per_device_train_batch_size": plan.batch,
        "gradient_accumulation_steps": plan.accum,
        # rows one forward/backward pass held: train.fast_path.micro_batch_tokens may split
        # the per-device batch (and accumulate over the pieces)
        "micro_batch_rows": trainer.args.per_device_train_batch_size,
        "warmup_steps": plan.warmup_steps,
        "total_steps_planned": plan.total_steps,
        "resumed_from_step": resumed.step if resumed else 0,
        "run": attempt.ctx.as_dict(),
    }


def measured_beside(metrics_path: str | Path) -> Path:
    """Where the measured facts go by default: measured/<name> in the metrics file's folder
    (metrics/train.json -> metrics/measured/train.json)."""
    metrics_path = Path(metrics_path)
    return metrics_path.parent / "measured" / metrics_path.name


def split_measured(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the same inputs always give, what this run measured: the MEASURED keys)."""
    return ({k: v for k, v in metrics.items() if k not in MEASURED},
            {k: v for k, v in metrics.items() if k in MEASURED})


def base_info(params: Params) -> dict[str, Any]:
    """Which base weights the adapter belongs to (sha256 of a local folder, else null; a GGUF
    base adds its file, sha256 and size)."""
    model = params.model
    info = {"id": model.base, "revision": model.revision,
            "sha256": sha256_tree(model.base) if model.is_local else None}
    if model.gguf_file:
        from medqlora.core.gguf import describe
        info["gguf"] = describe(model.base, model.gguf_file)
    return info


def save_adapter(attempt: Attempt, tokenizer, params: Params, data_dir: Path, out_dir: Path,
                 base: dict[str, Any], lora: dict | None = None) -> None:
    """models/adapter/: safetensors adapter, tokenizer and meta.json, written atomically.

    `lora`: the LoRA tensors gathered under FSDP (adapter_io.gather_lora), else None.
    """
    ctx, plan = attempt.ctx, attempt.plan
    inputs: dict[str, Path] = {"prepared": data_dir}
    init = find_adapter(params.train.init_adapter) if params.train.init_adapter else None
    if init is not None:
        inputs["init_adapter"] = init
    with atomic_dir(out_dir) as tmp:
        adapter_io.save(attempt.trainer, tmp, lora)  # target_modules sorted: equal bytes
        tokenizer.save_pretrained(str(tmp))
        write_meta(tmp, stage="train", params=params.section(*SECTIONS), inputs=inputs, extra={
            "precision": {
                "device": ctx.device,
                "compute_dtype": str(ctx.precision.compute_dtype).removeprefix("torch."),
                "bf16": ctx.precision.bf16, "fp16": ctx.precision.fp16,
                "notes": list(ctx.notes),
            },
            "base": base,
            "init_adapter": str(init) if init else None,
            "effective": {"per_device_train_batch_size": plan.batch,
                          "gradient_accumulation_steps": plan.accum,
                          "warmup_steps": plan.warmup_steps, "num_processes": plan.processes,
                          "effective_batch": plan.effective_batch},
            "run": ctx.as_dict(),  # device, processes, strategy, optimizer, fast path, attention
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


# ---------------------------------------------------------------- the recipe

def run(params: Params, data_dir: str | Path, out_dir: str | Path, checkpoints_dir: str | Path,
        live_dir: str | Path | None, metrics_path: str | Path,
        measured_path: str | Path | None = None) -> dict[str, Any]:
    """The whole train stage; returns the metrics written to `metrics_path` and to
    `measured_path` (the MEASURED keys; None: measured_beside(metrics_path)), in one dict.

    `live_dir` None writes no dvclive curves (`--live none`: runs outside DVC, such as the
    GPU benchmarks, where dvc and dvclive need not be installed).
    """
    # --- setup ---
    launch.join_launch()  # a launched worker dies with its launcher, never trains on orphaned
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ctx = run_context.build(params)  # every fact below reads it; resolved once
    preflight.check(params)  # WontFit (exit 3) before loading anything
    data = load_data(data_dir)
    base = base_info(params)  # hashed once: it names the checkpoint folder and goes in meta.json
    # FSDP checkpoints (sharded) cannot resume a DDP/single run or the reverse: own folder.
    fsdp = {"fsdp": True} if ctx.fsdp else {}
    # On a CPU the kernels and threads shape the bytes too: a pinned run never resumes from a
    # checkpoint written with other numerics (it would not give the bytes dvc.lock records).
    numerics = {}
    if ctx.device == "cpu":  # pinned first: describe() names the threads and kernel that train
        cpu_numerics.pin_torch()
        numerics = {"cpu_numerics": cpu_numerics.describe()}
    key = checkpoints.fingerprint({**params.section(*SECTIONS), "base": base, **fsdp,
                                   **numerics}, sha256_tree(data_dir))
    run_dir = Path(checkpoints_dir) / key
    log.info("checkpoints: %s (fingerprint of params + prepared data)", run_dir)
    tokenizer = modeling.load_tokenizer(params.model)
    # --- train ---
    try:
        attempt = fit_adaptive(params, ctx, tokenizer, data, run_dir,
                               Path(live_dir) if live_dir else None)
    except Diverged as err:
        raise Diverged(err.step, err.reason, diverged_outcome(params, run_dir, out_dir,
                                                              metrics_path)) from None
    # --- save: every rank computes the metrics and joins the FSDP gather; rank 0 writes ---
    metrics = train_metrics(attempt)
    lora = adapter_io.gather_lora(attempt.trainer.model) if ctx.fsdp else None
    if ctx.is_main:
        save_adapter(attempt, tokenizer, params, data_dir, out_dir, base, lora)
        stable, measured = split_measured(metrics)
        write_json(measured_path or measured_beside(metrics_path), measured)
        write_json(metrics_path, stable)
        log.info("train: step %d, eval loss %.4f -> %.4f, %.0f tokens/s",
                 metrics["global_step"], metrics["eval_loss_start"] or float("nan"),
                 metrics["eval_loss"], metrics["tokens_per_second"] or 0)
    launch.leave()
    return metrics
