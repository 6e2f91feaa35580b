"""The fast path equals the plain path wherever it runs on a CPU (medqlora/fastpath.py).

On the tiny 4-bit base: padding-free batches + the fused LoRA GEMM + no checkpointing give the
same loss and adapter gradients as padded batches + peft's LoRA + full checkpointing (fp32 on
CPU: relative 1e-5 on the loss, 1e-4 on gradients). Liger's kernels need CUDA and are checked
by bench/bench_train.py's parity run on a GPU; here they are skipped with that reason.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from medqlora import attention, config, fastpath, memory, modeling, training
from medqlora.collation import Collator
from tests.conftest import ROOT, TINY_MODEL


def _params(**fast):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["model"]["base"] = str(TINY_MODEL)
    doc["lora"]["lora_dropout"] = 0.0  # dropout masks depend on the batch layout
    # fp32 compute: in bf16 the padded and packed layouts sum in different orders and the
    # gradients drift by ~1e-3 relative, which would hide a real mismatch below that.
    doc["quantization"]["bnb_4bit_compute_dtype"] = "float32"
    doc["train"].update(mixed_precision="no", per_device_train_batch_size=4,
                        fast_path={"enabled": "on", **fast})
    return config.build_params(doc)


def _rows(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for size in lengths:
        ids = torch.randint(3, vocab, (size,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})  # a 2-token "prompt"
    return rows


def _loss_and_grads(params, fast: bool, rows, tmp_path):
    from transformers import TrainingArguments
    precision = modeling.resolve_precision(params.quantization, "no", device="cpu")
    torch.manual_seed(0)
    model = training.build_model(params, precision)
    collator = Collator(pad_token_id=0)
    if fast:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                 per_device_train_batch_size=4, report_to="none")
        model, collator, _ = fastpath.apply(model, params, args, collator, device="cpu")
    batch = collator(rows)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, batch, model


@pytest.mark.slow
def test_fast_path_matches_plain_path_on_cpu(tmp_path, tiny_model, monkeypatch):
    calls = []
    reference = attention.reference_varlen
    monkeypatch.setattr(attention, "reference_varlen",
                        lambda q, k, v, cu, *a, **kw: calls.append(cu.tolist()) or
                        reference(q, k, v, cu, *a, **kw))
    params = _params(checkpoint_policy="none")
    vocab = yaml.safe_load((tiny_model / "config.json").read_text())["vocab_size"]
    rows = _rows([7, 19, 11, 30], vocab)
    plain_loss, plain_grads, plain_batch, _ = _loss_and_grads(_params(enabled="off"), False,
                                                              rows, tmp_path)
    fast_loss, fast_grads, fast_batch, model = _loss_and_grads(params, True, rows, tmp_path)
    # The fast batch really is one row of 67 real tokens (plain: 4 x 30 = 120 positions),
    # whose attention ran example by example (the varlen contract; sdpa per example on CPU).
    assert plain_batch["input_ids"].shape == (4, 30)
    assert fast_batch["input_ids"].shape == (1, 67)
    assert fast_batch["cu_seq_lens_q"].tolist() == [0, 7, 26, 37, 67]
    assert model.config._attn_implementation == attention.NAME
    assert calls == [[0, 7, 26, 37, 67]] * model.config.num_hidden_layers
    # Fused LoRA and the checkpoint policy really were applied.
    assert all(hasattr(m, "_peft_forward") for m in model.modules()
               if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A"))
    assert not any(layer.gradient_checkpointing for layer in fastpath.decoder_layers(model))
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_collation_exact():
    inner = Collator(pad_token_id=0)
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]},
            {"input_ids": [4, 4, 4, 4, 4, 4], "labels": [4, 4, 4, 4, 4, 4]}]
    batch = fastpath.PaddingFree(inner)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 4, 4, 4, 4, 4]]
    # Each later example's first label is masked: the previous example must not predict it.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, 4, 4, 4, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5]]
    # Rows of (nearly) equal length save < 10%: padded as before, attention mask included.
    same = [{"input_ids": [1] * 10, "labels": [1] * 10}, {"input_ids": [2] * 9, "labels": [2] * 9}]
    assert set(fastpath.PaddingFree(inner)(same)) == {"input_ids", "labels", "attention_mask"}


def test_packed_rows_padded_to_one_shape_with_boundaries():
    # prepare's packed rows (position ids restart per example) of 5 and 3 real tokens, padded
    # to max_seq_length 6: every micro-batch is (2, 6); the padding is its own "example".
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9],
             "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4, 5], "labels": [3, 4, 5], "position_ids": [0, 1, 2]}]
    collate = fastpath.PaddingFree(Collator(pad_token_id=0), pad_to=6, boundaries=True)
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [3, 4, 5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100], [3, 4, 5, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 9, 12]
    assert batch["max_length_q"] == 3
    assert collate.efficiency == pytest.approx(8 / 12)


def test_resolve_auto_is_off_on_cpu_and_notes_gpu_only_parts():
    fast = config.FastPathParams("auto", True, True, True, True, True, True, "budget", True)
    assert not fastpath.resolve(fast, "cpu").any
    on_cpu = fastpath.resolve(dataclasses.replace(fast, enabled="on"), "cpu")
    assert (on_cpu.fused_kernels, on_cpu.fused_cross_entropy, on_cpu.fused_optimizer) == (
        False, False, False)
    assert on_cpu.fused_lora and on_cpu.padding_free and on_cpu.varlen_attention
    assert len(on_cpu.notes) == 1
    assert not fastpath.resolve(dataclasses.replace(fast, enabled="off"), "cuda").any


def test_checkpoint_budget_arithmetic():
    # Mistral-7B widths, 8192 tokens: 1.55 GiB a layer un-checkpointed, 64 MiB checkpointed.
    per_layer = memory.layer_activation_bytes(8192, 4096, 14336)
    assert per_layer == 8192 * 2 * (9 * 4096 + 64512)
    gib = 2**30
    allocated, trainable = 5 * gib, 168_000_000
    base = allocated + 12 * trainable + 32 * 8192 * 4096 * 2 + per_layer + gib
    step = per_layer - 8192 * 4096 * 2
    budget = (base + 2.5 * step) / gib   # room for 2.5 layers -> 2
    assert memory.layers_within_budget(budget, 32, 8192, 4096, 14336, allocated,
                                         trainable) == 2
    assert memory.layers_within_budget(None, 32, 8192, 4096, 14336, allocated, trainable) == 0
    assert memory.layers_within_budget(1000.0, 32, 8192, 4096, 14336, allocated,
                                         trainable) == 32


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Liger kernels (RMSNorm/RoPE/SwiGLU/fused CE) need CUDA; their parity "
                           "with the reference is checked by bench/bench_train.py --suite main")
def test_liger_is_importable_on_gpu():
    assert fastpath.liger_available(), "install liger-kernel for the GPU fast path"
