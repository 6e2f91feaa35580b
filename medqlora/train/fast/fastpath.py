"""The fast training path: the same QLoRA recipe, fewer bytes moved and less recomputed.

    model, collator, args = fastpath.apply(model, params, args, collator)   # medqlora/train/training.py

Switches live in `train.fast_path` (schema/params.schema.json); bench/bench_train.py measures
each against the reference recipe on a GPU, and tests/test_fastpath.py keeps the CPU-capable
ones equal to the plain path. What each removes, for Mistral-7B at 4 x 2048 tokens a
micro-batch (U = one bf16 tokens x hidden tensor = 8192 x 4096 x 2 B = 64 MiB):
- frozen_in_compute_dtype: peft's prepare_model_for_kbit_training upcasts norms, embeddings and
  lm_head to fp32, which makes the whole residual stream fp32: 2U per checkpointed layer
  instead of 1U (32 layers: 4 GiB -> 2 GiB) and twice the bytes in every norm/add. The frozen
  weights go back to bf16; the adapter (what Adam updates) stays fp32.
- fused_kernels / fused_cross_entropy (Liger): RMSNorm, RoPE and SwiGLU in one Triton pass
  each; the loss is computed chunk by chunk (up to 2048 tokens a chunk) from the hidden states,
  so the 8192 x 32000 logits (1 GiB in fp32, plus their gradient) never exist.
- fused_lora: peft computes base(x).clone() + B(A(drop(x))) * s in four passes over the output;
  here the scaled add is the GEMM's epilogue (torch.addmm, beta=1, alpha=s), and the dropout
  is replayed in backward instead of kept (medqlora/train/fast/lora_branch.py: 1.09 instead of 1.63 GiB
  an un-recomputed layer keeps, the same masks); down_proj's branch keeps the SwiGLU's gate
  and up instead of their product (one intermediate-sized tensor a token less).
- padding_free: a micro-batch of variable-length examples becomes one row with per-example
  position ids; packed rows (data.packing) are padded to data.max_seq_length instead of to the
  micro-batch's longest, so every micro-batch has one shape (no per-shape kernel plans).
- varlen_attention (medqlora/train/fast/attention.py): attention within each example only, PyTorch's
  varlen flash kernel on CUDA, instead of sdpa over the whole row under a block-diagonal mask.
- micro_batch_tokens (off by default): micro-batches of that many tokens, accumulation grown to
  match; less memory a pass, but 1 x 2048 tokens is launch-bound on an H200 (bench/README.md)
  unless its layers run as CUDA graphs:
- cuda_graphs (off by default; medqlora/train/fast/graphs.py): the layers that skip recompute are captured
  once and replayed, two graph launches a micro-batch; with 1 x 2048 fixed-length rows
  Mistral-7B trains at 2.08x the reference, Llama-3-8B at 2.06x (eager 1 x 2048: 0.85x).
- checkpoint_policy=budget: memory the above saves buys un-checkpointed layers (no recompute).
- fused_optimizer: adamw_torch -> adamw_torch_fused (the same update in one kernel).
Everything GPU-only is imported lazily and guarded, so the CPU path and CI never need it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import types
from dataclasses import dataclass
from typing import Any

import torch

from medqlora.core.config import FastPathParams
from medqlora.core.memory import Arch, layers_within_budget
from medqlora.train.fast import attention, graphs, lora_branch

log = logging.getLogger(__name__)
MIN_PADDING_SAVING = 0.10  # flatten a micro-batch only when it removes >= 10% of its tokens
LOSS_CHUNK_TOKENS = 2048   # fused cross-entropy: tokens a chunk of logits holds at most


# ---------------------------------------------------------------- what runs here

@dataclass(frozen=True)
class Plan:
    """The switches that actually apply on this device, and why the others do not."""
    fused_kernels: bool
    fused_cross_entropy: bool
    fused_lora: bool
    frozen_in_compute_dtype: bool
    padding_free: bool
    varlen_attention: bool
    micro_batch_tokens: int | None
    cuda_graphs: bool
    checkpoint_policy: str
    fused_optimizer: bool
    notes: tuple[str, ...]

    @classmethod
    def off(cls, notes: tuple[str, ...] = ()) -> "Plan":
        """Every switch off: the plain recipe (fast path off, or not applicable here)."""
        return cls(False, False, False, False, False, False, None, False, "all", False, notes)

    @property
    def any(self) -> bool:
        """True when at least one switch changes something."""
        return any((self.fused_kernels, self.fused_cross_entropy, self.fused_lora,
                    self.frozen_in_compute_dtype, self.padding_free, self.varlen_attention,
                    self.micro_batch_tokens is not None, self.cuda_graphs, self.fused_optimizer,
                    self.checkpoint_policy != "all"))


def liger_available() -> bool:
    """liger-kernel importable (it needs triton, so in practice a CUDA machine)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(fast: FastPathParams, device: str) -> Plan:
    """Which switches run on `device` (auto: CUDA only), with a note for each one skipped."""
    on = fast.enabled == "on" or (fast.enabled == "auto" and device == "cuda")
    if not on:
        return Plan.off()
    notes = []
    want_liger = fast.fused_kernels or fast.fused_cross_entropy
    liger_ok = device == "cuda" and liger_available()
    if want_liger and not liger_ok:
        notes.append("train.fast_path.fused_kernels/fused_cross_entropy: need CUDA and "
                     "liger-kernel; skipped")
    if fast.cuda_graphs and device != "cuda":
        notes.append("train.fast_path.cuda_graphs: needs CUDA; skipped")
    fused_opt = fast.fused_optimizer and device == "cuda"
    return Plan(fast.fused_kernels and liger_ok, fast.fused_cross_entropy and liger_ok,
                fast.fused_lora, fast.frozen_in_compute_dtype, fast.padding_free,
                fast.varlen_attention, fast.micro_batch_tokens,
                fast.cuda_graphs and device == "cuda", fast.checkpoint_policy, fused_opt,
                tuple(notes))


# ---------------------------------------------------------------- frozen weights in bf16

def frozen_to_compute_dtype(model, dtype: torch.dtype) -> int:
    """Cast frozen fp32 floating parameters (norms, embeddings, lm_head) to `dtype`.

    Undoes peft's blanket fp32 upcast for weights Adam never touches; trainable (adapter)
    parameters stay fp32. Returns how many parameters were cast.
    """
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


# ---------------------------------------------------------------- Liger kernels

def apply_liger(model, fused_kernels: bool, fused_cross_entropy: bool) -> None:
    """Patch the (peft-wrapped) model instance with Liger kernels; GPU only, imported lazily.

    Applied to the instance, so other models in the process keep their code, except RoPE,
    which Liger patches at module level (transformers' apply_rotary_pos_emb).
    """
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(
        model=base, rope=fused_kernels, rms_norm=fused_kernels, swiglu=fused_kernels,
        cross_entropy=False, fused_linear_cross_entropy=fused_cross_entropy)
    if fused_cross_entropy:
        base.register_forward_pre_hook(_loss_chunks, with_kwargs=True)


def _loss_chunks(module, args, kwargs):
    """Liger's fused loss in chunks of up to LOSS_CHUNK_TOKENS tokens (its chunk_mem_const,
    which the patched forward passes on to the loss).

    Liger sizes chunks so that a chunk's logits are no bigger than the hidden states: for
    Llama-3-8B (vocab 128,256 = 31 x hidden) a micro-batch of 2,048 tokens becomes 32 chunks
    of 64, and each reads the whole 1 GB lm_head twice (logits, input gradient): 64 GB of
    reads a micro-batch. 2,048-token chunks read it twice in all, for 0.5 GB of bf16 logits.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None or kwargs.get("labels") is None or "chunk_mem_const" in kwargs:
        return None
    config = module.config
    tokens = ids.numel()
    chunks = -(-tokens // LOSS_CHUNK_TOKENS)
    return args, {**kwargs, "chunk_mem_const": max(
        1, -(-config.vocab_size // (config.hidden_size * chunks)))}


# ---------------------------------------------------------------- LoRA as one GEMM

def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + s * B(A(dropout(x))) with the add and scale in the GEMM epilogue.

    peft's bnb.Linear4bit does result.clone(), then output * s, then result + output: three
    more passes over a tokens x out tensor per projection (q/k/v/o/gate/up/down, fwd and bwd).
    Falls back to peft whenever the layer is not the plain single-adapter case.
    """
    recompute_from = kwargs.pop("recompute_from", None)   # set by _swiglu_mlp_forward
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (self.disable_adapters or self.merged or name not in self.lora_A or args or kwargs
            or name in getattr(self, "lora_variant", {}) or self.lora_B[name].bias is not None):
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    autocast = torch.is_autocast_enabled()  # peft's own test (CUDA autocast), kept for parity
    mode = getattr(self, "dropout_mode", "replay")
    dropping = isinstance(dropout, torch.nn.Dropout) and dropout.training and 0 < dropout.p < 1
    if recompute_from is not None and torch.is_grad_enabled() and \
            (mode != "peft" if dropping else isinstance(dropout, torch.nn.Identity)):
        # down_proj: keep the SwiGLU's gate and up (kept anyway) instead of their product
        low = lora_branch.recomputed_dropped_linear(
            x, weight_a, dropout.p if dropping else 0.0, mode if dropping else "none",
            *recompute_from)
    elif mode != "peft" and dropping:
        # keeps no dropped copy: replayed from the generator's state, or (in a CUDA graph)
        # from a seed tensor
        linear = lora_branch.seeded_dropped_linear if mode == "seeded" else \
            lora_branch.dropped_linear
        low = linear(x, weight_a, dropout.p)
    else:
        low = torch.nn.functional.linear(dropout(x) if autocast else
                                         dropout(x).to(weight_a.dtype), weight_a)
    if not autocast:
        # Without autocast, peft computes the branch in the adapter's dtype (fp32) and casts
        # back; do the same so the fused path matches it.
        out2d = torch.addmm(result.reshape(-1, result.shape[-1]).to(weight_b.dtype),
                            low.reshape(-1, low.shape[-1]).to(weight_b.dtype), weight_b.t(),
                            alpha=self.scaling[name])
        return out2d.to(result.dtype).view(result.shape)
    out2d = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                        weight_b.t(), alpha=self.scaling[name])
    return out2d.view(result.shape)


def fuse_lora(model) -> int:
    """Give every peft LoRA Linear the fused forward; returns how many layers changed."""
    from peft.tuners.lora import LoraLayer
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and \
                not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), with down_proj's LoRA branch keeping gate and up (the
    SwiGLU's backward keeps them anyway) instead of their product, which its backward
    recomputes: one intermediate-sized tensor a token less per layer (Mistral-7B: 28 KiB a
    token, a fifth of what an un-recomputed layer keeps)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = self.swiglu_product
    return self.down_proj(product(gate, up), recompute_from=(product, gate, up))


def recompute_swiglu_products(model, liger: bool) -> int:
    """Give every gated-SiLU MLP whose down_proj has the fused LoRA branch _swiglu_mlp_forward;
    `liger`: the product is Liger's SwiGLU kernel (apply_liger ran), else act_fn(gate) * up.
    Returns how many MLPs changed."""
    if liger:
        from liger_kernel.transformers.functional import liger_swiglu
    count = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        act = getattr(module, "act_fn", None)
        silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
        if not (silu and hasattr(module, "gate_proj") and hasattr(module, "up_proj")
                and hasattr(down, "_peft_forward")):
            continue
        if liger:
            module.swiglu_product = liger_swiglu
        else:
            module.swiglu_product = lambda gate, up, _act=act: _act(gate) * up
        module.forward = types.MethodType(_swiglu_mlp_forward, module)
        count += 1
    return count


def replay_where_kept(model) -> int:
    """Replay the LoRA dropout (lora_branch) only in decoder layers that keep their activations.

    A recomputed layer's dropped copies live only while its own backward runs, so there the
    replay would buy no memory for one more dropout kernel per projection; such layers use
    peft's dropout (the same masks either way). Returns how many LoRA layers replay.
    """
    count = 0
    for layer in decoder_layers(model):
        kept = not layer.gradient_checkpointing
        count += lora_branch.set_dropout_mode(layer, "replay" if kept else "peft") * kept
    return count


# ---------------------------------------------------------------- padding-free batches

@dataclass
class PaddingFree:
    """Wraps a padding collator: micro-batches without padding, or padded to one shape.

    - Unpacked rows of unequal length: concatenated into one row; position_ids restart at 0
      for each example, so attention stays within it (examples never see each other). The
      first label of every example after the first is set to -100: the previous example's
      last token must not be trained to predict it. A plain row's first label is never used
      either (the loss shifts labels by one), so the set of trained tokens is the same.
      Batches that padding would barely grow go to `inner`.
    - Packed rows (prepare's train_packed.parquet, with position_ids): padded to `pad_to`
      (data.max_seq_length), so every micro-batch has the same shape; the padding is one more
      example (positions 0..k-1, labels -100).
    With `boundaries`, the batch also carries where each example starts
    (attention.document_boundaries), which the varlen attention reads. `real_tokens` and
    `positions` count what was collated: their ratio is the packing efficiency.
    """
    inner: Any
    min_saving: float = MIN_PADDING_SAVING
    pad_to: int | None = None
    boundaries: bool = False
    real_tokens: int = 0
    positions: int = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(row["input_ids"]) for row in rows]
        if "position_ids" in rows[0]:
            batch = self.inner(rows, pad_to=self.pad_to)
        elif 1 - sum(lengths) / (max(lengths) * len(rows)) < self.min_saving:
            batch = self.inner(rows)
            if "attention_mask" in batch and bool(batch["attention_mask"].all()):
                # no padding: no mask (the same causal attention), so the model need not
                # check it on the GPU, a host sync every micro-batch
                del batch["attention_mask"]
        else:
            batch = self._one_row(rows)
        self.real_tokens += sum(lengths)
        self.positions += batch["input_ids"].numel()
        if self.boundaries and "position_ids" in batch:
            batch.update(attention.document_boundaries(batch["position_ids"]))
        return batch

    @property
    def efficiency(self) -> float | None:
        """Real tokens / positions computed, over every micro-batch so far."""
        return self.real_tokens / self.positions if self.positions else None

    @staticmethod
    def _one_row(rows) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for row in rows:
            row_labels = list(row["labels"])
            if labels:
                row_labels[0] = -100
            ids.extend(row["input_ids"])
            labels.extend(row_labels)
            positions.extend(range(len(row["input_ids"])))
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels),
                "position_ids": as_row(positions)}


# ---------------------------------------------------------------- micro-batches by tokens

def micro_batch_rows(batch: int, seq: int, tokens: int | None) -> int:
    """Rows a micro-batch holds under `tokens` (train.fast_path.micro_batch_tokens): the largest
    divisor of `batch` (per_device_train_batch_size) that is at most max(1, tokens // seq)."""
    if tokens is None:
        return batch
    most = max(1, tokens // seq)
    return max(rows for rows in range(1, batch + 1) if batch % rows == 0 and rows <= most)


def split_micro_batches(args, seq: int, tokens: int | None):
    """`args` with per-device batches of micro_batch_rows() rows and gradient accumulation grown
    by the same factor: an optimizer step sees the same rows in the same order (the sampler
    is unchanged) and, the Trainer dividing the summed loss by the step's label count
    (num_items_in_batch), the same loss."""
    batch = args.per_device_train_batch_size
    rows = micro_batch_rows(batch, seq, tokens)
    if rows == batch:
        return args
    return dataclasses.replace(args, per_device_train_batch_size=rows,
                               gradient_accumulation_steps=args.gradient_accumulation_steps
                               * (batch // rows))


# ---------------------------------------------------------------- checkpoint policy

def decoder_layers(model) -> list:
    """The layers transformers checkpoints (GradientCheckpointingLayer instances)."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")
            and type(m).__name__.endswith("DecoderLayer")]


def set_checkpointing(model, policy: str, budget_gib: float | None, tokens: int,
                      dropout: bool, fused_lora: bool, graphs: bool = False) -> int:
    """Apply the checkpoint policy; returns how many decoder layers skip recompute.
    `dropout`: lora_dropout > 0; `fused_lora`: kept layers replay it (replay_where_kept);
    `graphs`: kept layers will be CUDA graphs (train.fast_path.cuda_graphs)."""
    layers = decoder_layers(model)
    if policy == "all" or not layers or not any(l.gradient_checkpointing for l in layers):
        return 0
    if policy == "none":
        skip = len(layers)
    else:
        arch = dataclasses.replace(Arch.from_config(model.config.to_dict()), layers=len(layers))
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        skip = layers_within_budget(budget_gib, arch, tokens, allocated, trainable,
                                    dropout, fused_lora, graphs)
    # The last layers: their activations are the first ones backward consumes.
    for layer in layers[len(layers) - skip:]:
        layer.gradient_checkpointing = False
    return skip


# ---------------------------------------------------------------- the one entry point

def apply(model, params, args, collator, device: str | None = None, plan: Plan | None = None):
    """The fast path for `params.train.fast_path`: returns (model, collator, args).

    `params` is the whole Params (the policy needs data.max_seq_length and
    train.memory_budget_gib); `args` the TrainingArguments; `collator` the padding collator;
    `plan` the switches already resolved for this run (medqlora/train/run_context.py), else they are
    resolved here for `device`. With the fast path off (the CPU default) all three come back
    unchanged.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if plan is None:
        plan = resolve(params.train.fast_path, device)
    for note in plan.notes:
        log.warning(note)
    if not plan.any:
        return model, collator, args
    done = []
    if plan.frozen_in_compute_dtype:
        dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        if dtype is not None:
            done.append(f"frozen weights in {str(dtype)[6:]}: "
                        f"{frozen_to_compute_dtype(model, dtype) / 1e6:.0f}M params")
    if plan.fused_kernels or plan.fused_cross_entropy:
        apply_liger(model, plan.fused_kernels, plan.fused_cross_entropy)
        done.append(f"liger kernels={plan.fused_kernels} fused CE={plan.fused_cross_entropy}")
    if plan.fused_lora:
        done.append(f"fused LoRA on {fuse_lora(model)} layers, down_proj input recomputed in "
                    f"{recompute_swiglu_products(model, plan.fused_kernels)} MLPs")
    varlen = plan.varlen_attention and \
        getattr(model.config, "_attn_implementation", None) in ("sdpa", attention.NAME)
    if varlen:
        attention.use_varlen(model)
        done.append(f"varlen attention ({attention.kernel_name(device)})")
    if plan.padding_free:
        collator = PaddingFree(collator, pad_to=params.data.max_seq_length, boundaries=varlen)
        done.append("padding-free batches")
    if plan.fused_optimizer and str(getattr(args.optim, "value", args.optim)) == "adamw_torch":
        args = dataclasses.replace(args, optim="adamw_torch_fused")
        done.append("adamw_torch_fused")
    seq = params.data.max_seq_length
    if plan.micro_batch_tokens is not None:
        args = split_micro_batches(args, seq, plan.micro_batch_tokens)
        done.append(f"micro-batches of {args.per_device_train_batch_size} x {seq} tokens, "
                    f"{args.gradient_accumulation_steps} a step")
    tokens = args.per_device_train_batch_size * seq
    skipped = set_checkpointing(model, plan.checkpoint_policy, params.train.memory_budget_gib,
                                tokens, params.lora.lora_dropout > 0, plan.fused_lora,
                                plan.cuda_graphs)
    done.append(f"checkpoint policy {plan.checkpoint_policy}: {skipped} layers not recomputed")
    if plan.fused_lora and not plan.cuda_graphs:
        done.append(f"LoRA dropout replayed in {replay_where_kept(model)} layers")
    elif plan.fused_lora:
        replay_where_kept(model)     # kept layers: seeded instead, once graphed (below)
    if plan.cuda_graphs:
        layers = decoder_layers(model)
        model.medqlora_graphs = graphs.capture_layers(layers, len(layers) - skipped)
        # The Trainer's NaN/Inf filter reads every micro-batch's loss on the host, a sync
        # that empties the GPU's queue each time; without it the host runs ahead of the
        # replays. A non-finite loss is then logged as such instead of being replaced.
        args = dataclasses.replace(args, logging_nan_inf_filter=False)
        done.append(f"CUDA graphs for the last {skipped} layers (captured at the first "
                    "micro-batch; seeded LoRA dropout there); no per-micro-batch NaN filter "
                    "sync")
    log.info("fast path: %s", "; ".join(done))
    return model, collator, args
