"""The memory model: peak GPU memory of train, evaluate and merge, from a model's shapes.

    est = estimate(Arch.from_config(config), Setup(batch=4, seq=2048))   # train, by component
    estimate_evaluate(arch, setup, rows, prompt_tokens, new_tokens)      # evaluate
    estimate_merge(arch, setup, prompt_tokens)                           # merge

No params are read here (medqlora/train/preflight.py maps params to a Setup and checks the limit);
the fast path's checkpoint budget (layers_within_budget), the generation row cap
(medqlora.evaluate.generation.rows_that_fit) and the merge stage's size check use the same arithmetic.
Only the base's config.json is read (a local folder, or the Hugging Face cache for a hub id;
nothing is downloaded). The model, per component, for T = per_device_train_batch_size x
data.max_seq_length tokens per micro-batch (the longest a micro-batch can be):

- 4-bit weights: every decoder Linear at 0.5 byte/param + its quantization constants (one
  absmax per 64-value block: fp32 = 0.5 bit/param; with double quant an 8-bit absmax plus one
  fp32 per 256 blocks = 0.127 bit/param).
- frozen non-quantized params (embeddings, lm_head, norms): peft's
  prepare_model_for_kbit_training upcasts them to fp32; the fast path's
  frozen_in_compute_dtype keeps them in bf16. Under bf16 autocast an fp32 lm_head is also cast
  to a bf16 copy that is cached for backward (vocab x hidden x 2 bytes).
- LoRA: r x (in + out) per adapted Linear, fp32 weight + fp32 grad + optimizer state (AdamW
  2 x fp32 = 8 bytes; bitsandbytes 8-bit: 2 bytes).
- activations. The residual stream is fp32 after peft's upcast (bnb's Linear4bit returns its
  input's dtype), bf16 with frozen_in_compute_dtype. One decoder layer keeps, per token,
  13 hidden + 3 kv + 5 intermediate values for backward (norm in/out x2, three LoRA dropout
  copies, q/k/v, rotated q/k, attention out, o-proj dropout, gate/up outputs, silu, product,
  down dropout; sdpa/flash keep no seq x seq matrix). With the fast path's fused kernels
  it is what those kernels save, with or without the LoRA dropout copies
  (layer_activation_bytes). With checkpointing only the L + 1 layer
  boundaries are kept, plus one layer's working set while it is recomputed; without, every
  layer's working set is live when the logits are.
- logits + loss: bf16 logits -> fp32 copy -> log_softmax output (kept); backward adds its
  gradient and the input gradient: peak 12 bytes x T x vocab. The fused linear
  cross-entropy (fast path) only holds one chunk of T / ceil(vocab / hidden) tokens' logits
  and their gradient, plus the hidden-state gradient.
  With checkpointing the logits peak and a layer's recompute never coexist (the loss backward
  ends before the last layer is recomputed), so the activations peak is
  boundaries + max(layer, logits); without checkpointing it is layers + logits.
- CUDA context + allocator: a constant, not part of torch's "allocated" memory (the bench
  measures max_memory_allocated, so bench/preflight_vs_measured.md compares without it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
BLOCK = 64                    # bitsandbytes 4-bit blocksize
NESTED_BLOCK = 256            # double quant: blocks of absmax values per fp32 constant
CUDA_CONTEXT_GIB = 0.5        # context + cuBLAS workspace + allocator slack outside torch's count
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIM_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8,
                     "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0, "adafactor": 0}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class CannotEstimate(Exception):
    """The base's config.json is not readable offline (hub id not in the local cache)."""


@dataclass(frozen=True)
class Arch:
    """The shapes that decide memory, from a Llama/Mistral-style config.json."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Arch":
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(hidden, int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads") or heads),
                   int(cfg.get("head_dim") or hidden // heads), int(cfg["vocab_size"]),
                   bool(cfg.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder projection."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, \
            self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class Setup:
    """The knobs of a run that memory depends on (built from Params by `setup_from`)."""
    batch: int
    seq: int
    load_in_4bit: bool = True
    double_quant: bool = True
    compute_bytes: int = 2
    r: int = 64
    targets: tuple[str, ...] = PROJECTIONS
    optim: str = "adamw_torch"
    checkpointing: bool = True
    fast_frozen_bf16: bool = False
    fast_kernels: bool = False
    fused_ce: bool = False
    dropout_copies: bool = True   # a layer keeps peft's LoRA dropout copies (no replay)
    swiglu_recomputed: bool = False   # down_proj's LoRA input rebuilt from gate and up
    cuda_graphs: bool = False     # kept layers replayed as a CUDA graph (medqlora/train/fast/graphs.py)
    world: int = 1                # processes (GPUs) training together
    strategy: str = "ddp"         # ddp | fsdp (runner.distributed.strategy)

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Estimate:
    """Bytes per component; `peak` is what torch allocates at its highest point."""
    rows: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak allocated + the CUDA context constant: what the device must hold."""
        return self.peak + int(CUDA_CONTEXT_GIB * GIB)


# ---------------------------------------------------------------- the arithmetic

def quantized_bytes(numel: int, double_quant: bool) -> int:
    """One 4-bit tensor: packed values + absmax constants.

    E.g. 4096 x 4096 = 16,777,216 params -> 8,388,608 bytes of nf4 + 262,144 blocks of 64;
    fp32 absmax: 1,048,576 bytes (0.5 bit/param); double quant: 262,144 one-byte absmax +
    1,024 fp32 second-level constants + a 4-byte offset = 266,244 bytes (0.127 bit/param).
    """
    blocks = math.ceil(numel / BLOCK)
    constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + constants


def lora_params(arch: Arch, r: int, targets: tuple[str, ...]) -> int:
    """Exact adapter size: r x (in + out) for every adapted projection of every layer."""
    shapes = arch.linear_shapes()
    return arch.layers * sum(r * sum(shapes[name]) for name in targets if name in shapes)


def keeps_dropout_copies(dropout: bool, fused_lora: bool, recomputed: bool) -> bool:
    """Whether a decoder layer keeps peft's LoRA dropout copies for backward: with dropout,
    unless fused_lora replays it, which it does only in layers that are not recomputed
    (fastpath.replay_where_kept)."""
    return dropout and (recomputed or not fused_lora)


def layer_activation_bytes(arch: Arch, tokens: int, dropout_copies: bool,
                           swiglu_recomputed: bool = False) -> int:
    """Activations one un-checkpointed decoder layer keeps for backward, bf16, fast path.

    Counted from what each op saves (Liger RMSNorm: its input; Liger RoPE: nothing; flash or
    varlen attention: rotated q, k, v and the output; Liger SwiGLU: gate and up; bitsandbytes'
    4-bit matmul: no activation): per token 6 hidden (two norm inputs, two norm outputs
    the LoRA A projections read, rotated q, attention out) + 2 kv + 3 intermediate values,
    plus half a hidden of slack (norm statistics, LoRA's rank-r outputs, softmax statistics).
    `dropout_copies` (peft's dropout, lora_dropout > 0 without fused_lora's replay): every
    projection also keeps its dropped input (2 bytes) and mask (1 byte) -- 3 x (6 hidden +
    1 intermediate) bytes -- instead of sharing the norm outputs and the SwiGLU product.
    Mistral-7B at 8,192 tokens: 1.094 GiB a layer (1.641 with copies); measured on an H200
    by bench/check_activations.py, 1.086 (1.628); at 2,048 tokens 0.273 (0.410) against
    0.283 (0.415). `swiglu_recomputed` (fused_lora without copies: down_proj's branch
    rebuilds its input from gate and up, fastpath.recompute_swiglu_products): one
    intermediate value a token less.
    """
    h, i = arch.hidden, arch.intermediate
    kv = arch.kv_heads * arch.head_dim
    if dropout_copies:
        per_token = 2 * (4.5 * h + 2 * kv + 2 * i) + 3 * (6 * h + i)
    else:
        per_token = 2 * (6.5 * h + 2 * kv + (2 if swiglu_recomputed else 3) * i)
    return int(tokens * per_token)


def layers_within_budget(budget_gib: float | None, arch: Arch, tokens: int, allocated: int,
                         trainable: int, dropout: bool, fused_lora: bool,
                         graphs: bool = False) -> int:
    """How many of `arch.layers` (the last ones) can skip recompute under `budget_gib` (0 when
    it is null). `dropout`: lora_dropout > 0; which layers keep its copies:
    keeps_dropout_copies.

    fixed = allocated now (4-bit weights + adapter) + 3 x fp32 adapter (grads, Adam m, v)
          + layers x tokens x hidden x 2 (bf16 checkpoints)
          + working space: 8 bytes a token-hidden value (gradient buffers, loss chunks) + the
            larger of 0.5 GiB (allocator slack) and one MLP's backward (mlp_backward_bytes)
    peak  = fixed + max(k x (a kept layer - its checkpoint), one recomputed layer):
    the kept layers are the last ones, so backward frees them before it recomputes any other.
    `graphs` (the kept layers are one CUDA graph, medqlora/train/fast/graphs.py): the graph also holds
    its own copy of each kept layer's adapter gradients (4 bytes a parameter) and of its
    input, output and their gradients (fixed + 4 x tokens x hidden x 2), and its pool stays
    reserved while an eager layer recomputes (peak = fixed + k x kept + one recomputed, unless
    all layers are kept).
    """
    if budget_gib is None:
        return 0
    kept = layer_activation_bytes(arch, tokens, keeps_dropout_copies(dropout, fused_lora, False),
                                  fused_lora)
    recomputed = layer_activation_bytes(arch, tokens,
                                        keeps_dropout_copies(dropout, fused_lora, True),
                                        fused_lora)
    checkpoint = tokens * arch.hidden * 2
    working = max(GIB // 2, mlp_backward_bytes(arch, tokens, dropout, fused_lora)) \
        + 8 * tokens * arch.hidden
    fixed = allocated + 3 * 4 * trainable + arch.layers * checkpoint + working
    if graphs:
        fixed += 4 * tokens * arch.hidden * 2
        kept += 4 * trainable // arch.layers
        if budget_gib * GIB - fixed >= arch.layers * (kept - checkpoint):
            return arch.layers                       # all graphed: nothing recomputes
        fixed += recomputed   # the graph's pool stays reserved while eager layers recompute
    spare = budget_gib * GIB - fixed
    if spare < recomputed:
        return 0
    return min(arch.layers, int(spare // (kept - checkpoint)))


def mlp_backward_bytes(arch: Arch, tokens: int, dropout: bool, fused_lora: bool) -> int:
    """What one kept layer's MLP allocates during its backward, on top of what it keeps: the
    gradients of the SwiGLU product, gate and up (3 intermediate bf16 values a token) and the
    dequantised down_proj weight; with fused_lora, down_proj's LoRA input rebuilt from gate
    and up (1 more) and, with dropout, its dropped copy and mask redrawn (3 bytes).

    The largest transient of a layer's backward, and at 8,192 tokens larger than the budget's
    0.5 GiB floor. Mistral-7B, medical rows (4 x 2,048 packed tokens), budget 14.24 GiB: the
    floor alone allowed 6 kept layers, which peaked at 14.60 GiB (H200, bench/README.md).
    With this term (and the allocation computed from the shapes) the model predicts 14.78 GiB
    for those 6 layers, and 12.78 for the 3 layers of the older path (measured 12.59).
    """
    per_token = 2 * 3 + (2 if fused_lora else 0) + (3 if fused_lora and dropout else 0)
    return tokens * arch.intermediate * per_token + arch.hidden * arch.intermediate * 2


def layer_working_bytes(arch: Arch, setup: Setup) -> int:
    """What one decoder layer keeps for its backward pass (see the module docstring)."""
    if setup.fast_kernels:
        return layer_activation_bytes(arch, setup.tokens, setup.dropout_copies,
                                      setup.swiglu_recomputed)
    act = 2 if setup.fast_frozen_bf16 or not setup.load_in_4bit else 4
    kv = arch.kv_heads * arch.head_dim
    return setup.tokens * act * (13 * arch.hidden + 3 * kv + 5 * arch.intermediate)


def kv_cache_bytes(arch: Arch, tokens: int, dtype_bytes: int = 2) -> int:
    """Keys and values of `tokens` positions over every layer: 2 x layers x kv heads x head
    dim x dtype bytes per token (Mistral-7B: 2 x 32 x 8 x 128 x 2 = 128 KiB a token)."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes * tokens


def logits_bytes(arch: Arch, setup: Setup) -> int:
    """Logits and loss at their peak (12 bytes x tokens x vocab, or one fused-CE chunk)."""
    if setup.fused_ce:
        chunk = math.ceil(setup.tokens / math.ceil(arch.vocab / arch.hidden))
        return chunk * arch.vocab * 4 * 2 + setup.tokens * arch.hidden * 2
    return 12 * setup.tokens * arch.vocab


def shard_fsdp(out: Estimate, arch: Arch, setup: Setup, lora: int) -> None:
    """FULL_SHARD over `world` processes: each holds 1/world of the 4-bit weights, LoRA
    weights, gradients and optimizer state; the root unit (embeddings, lm_head, norms) is
    gathered whole for the step, and two decoder layers at a time (the one running and the
    backward prefetch). Measured on Llama-2-13B shapes, 2 GPUs: 12.40 GiB (DDP: 22.59)."""
    shards = ("4-bit weights + quant constants", "frozen linear weights",
              "LoRA weights + grads (fp32)", next(k for k in out.rows if k.startswith("optim")))
    for key in shards:
        if key in out.rows:
            out.rows[key] = math.ceil(out.rows[key] / setup.world)
    shapes = arch.linear_shapes()
    layer = sum(quantized_bytes(i * o, setup.double_quant) if setup.load_in_4bit
                else i * o * setup.compute_bytes for i, o in shapes.values())
    layer_lora = lora // arch.layers * 4
    out.rows["FSDP: two decoder layers gathered"] = int(
        2 * (layer + layer_lora) * (setup.world - 1) / setup.world)
    out.notes.append(f"FSDP FULL_SHARD over {setup.world} processes: weights, LoRA and optimizer "
                     "state sharded; activations are per process")


def estimate(arch: Arch, setup: Setup) -> Estimate:
    """Peak memory of one training step, by component."""
    out = Estimate()
    shapes = arch.linear_shapes()
    linear = [i * o for i, o in shapes.values()] * arch.layers
    if setup.load_in_4bit:
        out.rows["4-bit weights + quant constants"] = sum(
            quantized_bytes(n, setup.double_quant) for n in linear)
    else:
        out.rows["frozen linear weights"] = sum(linear) * setup.compute_bytes
    frozen = arch.vocab * arch.hidden * (1 if arch.tied else 2) + (2 * arch.layers + 1) * arch.hidden
    # peft's fp32 upcast; never under FSDP (one dtype per flattened layer, see training.py)
    upcast = setup.load_in_4bit and not setup.fast_frozen_bf16 and not setup.fsdp
    out.rows["embeddings, lm_head, norms"] = frozen * (4 if upcast else setup.compute_bytes)
    if upcast and setup.compute_bytes == 2:  # autocast caches a bf16 copy of the fp32 head
        out.rows["lm_head autocast copy"] = arch.vocab * arch.hidden * 2
    lora = lora_params(arch, setup.r, setup.targets)
    out.rows["LoRA weights + grads (fp32)"] = lora * 8
    out.rows[f"optimizer state ({setup.optim})"] = lora * OPTIM_STATE_BYTES.get(setup.optim, 8)
    if setup.fsdp:
        shard_fsdp(out, arch, setup, lora)
    elif setup.world > 1:  # DDP all-reduces gradients through buckets of their own size
        out.rows["DDP gradient buckets"] = lora * 4
    if setup.cuda_graphs:  # the graph's own adapter gradients and its input/output buffers
        out.rows["CUDA graph buffers"] = lora * 4 + 4 * setup.tokens * arch.hidden * 2
    resid = 4 if upcast else 2
    layer = layer_working_bytes(arch, setup)
    logits = logits_bytes(arch, setup)
    if setup.checkpointing:
        out.rows["activations: layer boundaries"] = (arch.layers + 1) * setup.tokens * \
            arch.hidden * resid
        out.rows["activations: one layer recomputed"] = layer
    else:
        out.rows["activations: all layers"] = arch.layers * layer
    out.rows["logits + loss"] = logits
    fixed = sum(v for k, v in out.rows.items() if not k.startswith(("activations", "logits")))
    if setup.checkpointing:
        act = out.rows["activations: layer boundaries"] + max(layer, logits)
        out.notes.append("peak counts max(one layer recomputed, logits + loss): they are never "
                         "live together")
    else:
        act = out.rows["activations: all layers"] + logits
    out.peak = fixed + act
    out.rows["CUDA context + allocator"] = int(CUDA_CONTEXT_GIB * GIB)
    unknown = [t for t in setup.targets if t not in shapes]
    if unknown:
        out.notes.append(f"lora.target_modules {unknown} not counted (not a Llama/Mistral "
                         "projection name)")
    return out


# ---------------------------------------------------------------- evaluate and merge

# evaluate's teacher-forced passes (perplexity, option likelihoods) batch up to this many
# tokens: bf16 logits, their float32 copy, log-softmax and its transpose, 14 bytes a value.
EVAL_NLL_TOKENS = 4096
NLL_BYTES = 14


def inference_weights(arch: Arch, setup: Setup) -> dict[str, int]:
    """The 4-bit base + adapter as evaluate loads it: frozen tensors in the compute dtype, the
    LoRA weights in float32 (peft upcasts them), nothing for gradients or optimizer."""
    linear = [i * o for i, o in arch.linear_shapes().values()] * arch.layers
    frozen = arch.vocab * arch.hidden * (1 if arch.tied else 2) + (2 * arch.layers + 1) * arch.hidden
    return {"4-bit weights + quant constants": sum(quantized_bytes(n, setup.double_quant)
                                                   for n in linear),
            "embeddings, lm_head, norms": frozen * setup.compute_bytes,
            "LoRA weights (fp32)": lora_params(arch, setup.r, setup.targets) * 4}


def estimate_evaluate(arch: Arch, setup: Setup, rows: int, prompt_tokens: int,
                      new_tokens: int) -> Estimate:
    """Peak of the evaluate stage: weights + the larger of one teacher-forced pass and one
    generation batch (`rows` answers of `new_tokens` after prompts of `prompt_tokens`).

    Generation holds the KV cache (medqlora.evaluate.generation caps rows so it takes at most half the
    free memory) plus the prefill's MLP activations (gate, up and their product, bf16) and the
    dequantized copy of the largest 4-bit weight. Measured at 7B on an H200: 355 rows of
    ~150 + 512 tokens, 35.14 GiB; 43 rows, 8.20 GiB.
    """
    out = Estimate(rows=inference_weights(arch, setup))
    nll = EVAL_NLL_TOKENS * arch.vocab * NLL_BYTES
    largest = max(i * o for i, o in arch.linear_shapes().values()) * setup.compute_bytes
    generation = (kv_cache_bytes(arch, rows * (prompt_tokens + new_tokens), setup.compute_bytes)
                  + rows * prompt_tokens * 3 * arch.intermediate * setup.compute_bytes + largest)
    out.rows["teacher-forced pass (logits, log-softmax)"] = nll
    out.rows[f"generation: KV cache + prefill, {rows} rows"] = generation
    out.peak = sum(out.rows.values()) - min(nll, generation)
    out.notes.append("peak counts max(teacher-forced pass, generation): they never coexist")
    out.rows["CUDA context + allocator"] = int(CUDA_CONTEXT_GIB * GIB)
    return out


def estimate_merge(arch: Arch, setup: Setup, prompt_tokens: int) -> Estimate:
    """Peak of the merge stage: the base unquantized in float32 (the merge's arithmetic) with
    the adapter, three float32 copies of the largest Linear (delta, exact sum, its rounding:
    merging.storage_error) and one prompt's logits. Measured: Mistral-7B 30.38 GiB, Llama-3-8B
    33.36 GiB (H200)."""
    linear = sum(i * o for i, o in arch.linear_shapes().values()) * arch.layers
    frozen = arch.vocab * arch.hidden * (1 if arch.tied else 2) + (2 * arch.layers + 1) * arch.hidden
    largest = max(i * o for i, o in arch.linear_shapes().values())
    out = Estimate(rows={
        "base in float32": (linear + frozen) * 4,
        "LoRA weights (fp32)": lora_params(arch, setup.r, setup.targets) * 4,
        "merge temporaries (3 x largest Linear, fp32)": 3 * largest * 4,
        "logits of one prompt (fp32, x2)": 2 * prompt_tokens * arch.vocab * 4,
    })
    out.peak = sum(out.rows.values())
    out.rows["CUDA context + allocator"] = int(CUDA_CONTEXT_GIB * GIB)
    return out


# ---------------------------------------------------------------- config, device, report

def read_model_config(model) -> dict[str, Any]:
    """config.json of model.base: a local folder (a GGUF's materialised one), or the HF cache
    for a hub id (offline)."""
    if model.gguf_file:
        from medqlora.core.gguf import materialise
        folder = materialise(model.base, model.gguf_file)
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    local = Path(model.base) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model.base, "config.json", revision=model.revision)
    except Exception as err:  # an id huggingface_hub rejects: no cache entry either
        raise CannotEstimate(f"model.base: {model.base}: {err}") from None
    if not isinstance(cached, str):
        raise CannotEstimate(f"model.base: {model.base} is not a local folder and its "
                             "config.json is not in the Hugging Face cache; cannot estimate "
                             "memory offline")
    return json.loads(Path(cached).read_text(encoding="utf-8"))


def fits(arch: Arch, setup: Setup, limit: int) -> bool:
    return estimate(arch, setup).total <= limit


def device_limit(budget_gib: float | None) -> tuple[int | None, str]:
    """The limit that applies: train.memory_budget_gib, else the visible GPU's memory."""
    if budget_gib is not None:
        return int(budget_gib * GIB), f"train.memory_budget_gib = {budget_gib:g} GiB"
    import torch
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"{torch.cuda.get_device_name(0)} ({total / GIB:.1f} GiB)"
    return None, "no GPU and no train.memory_budget_gib"


def table(est: Estimate) -> str:
    """Component -> GiB, then the peak and the total."""
    width = max(len(k) for k in est.rows) + 2
    lines = [f"{name:<{width}}{value / GIB:9.3f} GiB" for name, value in est.rows.items()]
    lines.append(f"{'peak allocated (torch)':<{width}}{est.peak / GIB:9.3f} GiB")
    lines.append(f"{'total':<{width}}{est.total / GIB:9.3f} GiB")
    return "\n".join(lines + [f"note: {n}" for n in est.notes])
