"""QLoRA training speed and memory: the reference recipe vs medqlora's fast path, one GPU.

    python bench/bench_train.py --suite all --out results/      # every row (~16 min, H100)
    python bench/bench_train.py --suite main                    # Mistral-7B: reference, fast, ablations, parity
    python bench/bench_train.py --suite extra                   # Llama-3-8B and the variable-length scenario
    python bench/bench_train.py --suite smoke                   # 2 layers, a few steps: checks every code path

Models are random-init from the real configs below (no download), built in bf16 on the GPU and
quantized in place to NF4 + double quant with bitsandbytes (the weights bnb's from_pretrained
path would produce from a checkpoint; the kernels see the same shapes). Data are random
tokens, built here (no datasets/dvc). Each row runs in its own process so that one row's
kernels, monkey-patches and allocator state never leak into the next.

(a) reference: peft prepare_model_for_kbit_training + get_peft_model + HF Trainer (adamw_torch,
    bf16, gradient checkpointing), LoRA r=64 alpha=16 dropout=0.05 on all 7 projections,
    batch 4 x accumulation 4, sequence 2048 (4 x 4 x 2048 = 32,768 tokens an optimizer step).
(b) medqlora: medqlora.train.training.build_model + training_args + fastpath.apply -- the code path
    the train stage runs -- on the same shapes, with its checkpoint budget set to (a)'s
    measured peak allocated memory. The "1-row micro-batches" row splits each batch of 4 into
    micro-batches of 1 x 2048 (micro_batch_tokens 2048, accumulation 16): the same 32,768
    tokens an optimizer step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.archs import ARCHS  # noqa: E402
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, ACCUM, LR, SEED = 4, 4, 2e-4, 42
PEAK_FLOPS = 989e12       # H100/H200 SXM dense bf16, datasheet (measured here: ~790e12)
PARITY_TOL = 5e-3         # max |loss_fast - loss_ref| / loss_ref over the parity steps
GIB = 2**30
# Every fast-path switch, on; an ablation row turns one off.
FAST = dict(enabled="on", fused_kernels=True, fused_cross_entropy=True, fused_lora=True,
            frozen_in_compute_dtype=True, padding_free=True, varlen_attention=True,
            micro_batch_tokens=None, cuda_graphs=False, checkpoint_policy="budget",
            fused_optimizer=True)


# ---------------------------------------------------------------- rows

def row(label, arch="mistral-7b", variant="medqlora", scenario="fixed", seq=2048, warmup=2,
        steps=4, layers=None, dropout=0.05, packed=None, **fast):
    """One measurement: a model, a recipe, a data scenario. `packed`: the rows are prepare's
    packed rows (data.packing: examples best-fit into rows of `seq` tokens); by default the
    medqlora rows of the medical scenario are (the example recipe packs), the reference's not."""
    if packed is None:
        packed = variant == "medqlora" and scenario == "medical"
    return dict(label=label, arch=arch, variant=variant, scenario=scenario, seq=seq,
                warmup=warmup, steps=steps, layers=layers, dropout=dropout, packed=packed,
                fast={**FAST, **fast})


def suite(name: str) -> list[dict]:
    """The rows of a suite, references first (fast rows take their budget from them)."""
    short = dict(warmup=1, steps=3)   # ablations: fewer steps to fit a 10-minute device call
    ablations = [row("fast - liger kernels", fused_kernels=False, **short),
                 row("fast - fused CE", fused_cross_entropy=False, **short),
                 row("fast - fused LoRA", fused_lora=False, **short),
                 row("fast - bf16 frozen", frozen_in_compute_dtype=False, **short),
                 row("fast - budget (ckpt all)", checkpoint_policy="all", **short),
                 row("fast - fused AdamW", fused_optimizer=False, **short)]
    parity = [row("parity ref", variant="reference", seq=256, warmup=0, steps=20, dropout=0.0),
              row("parity fast", seq=256, warmup=0, steps=20, dropout=0.0)]
    # The same micro-batches in both (unpacked): padded rows + sdpa vs one padding-free row +
    # varlen attention, so the losses are comparable step by step.
    parity_medical = [row("parity ref", variant="reference", scenario="medical", warmup=0,
                          steps=20, dropout=0.0),
                      row("parity fast", scenario="medical", warmup=0, steps=20, dropout=0.0,
                          packed=False)]
    main = [row("reference", variant="reference"), row("medqlora fast")]
    # micro-batches of 2048 tokens (1 x 2048, accumulation 16): no recompute fits, but the
    # step is launch-bound (bench/profile_step.py)
    one_row = row("fast, 1-row micro-batches", micro_batch_tokens=2048)
    medical = [row("reference", variant="reference", scenario="medical"),
               row("medqlora fast", scenario="medical"),
               row("fast - varlen", scenario="medical", varlen_attention=False)]
    llama_pair = [row("reference", arch="llama-3-8b", variant="reference"),
                  row("medqlora fast", arch="llama-3-8b")]
    # ... and the same as CUDA graphs (medqlora/train/fast/graphs.py): the launch cost gone
    graphed = dict(micro_batch_tokens=2048, cuda_graphs=True, warmup=3)
    graphs = [main[0], row("fast, graphs 1x2048", **graphed),
              llama_pair[0], row("fast, graphs 1x2048", arch="llama-3-8b", **graphed)]
    extra = llama_pair + medical
    if name == "cpu-check":
        tiny = dict(arch="tiny", warmup=1, steps=1, seq=48)
        return [row("reference", variant="reference", **tiny), row("medqlora fast", **tiny),
                row("reference", variant="reference", scenario="medical", **tiny),
                row("medqlora fast", scenario="medical", **tiny),
                row("parity ref", variant="reference", scenario="medical", dropout=0.0, **tiny),
                row("parity fast", scenario="medical", dropout=0.0, packed=False, **tiny)]
    if name == "smoke":
        small = dict(layers=2, warmup=1, steps=2)
        return [row("reference", variant="reference", **small),
                row("medqlora fast", **small),
                row("fast ckpt none", checkpoint_policy="none", **small),
                row("fast ckpt all", checkpoint_policy="all", **small),
                row("reference", arch="llama-3-8b", variant="reference", **small),
                row("medqlora fast", arch="llama-3-8b", **small),
                row("reference", variant="reference", scenario="medical", **small),
                row("medqlora fast", scenario="medical", **small),
                row("parity ref", variant="reference", seq=256, warmup=0, steps=3, dropout=0.0,
                    layers=2),
                row("parity fast", seq=256, warmup=0, steps=3, dropout=0.0, layers=2)]
    return {"llama": llama_pair, "main": main + ablations[:5] + parity,
            "extra": main + extra + ablations[5:],
            "medical": medical[:2] + parity_medical, "medical-speed": medical[:2],
            "fixed": main + llama_pair,
            "micro": [main[0], one_row],
            "graphs": graphs, "graphs-mistral": graphs[:2],
            "all": main + [one_row] + extra + ablations + parity + parity_medical}[name]


# ---------------------------------------------------------------- data

def lengths_for(scenario: str, count: int, seq: int, seed: int) -> list[int]:
    """Example lengths. fixed: all `seq`. medical: lognormal, median 350 tokens, sigma 0.9
    (a QA/lab/MCQ mix: mean ~525, 1 in 20 over ~1,540), clipped to [32, seq]."""
    import numpy as np
    if scenario == "fixed":
        return [seq] * count
    rng = np.random.default_rng(seed)
    drawn = np.exp(np.log(350) + 0.9 * rng.standard_normal(count))
    return [int(v) for v in np.clip(drawn, 32, seq)]


def make_rows(scenario: str, count: int, seq: int, vocab: int, seed: int = SEED,
              packed: bool = False) -> list[dict]:
    """`count` random-token training rows (labels = inputs: every token trained). packed:
    rows of up to `seq` tokens filled best-fit with examples by prepare's own packer
    (medqlora.data.dataset.pack), in a seeded random order."""
    import random

    import torch
    gen = torch.Generator().manual_seed(seed)
    draw = count * (seq // 350 + 2) if packed else count   # ~4 medical examples a 2048 row
    examples = []
    for i, size in enumerate(lengths_for(scenario, draw, seq, seed)):
        ids = torch.randint(3, vocab, (size,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": list(ids), "length": size, "id": f"{i:07d}"})
    if not packed:
        return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    from medqlora.data.dataset import pack
    rows = pack(examples, seq)
    random.Random(seed).shuffle(rows)
    assert len(rows) >= count, (len(rows), count)
    return [{k: r[k] for k in ("input_ids", "labels", "position_ids", "seq_lens")}
            for r in rows[:count]]


@dataclasses.dataclass
class Counting:
    """Collator wrapper recording, per micro-batch: real tokens, positions computed, sum s^2."""
    inner: object
    log: list = dataclasses.field(default_factory=list)

    def __call__(self, rows):
        batch = self.inner(rows)
        sizes = [n for r in rows for n in r.get("seq_lens", [len(r["input_ids"])])]
        self.log.append((sum(sizes), batch["input_ids"].numel(), sum(s * s for s in sizes)))
        return batch


# ---------------------------------------------------------------- models

def build_base(arch: str, layers: int | None):
    """Random-init model of `arch` in NF4 + double quant (bf16 compute), built on the GPU.

    from_config in bf16 straight on the GPU (seconds; a 7B CPU init takes minutes), then every
    decoder nn.Linear becomes a bnb Linear4bit quantized from its own random weights, the
    same call bnb's loader makes (Params4bit.to(cuda) quantizes). lm_head and embeddings stay
    bf16, as BitsAndBytesConfig leaves them.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", quant_storage=torch.uint8,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4",
                                             quant_storage=torch.uint8, module=q).to(device)
                setattr(module, name, q)
                del child
    model.is_loaded_in_4bit = True       # what peft checks to treat it as a k-bit model
    model.config.use_cache = False
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def reference(spec: dict, base, out_dir: str):
    """(a): the recipe exactly, as a user would write it with peft + Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainingArguments, set_seed

    from medqlora.train.collation import Collator
    set_seed(SEED)
    model = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=64, lora_alpha=16, lora_dropout=spec["dropout"], target_modules=TARGETS,
        bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.3, optim="adamw_torch",
        bf16=True, gradient_checkpointing=True, max_steps=spec["warmup"] + spec["steps"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, seed=SEED, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available())
    return model, Collator(pad_token_id=0), args


def medqlora_path(spec: dict, base, out_dir: str, budget_gib: float | None):
    """(b): medqlora.train.training's own model/args code + fastpath.apply, as the train stage runs."""
    import yaml
    from transformers import set_seed

    from medqlora.train import collation

    from medqlora.core import config

    from medqlora.train.fast import fastpath

    from medqlora.core import modeling

    from medqlora.train import planning

    from medqlora.train import run_context

    from medqlora.train import training
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["seed"] = SEED
    doc["data"]["max_seq_length"] = spec["seq"]
    doc["lora"].update(r=64, lora_alpha=16, lora_dropout=spec["dropout"], target_modules=TARGETS)
    doc["train"].update(
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, learning_rate=LR,
        lr_scheduler_type="constant", warmup_ratio=0.0, max_grad_norm=0.3, optim="adamw_torch",
        mixed_precision="bf16", gradient_checkpointing=True, logging_steps=1,
        max_steps=spec["warmup"] + spec["steps"], memory_budget_gib=budget_gib,
        fast_path=spec["fast"], init_adapter=None)
    params = config.build_params(doc)
    ctx = run_context.build(params, modeling.resolve_precision(params.quantization, "bf16"))
    modeling.load_base = lambda *a, **k: base   # the random-init NF4 base instead of a download
    set_seed(params.seed)                        # as training.fit does before build_model
    model = training.build_model(params, ctx.precision)
    plan = planning.make_plan(params, 10**6, BATCH, ACCUM)
    args = training.training_args(params, ctx, plan, Path(out_dir), fresh=True)
    args = dataclasses.replace(args, eval_strategy="no", eval_on_start=False, save_strategy="no",
                               load_best_model_at_end=False, metric_for_best_model=None)
    model, collator, args = fastpath.apply(model, params, args,
                                           collation.Collator(pad_token_id=0), plan=ctx.fast_path)
    collator, _ = training.host_counts(model, collator)   # as training.fit
    return model, collator, args


# ---------------------------------------------------------------- one row (child process)

def run_row(spec: dict, budget_gib: float | None) -> dict:
    """Build, train warmup + steps optimizer steps, return timings, losses and memory."""
    import torch
    from transformers import Trainer, TrainerCallback
    if spec["scenario"] != "fixed" and torch.cuda.is_available():
        # Every micro-batch has a new length; cuDNN attention builds a plan per shape (seen in
        # the smoke run: ~1 s a micro-batch), a cost a long run amortises and a 6-step bench
        # cannot. Off in both (a) and (b) of this scenario, so neither pays it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    t0 = time.perf_counter()
    base = build_base(spec["arch"], spec["layers"])
    build_s = time.perf_counter() - t0
    out_dir = tempfile.mkdtemp(prefix="bench-")
    if spec["variant"] == "reference":
        model, collator, args = reference(spec, base, out_dir)
    else:
        model, collator, args = medqlora_path(spec, base, out_dir, budget_gib)
    counting = Counting(collator)
    total = spec["warmup"] + spec["steps"]
    vocab = ARCHS[spec["arch"]]["vocab_size"]
    data = make_rows(spec["scenario"], total * BATCH * ACCUM, spec["seq"], vocab,
                     packed=spec["packed"])
    times: list[float] = []
    profiling = bool(spec.get("profile_dir")) and spec["variant"] != "reference"

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        profiler = python = None

        def on_train_begin(self, *a, **k):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **k):
            if profiling and state.global_step == total - 2:    # the host's Python, by call
                import cProfile
                self.python = cProfile.Profile()
                self.python.enable()
            if profiling and state.global_step == total - 1:    # the last optimizer step
                from torch.profiler import ProfilerActivity, profile
                self.profiler = profile(activities=[ProfilerActivity.CPU,
                                                    ProfilerActivity.CUDA], with_stack=True)
                self.profiler.__enter__()
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t)
            if self.python is not None:
                self.python.disable()
                write_python_profile(self.python, spec)
                self.python = None
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                write_profile(self.profiler, spec, times[-1])
                self.profiler = None

    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting,
                      callbacks=[Timer()])
    trainer.train()
    accum = args.gradient_accumulation_steps      # the fast path may split micro-batches
    micro = counting.log[spec["warmup"] * accum: total * accum]
    timed = times[spec["warmup"]:]
    skipped = sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", True)
                  is False and type(m).__name__.endswith("DecoderLayer"))
    graphed = getattr(model, "medqlora_graphs", None)
    return {
        **spec, "budget_gib": budget_gib, "build_s": build_s, "step_s": timed,
        "attention": getattr(model.config, "_attn_implementation", None),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "tokens": sum(m[0] for m in micro), "positions": sum(m[1] for m in micro),
        "sum_sq": sum(m[2] for m in micro),
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
        "graphs": graphed.summary() if graphed else None,
        "optim": str(getattr(args.optim, "value", args.optim)), "layers_not_recomputed": skipped,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "versions": versions(),
    }


def write_profile(prof, spec: dict, step_s: float) -> None:
    """The profiled optimizer step: GPU busy time against wall time, the ops with the most
    device time and the most host time (where a step's time goes inside the Trainer)."""
    import torch
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    head = (f"{spec['label']} ({spec['arch']}, {spec['scenario']}): one optimizer step, "
            f"wall {step_s * 1e3:.0f} ms (profiled), GPU kernels {gpu_us / 1e3:.0f} ms "
            f"({100 * gpu_us / 1e3 / (step_s * 1e3):.0f}% busy)")
    report = "\n\n".join([head,
                           events.table(sort_by="self_device_time_total", row_limit=40,
                                        max_name_column_width=70),
                           events.table(sort_by="self_cpu_time_total", row_limit=30,
                                        max_name_column_width=70)])
    name = profile_name("profile", spec)
    out = Path(spec["profile_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(report)
    prof.export_chrome_trace(str(out / f"{name}.trace.json"))


def write_python_profile(prof, spec: dict) -> None:
    """cProfile of one optimizer step: the host's Python by function (cumulative, own time)."""
    import io
    import pstats
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    (Path(spec["profile_dir"]) / f"{profile_name('python', spec)}.txt").write_text(text.getvalue())


def profile_name(kind: str, spec: dict) -> str:
    """File stem for a row's profile: kind-arch-scenario-label, no spaces or commas."""
    return f"{kind}-{spec['arch']}-{spec['scenario']}-{spec['label']}".replace(
        " ", "_").replace(",", "")


def versions() -> dict:
    """Library versions on the machine that ran the row."""
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel",
                 "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- arithmetic for the table

def model_flops(res: dict) -> float:
    """Useful FLOPs of the timed steps: 4N per token for the frozen NF4 linears and lm_head
    (forward 2N + input gradients 2N; no weight gradients), 6N for LoRA (weight grads too),
    plus causal attention 6 x s^2 x hidden per example per layer (forward 2 s^2 h, backward
    twice that). Recompute is not counted (it is overhead, not model work)."""
    a = ARCHS[res["arch"]]
    h, i, L = a["hidden_size"], a["intermediate_size"], res["layers"] or a["num_hidden_layers"]
    kv = h * a["num_key_value_heads"] // a["num_attention_heads"]
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    lora = L * 64 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    head = h * a["vocab_size"]
    return res["tokens"] * (4 * (linear + head) + 6 * lora) + L * 6 * h * res["sum_sq"]


def summarize(res: dict, ref: dict | None) -> dict:
    """Table values for one row."""
    seconds = sum(res["step_s"])
    tps = res["tokens"] / seconds
    out = {"row": res["label"], "arch": res["arch"], "scenario": res["scenario"],
           "tokens/s": tps, "median step s": statistics.median(res["step_s"]),
           # a CUDA graph's pool is invisible to max_memory_allocated during replays: graph
           # rows report the reserved peak, which includes it
           "peak GiB": res["peak_reserved_gib"] if res.get("graphs") else res["peak_alloc_gib"],
           "peak reserved GiB": res["peak_reserved_gib"],
           "x ref": None, "MFU %": 100 * model_flops(res) / seconds / PEAK_FLOPS,
           "padding waste %": 100 * (1 - res["tokens"] / res["positions"]),
           "no-recompute layers": res["layers_not_recomputed"], "attention": res.get("attention")}
    if ref is not None:
        out["x ref"] = tps / (ref["tokens"] / sum(ref["step_s"]))
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of summarize() rows."""
    keys = list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:,.2f}" if isinstance(v, float) and v < 100  # noqa: E731
                                           else f"{v:,.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def parity(results: list[dict]) -> str:
    """Loss parity of each 'parity' pair (one per scenario): per-step relative difference
    against PARITY_TOL."""
    pairs: dict[str, dict] = {}
    for r in results:
        if r["label"].startswith("parity"):
            pairs.setdefault(r["scenario"], {})[r["variant"]] = r
    lines = []
    for scenario, pair in pairs.items():
        if len(pair) < 2:
            continue
        ref, fast = pair["reference"]["losses"], pair["medqlora"]["losses"]
        rel = [abs(f - r) / abs(r) for r, f in zip(ref, fast)]
        verdict = "PASS" if rel and max(rel) <= PARITY_TOL else "FAIL"
        lines.append(
            f"parity {scenario} ({len(rel)} steps, seq {pair['medqlora']['seq']}, lora_dropout 0 "
            f"in both, same seed/data/optimizer steps): max |rel diff| {max(rel):.2e} "
            f"(tol {PARITY_TOL:.0e}) {verdict}\n"
            f"  ref : {' '.join(f'{v:.4f}' for v in ref)}\n"
            f"  fast: {' '.join(f'{v:.4f}' for v in fast)}")
    return "\n".join(lines) or "parity: not run"


# ---------------------------------------------------------------- driver

def ref_key(spec: dict) -> tuple:
    """Which reference a row is compared with (and takes its memory budget from)."""
    return (spec["arch"], spec["scenario"], spec["seq"], spec["layers"],
            spec["label"].startswith("parity"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="all",
                        choices=["all", "main", "extra", "medical", "medical-speed", "fixed",
                                 "micro", "llama", "graphs", "graphs-mistral", "smoke",
                                 "cpu-check"])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--row", help=argparse.SUPPRESS)       # child process: one row (json)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="each medqlora row: cProfile of its next-to-last optimizer step "
                             "(python-*.txt), torch.profiler of its last (profile-*.txt and a "
                             "Chrome trace) under --out; those steps run slower")
    args = parser.parse_args(argv)
    if args.row:
        print("RESULT " + json.dumps(run_row(json.loads(args.row), args.budget)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, refs = [], {}
    for spec in suite(args.suite):
        if args.profile:
            spec["profile_dir"] = str(out.resolve())
        key = ref_key(spec)
        ref = refs.get(key)
        budget = ref["peak_alloc_gib"] if ref and ref["peak_alloc_gib"] > 0 else None
        cmd = [sys.executable, __file__, "--row", json.dumps(spec)]
        if budget is not None:
            cmd += ["--budget", f"{budget:.3f}"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"[{spec['label']} {spec['arch']} {spec['scenario']}] FAILED rc={proc.returncode}"
                  f"\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(lines[-1][7:])
        results.append(res)
        if spec["variant"] == "reference":
            refs[key] = res
        summary = summarize(res, refs.get(key) if spec["variant"] != "reference" else None)
        print(f"[{time.perf_counter() - started:.0f}s] " + json.dumps(summary), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if not results:
        return 1
    rows = []
    for res in results:
        key = ref_key(res)
        rows.append(summarize(res, refs.get(key) if res["variant"] != "reference" else None))
    first = results[0]
    report = (f"device: {first['device']}; versions: {json.dumps(first['versions'])}\n"
              f"batch {BATCH} x accumulation {ACCUM}; LoRA r=64 alpha=16 on {len(TARGETS)} "
              f"projections; NF4 + double quant, bf16 compute; MFU = useful FLOPs (4N frozen + "
              f"6N LoRA + causal attention, recompute not counted) / {PEAK_FLOPS / 1e12:.0f} "
              f"TFLOP/s\n\n{table(rows)}\n\n{parity(results)}\n")
    (out / "table.md").write_text(report)
    print("\n" + report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
