"""The train stage on a tiny Llama (and a tiny Mistral for the reference recipe), on CPU, offline.

Fixtures build their own base (2-layer Llama, hidden 64, byte-level BPE) and a prepared-data
folder following the contract (input_ids / labels with -100 on the prompt), so these tests do
not depend on the prepare stage. Every run is real: NF4 4-bit through bitsandbytes, peft LoRA,
the Hugging Face Trainer, checkpoints on disk.

    pytest tests/test_train.py          # about 2 minutes on 2 cores
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT, set_key
from medqlora.train import checkpoints
from medqlora.core import cpu_numerics, modeling
from medqlora.train import planning
from medqlora.train import run_context
from medqlora.train import training
from medqlora.train.callbacks import DivergenceGuard, Diverged, TokensSeen
from medqlora.train.collation import REAL_TOKENS, Collator, WithTokenCount
from medqlora.core.config import build_params, validate_document
from medqlora.core.outputs import sha256_tree
from medqlora.core.provenance import write_meta

FACTS = [("anemia", "low hemoglobin"), ("diabetes", "high blood glucose"),
         ("asthma", "narrow airways"), ("hepatitis", "liver inflammation"),
         ("gastritis", "stomach inflammation"), ("eczema", "itchy skin"),
         ("stroke", "loss of blood supply to the brain"), ("dehydration", "lack of body water")]
PROMPT = "### Instruction:\nWhat is {}?\n\n### Response:\n"
# 26 rows / batch 4 = 7 micro-batches; / accum 2 = 4 optimizer steps per epoch (ceil);
# x 1.5 epochs = 6 steps; warmup 0.1 x 6 = 0.6 -> 1 step.
SHORT = {"train.max_steps": -1, "train.num_train_epochs": 1.5,
         "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 2,
         "train.learning_rate": 0.01, "train.warmup_ratio": 0.1, "train.logging_steps": 1,
         "train.eval_steps": 3, "train.save_steps": 3, "train.early_stopping_patience": 3,
         "train.gradient_checkpointing": True}  # the reference recipe's path (use_reentrant False)
TRAIN_ROWS = 26


# ---------------------------------------------------------------- fixtures

def _tokenizer(dest: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = [PROMPT.format(d) + f"{d} is {f}." for d, f in FACTS] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(dest)
    return fast


def make_base(dest: Path, arch: str = "llama") -> Path:
    """A random tiny causal LM; every Linear dimension a multiple of 64 (bnb 4-bit blocks)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)
    tokenizer = _tokenizer(dest)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                 tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "mistral":
        MistralForCausalLM(MistralConfig(**sizes, sliding_window=None)).save_pretrained(dest)
    else:
        LlamaForCausalLM(LlamaConfig(**sizes)).save_pretrained(dest)
    return dest


def make_prepared(dest: Path, base: Path, packed: bool = False) -> Path:
    """data/prepared per the contract (train/val/test.parquet; train_packed.parquet if packed)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    dest.mkdir(parents=True, exist_ok=True)

    def rows(n):
        out = []
        for _ in range(n):
            disease, fact = FACTS[rng.randrange(len(FACTS))]
            prompt = tok(PROMPT.format(disease), add_special_tokens=False)["input_ids"]
            answer = tok(f"{disease} is {fact}.", add_special_tokens=False)["input_ids"]
            answer = answer + [tok.eos_token_id]
            out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                        "length": len(prompt) + len(answer)})
        return out

    ints = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", ints), ("labels", ints), ("length", pa.int32())])
    train = rows(TRAIN_ROWS)
    for name, table in (("train", train), ("val", rows(8)), ("test", rows(8))):
        pq.write_table(pa.Table.from_pylist(table, schema=schema), dest / f"{name}.parquet")
    if packed:  # two examples per row, positions restarting at each example
        pairs = [train[i:i + 2] for i in range(0, len(train), 2)]
        packed_rows = [{"input_ids": sum((r["input_ids"] for r in p), []),
                        "labels": sum((r["labels"] for r in p), []),
                        "position_ids": sum((list(range(r["length"])) for r in p), []),
                        "seq_lens": [r["length"] for r in p]} for p in pairs]
        pq.write_table(pa.Table.from_pylist(packed_rows), dest / "train_packed.parquet")
    write_meta(dest, stage="prepare", params={}, inputs={},  # the writer prepare uses
               extra={"max_seq_length": 128, "packing": packed})
    return dest


def make_params(base: Path, overrides: dict, source: Path = ROOT / "params.yaml"):
    """Typed params from a params file with dotted overrides; the result must validate."""
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    for key, value in {"model.base": str(base), **overrides}.items():
        set_key(doc, key, value)
    assert validate_document(doc, ROOT) == []
    return build_params(doc), doc


def train_once(params, data: Path, out: Path):
    """Run the train stage's library call into `out`; returns (metrics, paths)."""
    paths = {"adapter": out / "adapter", "ckpt": out / "ckpt", "live": out / "live",
             "metrics": out / "train.json"}
    metrics = training.run(params, data, paths["adapter"], paths["ckpt"], paths["live"],
                           paths["metrics"])
    return metrics, paths


def stage_command(base: Path, data: Path, out: Path, overrides: dict = SHORT) -> list[str]:
    """`python stages/train.py ...` on a params file with `overrides`, writing under `out`
    (the params file too): the stage as DVC runs it, stage.start's CPU pins included."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in {"model.base": str(base), **overrides}.items():
        set_key(doc, key, value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return [sys.executable, "stages/train.py", "--params", str(out / "params.yaml"),
            "--data", str(data), "--out", str(out / "adapter"), "--checkpoints",
            str(out / "ckpt"), "--live", str(out / "live"), "--metrics", str(out / "train.json")]


def final_state(ckpt_root: Path) -> dict:
    """trainer_state.json of the newest checkpoint of the only run under `ckpt_root`."""
    (run_dir,) = list(ckpt_root.iterdir())
    return json.loads((checkpoints.checkpoints(run_dir)[0] / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, base) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"), base)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, base, data):
    """One uninterrupted short run, shared by the tests that compare against it."""
    params, _ = make_params(base, SHORT)
    metrics, paths = train_once(params, data, tmp_path_factory.mktemp("short"))
    return params, metrics, paths


# ---------------------------------------------------------------- fast, no training

def test_warmup_translation_arithmetic():
    # 1,000 rows / batch 8 = 125 micro-batches; / accum 2 = 62.5 -> 63 steps; x 3 = 189.
    assert planning.total_optimizer_steps(1000, 8, 2, 3, -1) == 189
    assert planning.warmup_steps(0.03, 189) == 6          # 5.67 -> 6
    assert planning.total_optimizer_steps(26, 4, 2, 1.5, -1) == 6   # 7 -> 4 per epoch, x 1.5
    assert planning.total_optimizer_steps(1000, 8, 2, 3, 40) == 40  # max_steps wins
    assert planning.warmup_steps(0.1, 40) == 4            # exactly 4.0, not 5
    assert planning.warmup_steps(0.03, 10) == 1          # 0.3 -> 1
    assert planning.warmup_steps(0.0, 189) == 0
    assert planning.total_optimizer_steps(3, 8, 4, 1, -1) == 1      # never zero


def test_cuda_only_optimizer_falls_back_on_cpu():
    assert planning.resolve_optim("paged_adamw_8bit", "cpu")[0] == "adamw_torch"
    assert "needs CUDA" in planning.resolve_optim("paged_adamw_32bit", "cpu")[1][0]
    assert planning.resolve_optim("paged_adamw_8bit", "cuda") == ("paged_adamw_8bit", [])


def test_collator_pads_labels_and_packed_positions():
    collate = Collator(pad_token_id=3)
    out = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                   {"input_ids": [8], "labels": [8]}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = collate([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8],
                       "position_ids": [0, 1, 0, 1]},
                      {"input_ids": [9, 9], "labels": [9, 9], "position_ids": [0, 1]}])
    # Padding becomes its own "example" (positions from 0), so it attends to nothing real.
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert packed["labels"].tolist()[1] == [9, 9, -100, -100]
    assert "attention_mask" not in packed


@pytest.mark.slow    # runs a (one-line) torch module
def test_tokens_seen_are_counted_on_the_host_from_what_trained():
    # transformers' own count reads a device tensor back every micro-batch (a host sync);
    # here the collator counts real tokens on the host and a pre-hook adds up training ones
    collate = WithTokenCount(Collator(pad_token_id=3))
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                     {"input_ids": [8], "labels": [8]}])
    assert batch[REAL_TOKENS] == 4 and batch["input_ids"].numel() == 6   # padding not counted
    assert WithTokenCount(types.SimpleNamespace(efficiency=0.75)).efficiency == 0.75

    class Model(torch.nn.Module):              # takes no REAL_TOKENS kwarg: the hook removes it
        def forward(self, input_ids, labels, attention_mask):
            return input_ids.sum()

    model = Model()
    seen = TokensSeen(model)
    model.train()
    model(**batch)
    model(**batch)
    with torch.no_grad():
        model(**batch)                          # no gradient: not trained on
    model.eval()
    model(**batch)                              # evaluation: not counted
    state = types.SimpleNamespace(num_input_tokens_seen=100)   # e.g. resumed at 100
    seen.on_step_end(None, state, None)
    assert state.num_input_tokens_seen == 108 and seen.pending == 0
    seen.on_step_end(None, state, None)
    assert state.num_input_tokens_seen == 108


@pytest.mark.slow
def test_the_trainers_parameter_count_is_taken_once(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = model.num_parameters(exclude_embeddings=True)
    assert expected == sum(p.numel() for n, p in model.named_parameters()
                           if "embed_tokens" not in n)
    walks = []
    counted = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters",
                        lambda self, **kw: walks.append(kw) or counted(self, **kw))
    training.host_counts(model, Collator(pad_token_id=0))
    # what the Trainer asks after every micro-batch (state.total_flos)
    assert [model.num_parameters(exclude_embeddings=True) for _ in range(3)] == [expected] * 3
    assert walks == [{"exclude_embeddings": True}]          # walked once
    assert model.num_parameters(only_trainable=True) == expected + sum(   # other questions:
        p.numel() for n, p in model.named_parameters() if "embed_tokens" in n)   # asked anew
    assert len(walks) == 2


def test_fingerprint_changes_with_weight_shaping_params_only():
    sections = {"seed": 1, "train": {"learning_rate": 0.1, "save_total_limit": 2}}
    key = checkpoints.fingerprint(sections, "abc")
    assert checkpoints.fingerprint({**sections, "seed": 2}, "abc") != key
    assert checkpoints.fingerprint(sections, "abd") != key
    kept = {"seed": 1, "train": {"learning_rate": 0.1, "save_total_limit": 5}}
    assert checkpoints.fingerprint(kept, "abc") == key


def test_cuda_oom_halves_batch_and_doubles_accumulation(monkeypatch, caplog, tiny_model,
                                                       tmp_path):
    params, _ = make_params(tiny_model, SHORT)  # fit is faked: no model is built
    tried = []

    def fake_fit(params, ctx, tokenizer, data, run_dir, live_dir, plan):
        tried.append((plan.batch, plan.accum))
        if plan.batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return training.Attempt("trainer", None, 1.0, plan, ctx)

    monkeypatch.setattr(training, "fit", fake_fit)
    cuda = run_context.build(params, modeling.Precision("cuda", torch.bfloat16, True, False, ()))
    rows = ([0] * TRAIN_ROWS, [0] * 8)
    with caplog.at_level(logging.WARNING, logger="medqlora.train.training"):
        plan = training.fit_adaptive(params, cuda, None, rows, tmp_path, tmp_path).plan
    assert tried == [(4, 2), (2, 4), (1, 8)]  # effective batch 8 throughout
    assert (plan.batch, plan.accum) == (1, 8)
    assert sum("CUDA out of memory" in r.getMessage() for r in caplog.records) == 2
    cpu = run_context.build(params, modeling.Precision("cpu", torch.bfloat16, True, False, ()))
    tried.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no retry off CUDA
        training.fit_adaptive(params, cpu, None, rows, tmp_path, tmp_path)
    assert tried == [(4, 2)]


def test_run_context_records_the_optimizer_that_runs(tiny_model, monkeypatch):
    params, _ = make_params(tiny_model, {"train.optim": "adamw_torch",
                                         "train.fast_path.enabled": "auto"})
    cuda = modeling.Precision("cuda", torch.bfloat16, True, False, ())
    cpu = modeling.Precision("cpu", torch.float32, False, False, ())
    # auto: the fast path runs on CUDA only, and with it the fused AdamW
    assert run_context.build(params, cuda).optim == "adamw_torch_fused"
    assert run_context.build(params, cpu).optim == "adamw_torch"
    paged, _ = make_params(tiny_model, {"train.optim": "paged_adamw_8bit"})
    ctx = run_context.build(paged, cpu)
    assert ctx.optim == "adamw_torch" and "needs CUDA" in ctx.notes[0]
    assert (ctx.world_size, ctx.rank, ctx.strategy, ctx.is_main) == (1, 0, "single", True)
    record = ctx.as_dict()
    assert {k: record[k] for k in ("device", "compute_dtype", "mixed_precision", "optim",
                                   "strategy", "attn_implementation")} == {
        "device": "cpu", "compute_dtype": "float32", "mixed_precision": "no",
        "optim": "adamw_torch", "strategy": "single", "attn_implementation": None}
    assert record["fast_path"]["fused_optimizer"] is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    two = run_context.build(params, cpu)  # a CPU launch is DDP over gloo, whatever was asked
    assert (two.world_size, two.rank, two.strategy, two.is_main) == (2, 1, "ddp", False)


def _guard_log(guard, state, control, step: int, **logs) -> None:
    state.global_step = step
    guard.on_log(None, state, control, logs=logs)


def test_divergence_guard_stops_a_loss_far_above_its_start_and_saves_nothing_meanwhile():
    from transformers import TrainerControl, TrainerState
    guard = DivergenceGuard(factor=4.0, steps=3)
    state, control = TrainerState(), TrainerControl()
    guard.on_train_begin(None, state, control)
    _guard_log(guard, state, control, 1, loss=2.0)   # the start: the limit is 4 x 2.0 = 8.0
    _guard_log(guard, state, control, 2, loss=8.0)   # not above: last good step 2
    control.should_save = True
    _guard_log(guard, state, control, 3, loss=8.5)   # above for 1 step
    assert control.should_save is False              # no checkpoint from these weights
    control.should_save = True
    guard.on_step_end(None, state, control)          # a save step between two logs
    assert control.should_save is False
    _guard_log(guard, state, control, 4, loss=9.0)   # 2 steps
    with pytest.raises(Diverged) as err:
        _guard_log(guard, state, control, 5, loss=9.5)  # 3 steps = train.divergence_steps
    assert str(err.value) == (
        "train: diverged at step 5: the training loss (9.5) has stayed above "
        "train.divergence_factor x its first logged value (4 x 2 = 8) for 3 steps "
        "(train.divergence_steps: 3)")
    # Coming back below resets the count and allows saving again.
    guard = DivergenceGuard(factor=4.0, steps=3)
    guard.on_train_begin(None, state, control)
    for step, loss in ((1, 2.0), (2, 9.0), (3, 9.0), (4, 3.0), (5, 9.0), (6, 9.0)):
        _guard_log(guard, state, control, step, loss=loss)
    control.should_save = True
    _guard_log(guard, state, control, 7, loss=1.0)
    assert control.should_save is True and guard.last_ok == 7


def test_divergence_guard_replays_history_on_resume_and_can_be_turned_off():
    from transformers import TrainerControl, TrainerState
    state, control = TrainerState(), TrainerControl()
    state.log_history = [{"eval_loss": 2.2, "step": 0}, {"loss": 2.0, "step": 1},
                         {"loss": 8.5, "step": 2}, {"loss": 8.6, "step": 3}]
    guard = DivergenceGuard(factor=4.0, steps=3)
    guard.on_train_begin(None, state, control)       # resumed at step 3: above since step 1
    assert (guard.start, guard.last_ok, guard.above) == (2.0, 1, True)
    with pytest.raises(Diverged, match="at step 4: .* for 3 steps"):
        _guard_log(guard, state, control, 4, loss=8.7)
    off = DivergenceGuard(factor=None, steps=3)
    off.on_train_begin(None, state, control)
    _guard_log(off, state, control, 9, loss=1e6)     # factor null: no limit on a finite loss
    with pytest.raises(Diverged, match="^train: diverged at step 10: loss is nan$"):
        _guard_log(off, state, control, 10, loss=float("nan"))  # never off for non-finite


@pytest.mark.parametrize("logs, scaled, message", [
    ({"loss": float("inf")}, False, "step 7: loss is inf"),
    ({"eval_loss": float("nan")}, False, "step 7: eval_loss is nan"),
    ({"loss": 2.0, "grad_norm": float("inf")}, False, "step 7: grad_norm is inf"),
    ({"loss": 2.0, "grad_norm": float("inf")}, True, None),  # fp16: the loss scaler's skip
    ({"loss": float("nan"), "grad_norm": 1.0}, True, "step 7: loss is nan"),
])
def test_divergence_guard_refuses_non_finite_logs(logs, scaled, message):
    from transformers import TrainerControl, TrainerState
    guard = DivergenceGuard(factor=4.0, steps=20, scaled=scaled)
    state, control = TrainerState(), TrainerControl()
    guard.on_train_begin(None, state, control)
    if message is None:
        _guard_log(guard, state, control, 7, **logs)
    else:
        with pytest.raises(Diverged, match=message):
            _guard_log(guard, state, control, 7, **logs)


def test_divergence_guard_checks_gradients_before_the_optimizer_step():
    from transformers import TrainerControl, TrainerState
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)            # frozen, as the 4-bit base is
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model[0].weight.grad[0, 0] = float("nan")        # a frozen tensor is not checked
    state, control = TrainerState(), TrainerControl()
    state.global_step = 4
    guard = DivergenceGuard(factor=None, steps=1)
    guard.on_pre_optimizer_step(None, state, control, model=model)  # trainable grads finite
    model[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(Diverged) as err:
        guard.on_pre_optimizer_step(None, state, control, model=model)
    assert str(err.value) == ("train: diverged at step 5: the gradient is not finite in 1 of 3 "
                              "trainable tensors (first: 1.weight); the loss or its gradient "
                              "overflowed, the optimizer step was not taken")
    scaled = DivergenceGuard(factor=None, steps=1, scaled=True)
    scaled.on_pre_optimizer_step(None, state, control, model=model)  # fp16: the scaler skips


# ---------------------------------------------------------------- real runs

# lora_alpha 4096 / r 1 = a 4096 x update at learning rate 1: step 1 is finite (B starts at 0),
# the gradient of step 3 is NaN (measured: all 28 LoRA tensors, 2 layers x 7 x A, B).
DIVERGE = {**SHORT, "lora.r": 1, "lora.lora_alpha": 4096, "train.learning_rate": 1.0,
           "train.warmup_ratio": 0.0, "train.max_steps": 8, "train.save_steps": 1,
           "train.eval_steps": 100, "train.early_stopping_patience": 0,
           # float16 compute overflows at step 2 whatever the CPU kernels (bf16 did at step 3
           # with AVX-512 kernels, and never with the pinned AVX2 ones)
           "quantization.bnb_4bit_compute_dtype": "float16"}

@pytest.mark.slow
def test_base_is_really_4bit_and_lora_wraps_every_projection(base):
    import bitsandbytes as bnb
    params, _ = make_params(base, SHORT)
    model = training.build_model(params, modeling.resolve_precision(params.quantization, "auto"))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down; lm_head stays dense
    assert all(m.weight.dtype == torch.uint8 for m in model.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    # r=16: per layer q,o 64->64 (2 x 16 x (64+64)), k,v 64->64, gate/up 64->128, down 128->64
    trainable, _ = modeling.trainable_parameters(model)
    per_layer = 4 * 16 * (64 + 64) + 3 * 16 * (64 + 128)
    assert trainable == 2 * per_layer


@pytest.mark.slow
def test_short_run_learns_and_writes_a_safetensors_only_adapter(short_run, base, data):
    params, metrics, paths = short_run
    assert metrics["global_step"] == 6 and metrics["warmup_steps"] == 1
    assert metrics["effective_batch"] == 8 and metrics["total_steps_planned"] == 6
    state = final_state(paths["ckpt"])
    assert state["max_steps"] == 6  # the Trainer's own count matches our warmup arithmetic
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05
    assert metrics["eval_loss"] < metrics["eval_loss_start"] - 0.05
    # 1.5 epochs of 26 rows, batch 4: every row once, then the first 4 micro-batches (16 rows)
    # of the second epoch's shuffle; real tokens only (no padding)
    lengths = sorted(pq.read_table(data / "train.parquet").column("length").to_pylist())
    assert sum(lengths) + sum(lengths[:16]) <= metrics["tokens_seen"] <= \
        sum(lengths) + sum(lengths[-16:])
    assert metrics["trainable_params"] == 2 * (4 * 16 * 128 + 3 * 16 * 192)
    # train.json holds what the same inputs always give; this run's speed, memory and resume
    # go beside it to measured/train.json (not git-tracked, not a DVC output)
    written = json.loads(paths["metrics"].read_text())
    measured = json.loads((paths["metrics"].parent / "measured" / "train.json").read_text())
    assert sorted(measured) == sorted(training.MEASURED) and measured["resumed_from_step"] == 0
    assert measured["tokens_per_second"] > 0 and measured["peak_memory_gib"] > 0
    assert written == {k: v for k, v in metrics.items() if k not in training.MEASURED}

    files = sorted(p.name for p in paths["adapter"].iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json",
            "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for file in paths["adapter"].iterdir():   # nothing pickled: no torch.save files at all
        assert file.suffix not in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, file
        assert not file.read_bytes().startswith(b"\x80"), f"{file} looks like a pickle"
    meta = json.loads((paths["adapter"] / "meta.json").read_text())
    assert meta["stage"] == "train" and set(meta["params"]) == {"seed", "model", "quantization",
                                                                 "lora", "train"}
    assert meta["base"] == {"id": str(base), "revision": None, "sha256": sha256_tree(base)}
    assert meta["inputs"]["prepared"]["sha256"] == sha256_tree(data)
    assert meta["precision"]["compute_dtype"] == "bfloat16"
    # The run as it ran (RunContext): one CPU process, fast path off (auto: CUDA only), the
    # optimizer of params.yaml, the attention kernel model.attn_implementation asked for.
    assert meta["run"] == metrics["run"]
    assert {k: meta["run"][k] for k in ("device", "world_size", "rank", "strategy", "optim",
                                         "attn_implementation", "mixed_precision")} == {
        "device": "cpu", "world_size": 1, "rank": 0, "strategy": "single",
        "optim": "adamw_torch", "attn_implementation": "sdpa", "mixed_precision": "bf16"}
    assert not any(v for k, v in meta["run"]["fast_path"].items()
                   if k not in ("checkpoint_policy", "notes"))
    model, quant, precision = modeling.settings_from_meta(meta)
    assert model.base == str(base) and quant.load_in_4bit and precision.compute_dtype is torch.bfloat16

    loss_tsv = (paths["live"] / "plots" / "metrics" / "train" / "loss.tsv").read_text().split()
    assert loss_tsv[:2] == ["step", "loss"] and len(loss_tsv) == 2 + 2 * 6
    eval_rows = (paths["live"] / "plots" / "metrics" / "eval" / "loss.tsv").read_text().split()
    assert eval_rows[2] == "0"  # the starting validation loss is on the curve at step 0


@pytest.mark.slow
def test_same_seed_gives_bitwise_same_losses(short_run, base, data, tmp_path):
    params, metrics, paths = short_run
    again, again_paths = train_once(params, data, tmp_path)
    first = [e.get("loss") for e in final_state(paths["ckpt"])["log_history"]]
    second = [e.get("loss") for e in final_state(again_paths["ckpt"])["log_history"]]
    assert first == second  # bitwise: same floats (CPU; the thread count is pinned too)
    assert again["eval_loss"] == metrics["eval_loss"]


# torchtune-style: the short run's losses as this recipe gives them on CPU with the CPU numerics
# pinned (medqlora/core/cpu_numerics.py: AVX2 kernels, 2 threads, math attention), bitwise
# equal under every emulated machine tried (AVX-512 or AVX2 kernels, oneDNN capped, 1 to 4
# threads; test_bitwise_same_run_on_an_emulated_other_cpu). The tolerance is for runs the pin
# does not cover (MEDQLORA_CPU_NUMERICS=native, a CPU without AVX2): across those emulations
# the largest difference from these values was 1.1e-4 relative (native AVX-512 with flash
# attention, or without SIMD at all on a base initialised by the scalar kernels: 5.5e-5), so
# 1e-3 leaves a 9x margin. A change to the recipe's numerics (init, collation, label masking,
# schedule, quantization) fails here: update the values with the reason in the commit message.
PINNED_LOSSES = [5.796875, 5.796987, 5.580468, 5.523969, 5.441865, 5.440081]
PINNED_EVAL = {"eval_loss_start": 5.806302, "eval_loss": 5.444435}


@pytest.mark.slow
def test_short_run_losses_are_the_pinned_ones(short_run):
    _, metrics, paths = short_run
    losses = [e["loss"] for e in final_state(paths["ckpt"])["log_history"] if "loss" in e]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-3)
    for key, value in PINNED_EVAL.items():
        assert metrics[key] == pytest.approx(value, rel=1e-3), key


# Another machine, emulated with the libraries' own switches: torch's kernels without AVX-512,
# oneDNN's and MKL's capped at AVX2, one OpenMP thread (what a CI container often sets). Without
# the pins each of the first two changes the losses from step 1 on a CPU with AVX-512
# (cpu_numerics' docstring has the numbers); with them the run is the same, byte for byte.
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_bitwise_same_run_on_an_emulated_other_cpu(short_run, base, data, tmp_path):
    if not cpu_numerics.has_avx2():
        pytest.skip("this CPU has no AVX2: the emulated machine's kernels cannot run here")
    if not cpu_numerics.portable():
        pytest.skip("MEDQLORA_CPU_NUMERICS=native: nothing is pinned, bytes are per machine")
    _, metrics, paths = short_run
    out = tmp_path / "other"
    env = {**os.environ, **OTHER_CPU, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(stage_command(base, data, out), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    here = [e.get("loss") for e in final_state(paths["ckpt"])["log_history"]]
    there = [e.get("loss") for e in final_state(out / "ckpt")["log_history"]]
    assert there == here  # bitwise
    other = json.loads((out / "train.json").read_text())
    assert (other["eval_loss"], other["eval_loss_start"]) == (metrics["eval_loss"],
                                                              metrics["eval_loss_start"])
    weights = "adapter_model.safetensors"
    assert (out / "adapter" / weights).read_bytes() == (paths["adapter"] / weights).read_bytes()
    # the whole metrics file too (its measured speed and memory live in measured/train.json),
    # so `make repro` on another machine leaves metrics/train.json and dvc.lock as committed
    assert (out / "train.json").read_bytes() == paths["metrics"].read_bytes()
    # Both ran pinned and say so in meta.json: the same threads (OMP_NUM_THREADS=1 overruled)
    pinned = {"mode": "portable", "kernels": "AVX2", "onednn_max_isa": "AVX2",
              "threads": cpu_numerics.threads(), "sdpa_kernel": "math"}
    for run in (metrics["run"], other["run"]):
        assert {k: run["cpu_numerics"][k] for k in pinned} == pinned


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_matches_uninterrupted(short_run, base, data, tmp_path):
    _, metrics, paths = short_run
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in {"model.base": str(base), **SHORT}.items():
        set_key(doc, key, value)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "stages/train.py", "--params", str(params_file), "--data", str(data),
           "--out", str(out / "adapter"), "--checkpoints", str(out / "ckpt"),
           "--live", str(out / "live"), "--metrics", str(out / "train.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill as soon as checkpoint-3 is complete: 3 of 6 steps are still to run.
    while time.time() < deadline and proc.poll() is None:
        found = list((out / "ckpt").glob("*/checkpoint-3"))
        if found and checkpoints.problem(found[0]) is None:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "adapter").exists()  # atomic output: nothing that looks complete

    # Re-run keeping one checkpoint: saving checkpoint-6 deletes checkpoint-3, the one resumed
    # from, while the run goes on (save_total_limit is bookkeeping, not in the fingerprint).
    set_key(doc, "train.save_total_limit", 1)
    params_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "checkpoint-3" in done.stderr
    resumed = json.loads((out / "train.json").read_text())
    assert json.loads((out / "measured/train.json").read_text())["resumed_from_step"] == 3
    assert not list((out / "ckpt").glob("*/checkpoint-3"))
    assert resumed["global_step"] == metrics["global_step"] == 6
    assert resumed["tokens_seen"] == metrics["tokens_seen"]   # checkpoint-3's count, continued
    # Observed bitwise equal on CPU (RNG, optimizer, scheduler and data order all restored);
    # the tolerance allows for a different BLAS thread split on another machine.
    assert resumed["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)
    uninterrupted = [e.get("loss") for e in final_state(paths["ckpt"])["log_history"]]
    after_resume = [e.get("loss") for e in final_state(out / "ckpt")["log_history"]]
    assert after_resume == pytest.approx(uninterrupted, abs=1e-4, nan_ok=True)


@pytest.mark.slow
def test_train_stage_leaves_no_data_in_home(base, data, tmp_path):
    """The train stage with an empty HOME and no HF_HOME / HF_DATASETS_CACHE: datasets
    (Dataset over the parquet table, in memory) writes nothing under $HOME/.cache, nor in the
    project's own datasets cache ($MEDQLORA_CACHE/datasets, where the stage points it)."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in {"model.base": str(base), **SHORT, "train.max_steps": 2}.items():
        set_key(doc, key, value)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    home, cache, out = tmp_path / "home", tmp_path / "project-cache", tmp_path / "out"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
    proc = subprocess.run(
        [sys.executable, "stages/train.py", "--params", str(params_file), "--data", str(data),
         "--out", str(out / "adapter"), "--checkpoints", str(out / "ckpt"), "--live", "none",
         "--metrics", str(out / "train.json")], cwd=ROOT, capture_output=True, text=True,
        env={**env, "HOME": str(home), "MEDQLORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train.json").read_text())["global_step"] == 2
    assert not (home / ".cache").exists(), sorted(map(str, home.rglob("*")))[:5]
    assert not any(p.is_file() for p in cache.rglob("*")), sorted(cache.rglob("*"))[:5]


@pytest.mark.slow
def test_rerun_after_a_kill_past_the_last_checkpoint_trains_no_extra_step(short_run, data,
                                                                          tmp_path, caplog):
    # Killed after checkpoint-6 (the last step) but before the outputs were written: the
    # re-run resumes there. transformers enters its step loop before checking max_steps, so
    # without callbacks.StopAtEnd it trained a 7th step and the adapter differed.
    params, metrics, paths = short_run
    shutil.copytree(paths["ckpt"], tmp_path / "ckpt")
    # A fresh process's torch (flash attention on, its own thread count): the checkpoint
    # folder's name must still be the pinned run's (CI once named it before pinning).
    torch.backends.cuda.enable_flash_sdp(True)
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="medqlora.train.training"):
        again = training.run(params, data, tmp_path / "adapter", tmp_path / "ckpt", None,
                             tmp_path / "train.json")
    assert again["resumed_from_step"] == again["global_step"] == metrics["global_step"] == 6
    assert any("last step" in r.getMessage() for r in caplog.records)
    name = "adapter_model.safetensors"
    assert (tmp_path / "adapter" / name).read_bytes() == (paths["adapter"] / name).read_bytes()
    assert again["eval_loss"] == metrics["eval_loss"]
    assert again["train_loss"] == metrics["train_loss"]
    assert again["tokens_per_second"] is None  # nothing trained in this run: no throughput
    assert not (tmp_path / "live").exists()  # live_dir None: no dvclive curves


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate optimizer.pt", "garble adapter_model.safetensors",
                                    "delete trainer_state.json"])
def test_incomplete_newest_checkpoint_is_skipped_with_a_warning(short_run, tmp_path, caplog,
                                                                damage):
    _, _, paths = short_run
    (source,) = list(paths["ckpt"].iterdir())
    run_dir = shutil.copytree(source, tmp_path / "run")
    newest = run_dir / "checkpoint-6"
    action, name = damage.split(" ")
    target = newest / name
    if action == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif action == "garble":
        target.write_bytes(b"\x00" * 64)
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="medqlora.train.checkpoints"):
        chosen = checkpoints.latest_complete(run_dir)
    assert chosen == run_dir / "checkpoint-3"
    assert any("checkpoint-6" in r.getMessage() and "skipping" in r.getMessage()
               for r in caplog.records)
    assert not newest.exists() and len(list((run_dir / "skipped").iterdir())) == 1


@pytest.mark.slow
def test_init_adapter_continues_from_a_trained_adapter(short_run, base, data, tmp_path):
    _, metrics, paths = short_run
    package = tmp_path / "package"
    shutil.copytree(paths["adapter"], package / "adapter")  # a package folder holding one
    params, _ = make_params(base, {**SHORT, "train.init_adapter": str(package),
                                   "train.num_train_epochs": 0.5})
    more, more_paths = train_once(params, data, tmp_path / "out")
    # It starts where the earlier adapter ended (same val split), then keeps going.
    assert more["eval_loss_start"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert more["global_step"] == 2
    meta = json.loads((more_paths["adapter"] / "meta.json").read_text())
    assert meta["init_adapter"] == str(package / "adapter")
    assert meta["inputs"]["init_adapter"]["sha256"] == sha256_tree(package / "adapter")


@pytest.mark.slow
def test_reference_mistral_recipe_runs_one_step_on_a_tiny_mistral(tmp_path):
    import bitsandbytes as bnb
    base = make_base(tmp_path / "mistral", arch="mistral")
    data = make_prepared(tmp_path / "prepared", base, packed=True)
    params, doc = make_params(base, {"train.max_steps": 1, "data.max_seq_length": 64},
                              source=ROOT / "examples" / "mistral-7b-medical.yaml")
    assert doc["lora"]["r"] == 64 and doc["train"]["mixed_precision"] == "bf16"
    assert params.quantization.bnb_4bit_quant_type == "nf4"
    metrics, paths = train_once(params, data, tmp_path / "out")
    assert metrics["global_step"] == 1
    assert metrics["effective_batch"] == 16  # 4 x 4 as in the recipe
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    config = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == 64 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(doc["lora"]["target_modules"])
    model = training.build_model(params, modeling.resolve_precision(params.quantization, "bf16"))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14


@pytest.mark.slow
def test_a_diverging_run_exits_1_publishes_nothing_and_keeps_the_last_good_checkpoint(
        base, data, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in {"model.base": str(base), **DIVERGE}.items():
        set_key(doc, key, value)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)                      # an earlier, good output
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier adapter")
    (out / "train.json").write_text('{"eval_loss": 2.5}\n')
    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "stages" / "train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(ROOT)  # data.sources are checked from the project root
    with pytest.raises(SystemExit) as exit_:
        stage.main(["--params", str(params_file), "--data", str(data),
                    "--out", str(out / "adapter"), "--checkpoints", str(out / "ckpt"),
                    "--live", str(out / "live"), "--metrics", str(out / "train.json")])
    assert exit_.value.code == 1
    (run_dir,) = list((out / "ckpt").iterdir())
    err = capsys.readouterr().err.splitlines()
    assert err[-4].startswith("train: diverged at step 2: the gradient is not finite in 28 of "
                              "28 trainable tensors (first: base_model.model.model.layers.0.")
    assert err[-3:] == [
        f"nothing was published: {out / 'adapter'} and {out / 'train.json'} were left as they were",
        f"last good checkpoint: {run_dir / 'checkpoint-1'} (kept)",
        "lower train.learning_rate (1) or lora.lora_alpha (4096), or clip harder with "
        "train.max_grad_norm (0.3); changing them starts a fresh run (a re-run with the same "
        "params resumes from the checkpoint above and diverges again)"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_model.safetensors"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"earlier adapter"
    assert (out / "train.json").read_text() == '{"eval_loss": 2.5}\n'
    assert [p.name for p in checkpoints.checkpoints(run_dir)] == ["checkpoint-1"]
    assert checkpoints.latest_complete(run_dir) == run_dir / "checkpoint-1"  # resumable
    weights = load_file(str(run_dir / "checkpoint-1" / "adapter_model.safetensors"))
    assert len(weights) == 28 and all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_saved_tokenizer_does_not_depend_on_offline_mode(tmp_path, monkeypatch):
    # make repro sets HF_HUB_OFFLINE=1, a bare `dvc repro` may not: transformers records the
    # resulting local_files_only in tokenizer_config.json unless load_tokenizer drops it, and
    # the adapter's bytes (hence every downstream DVC hash) would follow the shell.
    model = build_params(yaml.safe_load((ROOT / "params.yaml").read_text())).model
    saved = []
    for offline in ("1", None):
        if offline is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        out = tmp_path / f"offline-{offline}"
        modeling.load_tokenizer(model).save_pretrained(str(out))
        saved.append((out / "tokenizer_config.json").read_text())
        assert "local_files_only" not in json.loads(saved[-1])
    assert saved[0] == saved[1]
