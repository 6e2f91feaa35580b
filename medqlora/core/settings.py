# Generated from schema/params.schema.json by `python scripts/make_settings.py`: do not edit.
# After editing the schema, run that command (or `make settings`) and commit both files;
# tests/test_config_schema.py fails while they differ.
"""Typed params: one frozen dataclass per object of schema/params.schema.json.

Keys, their order, types and descriptions come from the schema; defaults and bounds stay there
(config.build_params fills the defaults in before building these). Import them from
medqlora.core.config, which loads and validates params.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medqlora.core.settings_methods import ModelMethods, ParamsMethods


@dataclass(frozen=True)
class Source:
    """data.sources[i]: One raw file of records."""
    path: str
    """File path relative to the project root (.jsonl, .json, .csv or .parquet). It must lie,
    symlinks followed, inside a dependency of the prepare stage in dvc.yaml (data/raw), so that
    DVC re-runs prepare when it changes."""
    format: str
    """Record layout: alpaca (instruction/input/output[/label]), chat (messages with
    role/content, or ShareGPT conversations with from/value) or mcq
    (question/options/answer[/explanation])."""
    fields: dict[str, str]
    """Maps our field name to the source's field name when they differ, e.g. {output: response}."""


@dataclass(frozen=True)
class DataParams:
    """data: Raw sources and how the prepare stage validates, splits, templates and tokenises
    them."""
    sources: tuple[Source, ...]
    """Raw record files. Several sources are combined in order."""
    heldout_sources: tuple[Source, ...]
    """Record files for a held-out evaluation set only: never split, never trained on,
    deduplicated against data.sources (a record equal to a source record is dropped from it),
    written to heldout.parquet and scored by evaluate beside the test split. For an evaluation
    that recall of train cannot answer (e.g. data/raw/heldout/labs_novel.jsonl: lab panels whose
    prompts share no word 8-gram with data/raw/labs.jsonl); prepare reports its overlap with
    train. Empty: no held-out set."""
    on_invalid: str
    """error: list every invalid record (file:line: reason) and write nothing. skip: write
    rejected records with their reasons to the rejects file and count them."""
    max_errors_reported: int
    """With on_invalid=error, how many invalid records are listed before the rest are only
    counted."""
    val_fraction: float
    """Share of records in the validation split (hash-based: adding records never moves others).
    prepare fails when the split comes out empty: train early-stops on it."""
    test_fraction: float
    """Share of records in the test split (hash-based, like val_fraction). prepare fails when the
    split comes out empty: evaluate scores it."""
    max_seq_length: int
    """Most tokens in one templated example (prompt + answer). Mistral-7B reference: 2048."""
    overlength: str
    """What to do with an example over max_seq_length: truncate (keep the prompt, cut the answer;
    dropped when no answer token is left) or drop. Both are counted in metrics/prepare.json."""
    packing: bool
    """Pack several training examples into one row of max_seq_length tokens, with position ids
    reset per example so they do not attend to each other where the attention implementation
    allows."""
    system_prompt: str
    """Optional system message put before every prompt (empty for none)."""
    phi: str
    """What prepare does when it finds a likely personal identifier (email, phone, national id,
    date of birth, record number, name beside a patient word): error, redact or warn. Counted in
    metrics/prepare.json; values are never echoed."""
    on_contamination: str
    """What prepare does when a held-out (val or test) item's content overlaps train beyond
    contamination_threshold: warn (log and count) or error (list the items and write nothing).
    Overlap = share of the item's word 8-grams (question, options and answer, template text
    excluded) found in train content; always reported in metrics/prepare.json."""
    contamination_threshold: float
    """Largest allowed overlap of one held-out item with train (0-1): e.g. 0.5 flags an item half
    of whose 8-grams appear in train. Items at or under it only count in the report."""


@dataclass(frozen=True)
class ModelParams(ModelMethods):
    """model: The base model."""
    base: str
    """Local folder or Hugging Face hub id of the base model (reference recipe:
    mistralai/Mistral-7B-v0.1)."""
    revision: str | None
    """Hub commit (40 hex digits) to pin a hub id to; required for hub ids so a retrain months
    later uses the same weights. Ignored for local folders."""
    gguf_file: str | None
    """A GGUF file inside the local folder model.base to use as the base (e.g.
    SmolLM2-135M-Instruct.Q4_1.gguf): loaded the way transformers loads GGUF (weights
    dequantized, tokenizer and chat template from the file's metadata), materialised once as
    safetensors under .cache/medqlora/gguf/<sha256>/ (MEDQLORA_CACHE moves it), and the file's
    sha256 recorded in meta.json and the package lineage. null: model.base holds a transformers
    checkpoint."""
    trust_remote_code: bool
    """Allow model code from the hub to run. Leave false unless you have read that code."""
    attn_implementation: str
    """Attention kernel: sdpa (PyTorch scaled-dot-product), eager, or flash_attention_2 (needs
    the flash-attn package and a GPU)."""


@dataclass(frozen=True)
class QuantizationParams:
    """quantization: BitsAndBytesConfig for loading the base (QLoRA: 4-bit NF4, double
    quantization, bf16 compute)."""
    load_in_4bit: bool
    """Load the frozen base in 4 bits through bitsandbytes (it runs on CPU too). false trains
    plain LoRA on a base in the compute dtype."""
    bnb_4bit_quant_type: str
    """4-bit data type: nf4 (normal float, the QLoRA paper's choice) or fp4."""
    bnb_4bit_use_double_quant: bool
    """Quantize the quantization constants too (about 0.37 bit per parameter saved)."""
    bnb_4bit_compute_dtype: str
    """Dtype of the matmuls and of the LoRA weights. bfloat16 needs an Ampere or newer GPU: on an
    older GPU medqlora falls back to float16 and says so; on CPU bfloat16 runs as is."""
    bnb_4bit_quant_storage: str
    """Storage dtype of the packed 4-bit weights. Set it to the compute dtype for FSDP-QLoRA so
    FSDP can shard them."""


@dataclass(frozen=True)
class LoraParams:
    """lora: peft LoraConfig."""
    r: int
    """Adapter rank: higher increases capacity and memory (reference: 64)."""
    lora_alpha: float
    """Scaling numerator: the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora).
    Reference: 16."""
    lora_dropout: float
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] | str
    """Linear layers that get an adapter: a non-empty list of module names, or "all-linear" for
    every linear layer but the output head. Reference: the 7 projections of Llama/Mistral."""
    bias: str
    """Which biases train: none, all, or lora_only."""
    use_rslora: bool
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    use_dora: bool
    """Weight-decomposed LoRA (DoRA): slower, sometimes better at low rank."""


@dataclass(frozen=True)
class FastPathParams:
    """train.fast_path: The fast training path (medqlora/train/fast/fastpath.py; measured by
    bench/bench_train.py). Each switch can be turned off alone; GPU-only parts are skipped with a
    logged note where CUDA or liger-kernel is missing."""
    enabled: str
    """auto: on with CUDA, off on CPU (the CPU default stays the plain recipe); on: apply every
    switch that can run here; off: the plain recipe."""
    fused_kernels: bool
    """Liger Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA + liger-kernel)."""
    fused_cross_entropy: bool
    """Liger fused linear cross-entropy: the loss is computed in chunks of up to 2048 tokens and
    full fp32 logits (tokens x vocab) are never materialised (CUDA + liger-kernel)."""
    fused_lora: bool
    """LoRA branch as one GEMM whose epilogue adds scale x B(A(dropout(x))) onto the 4-bit base
    output, instead of peft's clone + multiply + add passes, and a dropout that backward replays
    from the generator state instead of keeping the dropped copy and mask
    (medqlora/train/fast/lora_branch.py); down_proj's branch keeps the SwiGLU's gate and up (kept
    anyway) and rebuilds their product in backward instead of keeping it. Same maths, same masks."""
    frozen_in_compute_dtype: bool
    """Keep frozen norms, embeddings and lm_head in the compute dtype (bf16) instead of peft's
    fp32 upcast; the adapter weights stay fp32. Halves the checkpointed residual stream."""
    padding_free: bool
    """Concatenate a micro-batch's examples into one row with per-example position ids (no
    padding; attention stays within each example) when that removes at least 10% of the tokens;
    packed rows (data.packing) are padded to data.max_seq_length, so every micro-batch has one
    shape."""
    varlen_attention: bool
    """Attention within each example of a packed or padding-free row only, work proportional to
    the real tokens (medqlora/train/fast/attention.py: PyTorch's varlen flash attention on CUDA,
    sdpa example by example elsewhere), instead of sdpa over the whole row with a block-diagonal
    mask. Applies when model.attn_implementation is sdpa."""
    micro_batch_tokens: int | None
    """Tokens a forward/backward pass holds at most: each per-device batch is split into
    micro-batches of max(1, this // data.max_seq_length) rows (the largest such divisor of
    train.per_device_train_batch_size), and gradient_accumulation_steps grows by the same factor,
    so an optimizer step sees the same rows in the same order and the same token-averaged loss.
    Smaller micro-batches keep fewer activations, which checkpoint_policy budget turns into
    layers that skip recompute, but launch more kernels per token: on an H200 1 x 2048 tokens is
    launch-bound and slower than 4 x 2048 (bench/README.md). null (default): micro-batches of
    train.per_device_train_batch_size rows."""
    cuda_graphs: bool
    """On CUDA, capture the decoder layers that skip recompute as CUDA graphs
    (medqlora/train/fast/graphs.py) at the first training micro-batch and replay them for every
    later one of the same shape: two graph launches instead of ~200 kernel launches a layer, so
    small micro-batches stop waiting on Python. Pays off with fixed-length rows and
    micro_batch_tokens = data.max_seq_length (all layers fit without recompute at 1 x 2048
    tokens; bench/README.md). Micro-batches with padding, document boundaries (packed or
    padding-free rows), another shape, and evaluation run eagerly. In graphed layers the LoRA
    dropout mask comes from a seed drawn on the device (medqlora/train/fast/lora_branch.py): the
    same keep rate, other draws than peft's. Off by default."""
    checkpoint_policy: str
    """all: recompute every decoder layer; none: keep all activations; budget: leave as many
    layers un-checkpointed as train.memory_budget_gib allows (all when the budget is null)."""
    fused_optimizer: bool
    """On CUDA, run adamw_torch as adamw_torch_fused (same update, one kernel)."""


@dataclass(frozen=True)
class TrainParams:
    """train: Training loop (TrainingArguments names). Reference effective batch: 4 x 4
    accumulation = 16 sequences per optimizer step."""
    num_train_epochs: float
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int
    """Optimizer steps to run; -1 runs num_train_epochs."""
    per_device_train_batch_size: int
    """Sequences per micro-batch per device."""
    per_device_eval_batch_size: int
    """Sequences per validation batch."""
    gradient_accumulation_steps: int
    """Micro-batches summed per optimizer step."""
    learning_rate: float
    """Peak learning rate of the adapter."""
    lr_scheduler_type: str
    """Learning-rate schedule after warmup."""
    warmup_ratio: float
    """Share of optimizer steps spent warming up (translated to warmup_steps, which transformers
    5 keeps)."""
    weight_decay: float
    """AdamW weight decay on adapter weights."""
    max_grad_norm: float
    """Gradient clipping norm (QLoRA paper: 0.3)."""
    optim: str
    """Optimizer (TrainingArguments.optim). paged_adamw_* needs a CUDA device; on CPU medqlora
    uses adamw_torch and says so."""
    mixed_precision: str
    """auto: bf16 where the device runs it, else fp16 on GPU, else none; or force bf16, fp16 or
    no."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass: far less memory, about 30% slower."""
    logging_steps: int
    """Log loss, learning rate and grad norm every this many optimizer steps."""
    eval_steps: int
    """Validation loss every this many optimizer steps (also the early-stopping clock)."""
    save_steps: int
    """Checkpoint every this many optimizer steps."""
    save_total_limit: int
    """Checkpoints kept (oldest deleted first)."""
    early_stopping_patience: int
    """Stop after this many evaluations without improvement of validation loss; 0 disables early
    stopping."""
    early_stopping_threshold: float
    """Smallest decrease of validation loss that counts as an improvement."""
    divergence_factor: float | None
    """Divergence guard: stop the run, with no adapter written, when the logged training loss
    stays above this many times the run's first logged loss for divergence_steps optimizer steps;
    no checkpoint is saved while it is above. null turns this rule off; a NaN or infinite loss,
    gradient or validation loss stops the run at once either way."""
    divergence_steps: int
    """Optimizer steps the training loss may stay above divergence_factor x its first logged
    value before the run stops (checked at every log, so at least logging_steps)."""
    adaptive_batch_size: bool
    """On CUDA out-of-memory, halve the micro-batch and double accumulation (same effective
    batch) and retry, saying so in the log."""
    init_adapter: str | None
    """An earlier adapter folder (or package folder) to continue from for incremental retraining;
    null starts a new adapter."""
    memory_budget_gib: float | None
    """Refuse to start when the estimated peak GPU memory exceeds this many GiB (null: the
    device's memory)."""
    fast_path: FastPathParams
    """The fast training path (medqlora/train/fast/fastpath.py; measured by
    bench/bench_train.py). Each switch can be turned off alone; GPU-only parts are skipped with a
    logged note where CUDA or liger-kernel is missing."""


@dataclass(frozen=True)
class BenchmarkParams:
    """evaluate.benchmarks[i]: One lm-evaluation-harness task on a local file in its public
    layout."""
    task: str
    """lm-evaluation-harness task name (the multimedqa group): medqa_4options (MedQA-USMLE 4
    options JSONL), medmcqa (MedMCQA JSON lines, cop 1-4), pubmedqa (PubMedQA labeled: JSON
    object PMID -> QUESTION/CONTEXTS/final_decision), mmlu_<subject> (MMLU CSV without header:
    question,A,B,C,D,answer)."""
    path: str
    """The scored file in its public layout, relative to the project root and under
    data/benchmarks/ (the folder dvc.yaml tracks), e.g. data/benchmarks/medqa/test.jsonl."""
    fewshot_path: str | None
    """File the few-shot examples are drawn from, same layout (MedQA/MedMCQA/PubMedQA train
    split, MMLU dev CSV); required when num_fewshot > 0, null otherwise."""
    num_fewshot: int
    """Examples put before each question by the harness (0: zero-shot, the harness's multimedqa
    default; MMLU is often reported 5-shot)."""
    limit: int | None
    """Score only the first `limit` items of the file (in file order); null scores them all
    (MedQA-4 test: 1,273)."""


@dataclass(frozen=True)
class EvaluateParams:
    """evaluate: Base vs adapter on the test split."""
    max_examples: int | None
    """Most test examples scored (caps cost); null scores them all."""
    max_new_tokens: int
    """Generation length cap (production default: 512)."""
    do_sample: bool
    """Sample (with temperature/top_p) instead of greedy decoding. false keeps evaluation
    deterministic."""
    temperature: float
    """Sampling temperature, used when do_sample is true (production: 0.7)."""
    top_p: float
    """Nucleus sampling mass, used when do_sample is true."""
    batch_size: int
    """Rows decoded together (continuous batching: a row that ends takes the next prompt at the
    next step); fewer on a GPU where their KV cache would not fit."""
    bootstrap_samples: int
    """Bootstrap resamples for the 95% confidence intervals of accuracy and BLEU."""
    compare_base: bool
    """Also score the base model (the baseline every delta is against)."""
    benchmark_batch_size: int
    """Requests per forward pass in the benchmark stage (lm-evaluation-harness batch size; one
    request = one prompt + one answer choice, ~300 tokens for MedQA). Its logits are batch x
    tokens x vocabulary, so a 128k-vocabulary base (Llama 3) needs a smaller batch than a 32k one
    (Mistral)."""
    benchmarks: tuple[BenchmarkParams, ...]
    """Standard benchmarks scored by the benchmark stage through lm-evaluation-harness (its task
    definitions, prompts and metrics), on local copies of the public files, for the base and for
    base + adapter as shipped (4-bit base + LoRA). Empty: the stage writes an empty result.
    README 'Standard benchmarks' says where to get each file."""


@dataclass(frozen=True)
class MergeParams:
    """merge: Merge the adapter into the base and prove parity."""
    enabled: bool
    """false skips merging: the package then holds the adapter only."""
    into: str
    """dequantized: the base's 4-bit weights dequantized to the compute dtype, i.e. the weights
    the adapter was trained against (default; avoids the QLoRA merge shift). original: the base's
    original high-precision weights."""
    dtype: str
    """Stored dtype of the merged weights. The merge itself always runs in float32 (W_deq +
    s*B*A), then the result is stored in this dtype. bfloat16 keeps 8 significant bits (a step of
    ~0.4% of |W|), coarser than most of a 7B adapter's update, so parity usually fails; float16
    keeps 11 bits (8x finer) at the same size; float32 keeps the update exactly at twice the
    size."""
    parity_prompts: int
    """Held-out prompts on which merged logits are compared with base + adapter; evaluate
    compares its dequantized decode copy with the 4-bit model on as many test items."""
    max_abs_logit_diff: float
    """Parity gate: the merged model's largest absolute logit difference to base + adapter may
    exceed the noise floor's largest (4-bit base vs its dequantized copy, no adapter) by at most
    this much."""
    min_top1_agreement: float
    """Parity gate: smallest allowed share of positions where the merged model and base + adapter
    pick the same next token; lowered to the noise floor's own agreement when that is lower (no
    merge can beat the weights it is stored in)."""
    max_effect_lost: float
    """Parity gate, read against what the adapter changed (base vs base + adapter, mean |logit
    difference|): the merge's own error (merged vs the same weights + adapter unmerged, float32)
    may be at most this fraction of that effect, and the merged model's difference to the 4-bit
    base + adapter may exceed the noise floor by at most the same fraction. 0.1: the merge keeps
    at least 90% of the adapter's effect. Evaluate holds its decode copy to the same fraction of
    the effect."""
    requantize: bool
    """Also re-quantize the merged model to 4-bit for serving and report its parity
    (informational)."""
    max_shard_size: str
    """Largest safetensors shard of the merged weights."""


@dataclass(frozen=True)
class PackageParams:
    """package: The deployable bundle."""
    name: str
    """Package and model-card name."""
    include_merged: bool
    """Ship the merged weights beside the adapter (needs merge.enabled)."""
    license: str
    """License of the adapter (SPDX id). Check the base model's license too."""


@dataclass(frozen=True)
class DistributedParams:
    """runner.distributed: Multi-GPU / multi-host training through accelerate launch."""
    num_processes: int
    """Processes in all (one per GPU)."""
    num_machines: int
    """Hosts taking part."""
    machine_rank: int
    """This host's rank (0 on the main host)."""
    main_process_ip: str | None
    """Address of the rank-0 host (multi-host only)."""
    main_process_port: int
    """Rendezvous port on the rank-0 host."""
    strategy: str
    """ddp when the model fits one card, fsdp (FSDP-QLoRA) when it does not."""
    keep_effective_batch: bool
    """Divide gradient_accumulation_steps by the process count so the effective batch stays the
    same."""


@dataclass(frozen=True)
class RunnerParams:
    """runner: Where stages run: on the host or in the project container."""
    backend: str
    """local runs on the host; docker re-executes each stage in the project image."""
    image: str | None
    """Image to run with backend docker; null uses the content-addressed tag medqlora:<hash of
    Dockerfile and lock>."""
    gpus: str | int | tuple[str, ...]
    """GPUs given to the container: "all", "none", a count, or a list of device ids."""
    shm_size: str
    """Shared memory of the container (data loader workers need more than Docker's 64 MB)."""
    env: tuple[str, ...]
    """Names of host environment variables passed into the container (values are never logged),
    e.g. HF_TOKEN."""
    mounts: tuple[str, ...]
    """Extra host folders mounted at the same path, e.g. a model cache."""
    network: str
    """Container network: none (default: nothing here needs one) or bridge (hub downloads)."""
    distributed: DistributedParams
    """Multi-GPU / multi-host training through accelerate launch."""


@dataclass(frozen=True)
class Params(ParamsMethods):
    """params.yaml: Every setting of the medqlora pipeline. Keys inside quantization, lora and
    train keep the names of BitsAndBytesConfig, LoraConfig and TrainingArguments. Defaults
    document the reference recipe (Mistral-7B QLoRA); params.yaml ships the CPU-sized embedded
    default."""
    seed: int
    """Seed for every random choice (initialisation, dropout, data order, sampling). The
    train/val/test split does not depend on it: it is a hash of each record's content."""
    data: DataParams
    """Raw sources and how the prepare stage validates, splits, templates and tokenises them."""
    model: ModelParams
    """The base model."""
    quantization: QuantizationParams
    """BitsAndBytesConfig for loading the base (QLoRA: 4-bit NF4, double quantization, bf16
    compute)."""
    lora: LoraParams
    """peft LoraConfig."""
    train: TrainParams
    """Training loop (TrainingArguments names). Reference effective batch: 4 x 4 accumulation =
    16 sequences per optimizer step."""
    evaluate: EvaluateParams
    """Base vs adapter on the test split."""
    merge: MergeParams
    """Merge the adapter into the base and prove parity."""
    package: PackageParams
    """The deployable bundle."""
    runner: RunnerParams
    """Where stages run: on the host or in the project container."""
    raw: dict[str, Any]
    """The validated mapping with defaults filled, as stages record it in meta.json."""
