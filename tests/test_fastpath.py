"""The fast path equals the plain path wherever it runs on a CPU (medqlora/train/fast/fastpath.py).

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

from medqlora.core import config, memory, modeling
from medqlora.train import training
from medqlora.train.collation import Collator
from medqlora.train.fast import attention, fastpath
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
    # Rows of equal length: no padding, so no mask (the model's causal default is the same
    # attention, and it need not inspect a mask on the GPU, a host sync a micro-batch).
    full = [{"input_ids": [1] * 10, "labels": [1] * 10}, {"input_ids": [2] * 10, "labels": [2] * 10}]
    assert set(fastpath.PaddingFree(inner)(full)) == {"input_ids", "labels"}


def test_loss_chunks_of_up_to_2048_tokens():
    # Liger sizes a chunk's logits like the hidden states (Llama-3-8B: 32 chunks of 64 tokens
    # for 2048, each reading the whole lm_head); the hook asks for chunks of up to 2048.
    from types import SimpleNamespace
    llama = SimpleNamespace(config=SimpleNamespace(vocab_size=128256, hidden_size=4096))
    labels = torch.zeros(1, 2048, dtype=torch.long)

    def chunk_mem_const(module, rows):
        ids = torch.zeros(rows, 2048, dtype=torch.long)
        return fastpath._loss_chunks(module, (), {"input_ids": ids, "labels": labels})[1][
            "chunk_mem_const"]
    assert chunk_mem_const(llama, 1) == 32       # ceil(128256 / 4096): one chunk
    assert chunk_mem_const(llama, 4) == 8        # 8192 tokens: 4 chunks of 2048
    mistral = SimpleNamespace(config=SimpleNamespace(vocab_size=32000, hidden_size=4096))
    assert chunk_mem_const(mistral, 4) == 2
    # what Liger makes of it: inc_factor = ceil(V / (c x H)), chunk = tokens / inc_factor
    for module, rows in ((llama, 1), (llama, 4), (mistral, 4), (mistral, 1)):
        config, tokens = module.config, rows * 2048
        factor = -(-config.vocab_size // (chunk_mem_const(module, rows) * config.hidden_size))
        assert tokens // factor == 2048
    # generation and evaluation without labels, or a caller's own setting: untouched
    assert fastpath._loss_chunks(llama, (), {"input_ids": labels}) is None
    assert fastpath._loss_chunks(llama, (), {"input_ids": labels, "labels": labels,
                                             "chunk_mem_const": 1}) is None


@pytest.mark.slow
def test_graphed_layers_fall_back_to_the_same_eager_forward(tmp_path, tiny_model):
    # cuda_graphs patches the kept layers (medqlora/train/fast/graphs.py); a call the graph cannot serve
    # -- here, on a CPU -- runs every layer eagerly, with the same loss and gradients as the
    # unpatched model, and says why it declined.
    from medqlora.train.fast import graphs
    params = _params(checkpoint_policy="none", padding_free=False, varlen_attention=False)
    vocab = yaml.safe_load((tiny_model / "config.json").read_text())["vocab_size"]
    rows = _rows([12, 12, 12, 12], vocab)
    plain_loss, plain_grads, _, _ = _loss_and_grads(params, True, rows, tmp_path)
    precision = modeling.resolve_precision(params.quantization, "no", device="cpu")
    torch.manual_seed(0)
    model = training.build_model(params, precision)
    layers = fastpath.decoder_layers(model)
    state = graphs.capture_layers(layers, 1)
    assert len(state.layers) == len(layers) - 1 and graphs.capture_layers(layers, len(layers)) \
        is None
    assert not any(layer.gradient_checkpointing for layer in layers[1:])
    batch = Collator(pad_token_id=0)(rows)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(plain_loss, rel=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain_grads[name], rtol=1e-5, atol=1e-7)
    assert (state.replays, state.eager_calls, state.graphed) == (0, 1, None)
    assert state.declined == "on cuda"
    assert state.summary() == {"layers": len(layers) - 1, "replays": 0,
                               "eager_forwards": 1, "declined": "on cuda",
                               "capture_failure": None}
    padded = Collator(pad_token_id=0)(_rows([12, 5, 12, 12], vocab))
    with torch.no_grad():
        model(**padded)
    assert "grad enabled" in state.declined and "no attention mask" in state.declined


def test_graph_gradients_accumulate_as_a_sum():
    # A graphed backward returns gradients in static buffers its next replay overwrites (as
    # torch.cuda.make_graphed_callables does). Without graphs.own_gradients autograd adopts
    # the buffer as .grad and 16 micro-batches end with twice the last one's gradient.
    from medqlora.train.fast import graphs
    static = torch.zeros(3)

    class Replayed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            return x + weight.sum()

        @staticmethod
        def backward(ctx, grad):
            static.copy_(ctx.value)                  # the replay writes its static output
            return None, static.detach()

    def accumulate(weight):
        for value in (1.0, 2.0, 3.0, 5.0):
            out = Replayed.apply(torch.ones(1), weight)
            out.grad_fn.value = torch.full((3,), value)
            out.sum().backward()
        return weight.grad
    bare = torch.nn.Parameter(torch.zeros(3))
    assert accumulate(bare).tolist() == [10.0] * 3          # 2 x 5: the failure it prevents
    owned = torch.nn.Parameter(torch.zeros(3))
    graphs.own_gradients([owned])
    assert accumulate(owned).tolist() == [11.0] * 3         # 1 + 2 + 3 + 5
    assert owned.grad.data_ptr() != static.data_ptr()


def test_dropout_mode_is_set_on_the_fused_branches_only():
    from medqlora.train.fast import lora_branch
    root = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    root[1]._peft_forward = root[1].forward        # what fastpath.fuse_lora marks
    assert lora_branch.set_dropout_mode(root, "seeded") == 1
    assert root[1].dropout_mode == "seeded" and not hasattr(root[0], "dropout_mode")
    with pytest.raises(ValueError, match="dropout mode 'replayed'"):
        lora_branch.set_dropout_mode(root, "replayed")


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
    fast = config.FastPathParams("auto", True, True, True, True, True, True, 2048, True,
                                  "budget", True)
    assert not fastpath.resolve(fast, "cpu").any
    on_cpu = fastpath.resolve(dataclasses.replace(fast, enabled="on"), "cpu")
    assert (on_cpu.fused_kernels, on_cpu.fused_cross_entropy, on_cpu.fused_optimizer,
            on_cpu.cuda_graphs) == (False, False, False, False)
    assert on_cpu.fused_lora and on_cpu.padding_free and on_cpu.varlen_attention
    assert len(on_cpu.notes) == 2
    assert not fastpath.resolve(dataclasses.replace(fast, enabled="off"), "cuda").any


def test_checkpoint_budget_arithmetic():
    # Mistral-7B shapes at 2048 tokens: an un-checkpointed layer keeps 6.5 hidden + 2 kv + 3
    # intermediate bf16 values a token (280 MiB), or with peft's dropout copies 4.5 + 2 + 2
    # and 3 bytes x (6 hidden + 1 intermediate) more (420 MiB); a checkpoint 16 MiB.
    arch = memory.Arch(4096, 14336, 32, 32, 8, 128, 32000, False)
    replayed = memory.layer_activation_bytes(arch, 2048, dropout_copies=False)
    copies = memory.layer_activation_bytes(arch, 2048, dropout_copies=True)
    # fused_lora also rebuilds down_proj's input from gate and up: 2 intermediates, not 3
    fused = memory.layer_activation_bytes(arch, 2048, False, swiglu_recomputed=True)
    assert replayed == 2048 * 2 * (6.5 * 4096 + 2 * 1024 + 3 * 14336) == 280 * 2**20
    assert fused == 2048 * 2 * (6.5 * 4096 + 2 * 1024 + 2 * 14336) == 224 * 2**20
    assert copies == 2048 * (2 * (4.5 * 4096 + 2048 + 2 * 14336) + 3 * (6 * 4096 + 14336))
    gib = 2**30
    allocated, trainable = 5 * gib, 168_000_000
    checkpoint = 2048 * 4096 * 2
    fixed = allocated + 12 * trainable + 32 * checkpoint + gib // 2 + 8 * 2048 * 4096

    def fits(budget_bytes, dropout=True, fused_lora=True, graphs=False):
        return memory.layers_within_budget(budget_bytes / gib, arch, 2048, allocated,
                                           trainable, dropout, fused_lora, graphs)
    budget = fixed + 10.5 * (fused - checkpoint)   # room for 10.5 kept layers -> 10
    assert fits(budget) == 10
    assert fits(budget, fused_lora=False) == int(10.5 * (fused - checkpoint)
                                                 // (copies - checkpoint)) == 5
    assert fits(budget, dropout=False) == 10       # no dropout: nothing to copy either way
    # Below one recomputed layer's working set (with peft's copies) nothing can be skipped;
    # just above it, as many kept layers as that room holds.
    assert fits(fixed + copies - 1) == 0
    assert fits(fixed + copies) == int(copies // (fused - checkpoint)) == 2
    # CUDA graphs: the graph's own input/output/gradient buffers and adapter gradients, and
    # its pool stays reserved while a recomputed layer runs
    graph_fixed = fixed + 4 * 2048 * 4096 * 2 + copies
    graph_kept = fused + 4 * trainable // 32
    assert fits(graph_fixed + 10.5 * (graph_kept - checkpoint), graphs=True) == 10
    all_graphed = graph_fixed - copies + 32 * (graph_kept - checkpoint)   # none recomputed
    assert fits(all_graphed, graphs=True) == 32
    assert fits(all_graphed - 1, graphs=True) < 32
    # At 8,192 tokens one MLP's backward (3 intermediate gradients, the rebuilt down_proj
    # input, its dropped copy and mask, the dequantised weight) outgrows the 0.5 GiB floor
    mlp = memory.mlp_backward_bytes(arch, 8192, dropout=True, fused_lora=True)
    assert mlp == 8192 * 14336 * 11 + 4096 * 14336 * 2 > gib // 2
    assert memory.mlp_backward_bytes(arch, 2048, True, True) < gib // 2   # the floor holds
    kept8k = memory.layer_activation_bytes(arch, 8192, False, swiglu_recomputed=True)
    fixed8k = allocated + 12 * trainable + 32 * 8192 * 4096 * 2 + mlp + 8 * 8192 * 4096
    room = fixed8k + 5.5 * (kept8k - 8192 * 4096 * 2)
    assert memory.layers_within_budget(room / gib, arch, 8192, allocated, trainable, True,
                                       True) == 5
    assert memory.layers_within_budget(None, arch, 2048, allocated, trainable, True, True) == 0
    assert memory.layers_within_budget(1000.0, arch, 2048, allocated, trainable, True,
                                       True) == 32


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Liger kernels (RMSNorm/RoPE/SwiGLU/fused CE) need CUDA; their parity "
                           "with the reference is checked by bench/bench_train.py --suite main")
def test_liger_is_importable_on_gpu():
    assert fastpath.liger_available(), "install liger-kernel for the GPU fast path"


# ---------------------------------------------------------------- dropout replayed, not kept

def _saved_bytes(fn):
    """(output, bytes of distinct storages autograd keeps for backward) of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_dropped_linear_keeps_x_not_copies_and_replays_the_same_mask():
    from medqlora.train.fast.lora_branch import dropped_linear
    x = torch.randn(3, 5, 16, requires_grad=True)
    weights = [torch.randn(4, 16, requires_grad=True) for _ in range(3)]   # q, k, v share x
    torch.manual_seed(7)
    plain, plain_bytes = _saved_bytes(lambda: [torch.nn.functional.linear(
        torch.nn.functional.dropout(x, 0.25, True), w) for w in weights])
    torch.manual_seed(7)
    replayed, replayed_bytes = _saved_bytes(lambda: [dropped_linear(x, w, 0.25)
                                                     for w in weights])
    for a, b in zip(plain, replayed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)          # same masks, same output
    # peft's way keeps a dropped copy (4 B/value) and a mask per projection; this keeps x once
    x_bytes, w_bytes = x.numel() * 4, 3 * weights[0].numel() * 4
    assert replayed_bytes == x_bytes + w_bytes
    assert plain_bytes >= 3 * (x_bytes + x.numel()) + w_bytes
    upstream = [torch.randn_like(o) for o in plain]
    grads_plain = torch.autograd.grad(plain, [x, *weights], upstream)
    torch.manual_seed(123)   # backward replays from the saved state, whatever the generator is at
    grads_replayed = torch.autograd.grad(replayed, [x, *weights], upstream)
    for a, b in zip(grads_plain, grads_replayed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    after_backward = torch.randint(10**9, (1,)).item()
    torch.manual_seed(123)
    assert after_backward == torch.randint(10**9, (1,)).item()   # replay put the state back
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        dropped_linear(x, weights[0], 0.0)


def test_seeded_dropout_draws_its_mask_from_a_seed_tensor_only():
    # The graph-safe dropout: the mask is a function of (seed, index) -- keep rate 1 - p, the
    # same mask for the input in forward and its gradient in backward -- and the branch keeps
    # x and a one-element seed, never a dropped copy or a mask.
    from medqlora.train.fast import lora_branch
    seed = torch.tensor([12345])
    keep = lora_branch.keep_mask(seed, 200_000, 0.05)
    assert abs(keep.float().mean().item() - 0.95) < 0.003
    assert torch.equal(keep, lora_branch.keep_mask(seed.clone(), 200_000, 0.05))
    assert not torch.equal(keep, lora_branch.keep_mask(seed + 1, 200_000, 0.05))
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(3)
    low, saved = _saved_bytes(lambda: lora_branch.seeded_dropped_linear(x, weight, 0.25))
    assert saved == x.numel() * 4 + weight.numel() * 4 + 8      # x, A and the int64 seed
    torch.manual_seed(3)
    drawn = torch.randint(0, 2**31 - 1, (1,))                    # the seed forward drew
    mask = lora_branch.keep_mask(drawn, x.numel(), 0.25).view(x.shape)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = torch.nn.functional.linear(torch.where(mask, x2 * (1 / 0.75), torch.zeros(())),
                                          w2)
    torch.testing.assert_close(low, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(low)
    grads = torch.autograd.grad(low, [x, weight], upstream)
    expected_grads = torch.autograd.grad(expected, [x2, w2], upstream)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("mode", ["replay", "none"])
def test_down_input_is_rebuilt_from_gate_and_up(mode):
    # down_proj's branch keeps the SwiGLU's gate and up (which its backward keeps anyway) and
    # rebuilds their product in backward: the same output and gradients as keeping it.
    from medqlora.train.fast import lora_branch
    gate = torch.randn(2, 6, 24, requires_grad=True)
    up = torch.randn(2, 6, 24, requires_grad=True)
    weight = torch.randn(8, 24, requires_grad=True)
    product = lambda g, u: torch.nn.functional.silu(g) * u   # noqa: E731
    p = 0.2 if mode == "replay" else 0.0

    def branch(rebuilt: bool):
        h = product(gate, up)
        if rebuilt:
            return lora_branch.recomputed_dropped_linear(h, weight, p, mode, product, gate, up)
        return torch.nn.functional.linear(torch.nn.functional.dropout(h, p, True), weight)
    torch.manual_seed(11)
    kept, kept_bytes = _saved_bytes(lambda: branch(False))
    torch.manual_seed(11)
    rebuilt, rebuilt_bytes = _saved_bytes(lambda: branch(True))
    torch.testing.assert_close(rebuilt, kept, rtol=0, atol=0)
    # the product (and with dropout its dropped copy and mask) is no longer kept
    assert rebuilt_bytes <= kept_bytes - gate.numel() * 4
    upstream = torch.randn_like(kept)
    for a, b in zip(torch.autograd.grad(kept, [gate, up, weight], upstream),
                    torch.autograd.grad(rebuilt, [gate, up, weight], upstream)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "all"])
def test_fused_lora_with_dropout_matches_peft(tmp_path, tiny_model, monkeypatch, policy):
    # lora_dropout 0.1: layers that keep their activations (policy none) replay the dropout,
    # recomputed ones (policy all) use peft's; either way the masks are peft's, so loss and
    # gradients match peft's own forward. down_proj's branch also rebuilds its input from
    # the SwiGLU's gate and up in backward, whatever the policy.
    from medqlora.train.fast import lora_branch
    replays, rebuilt = [], []
    original, recomputed = lora_branch.dropped_linear, lora_branch.recomputed_dropped_linear
    monkeypatch.setattr(lora_branch, "dropped_linear",
                        lambda *a: replays.append(1) or original(*a))
    monkeypatch.setattr(lora_branch, "recomputed_dropped_linear",
                        lambda *a: rebuilt.append(a[3]) or recomputed(*a))

    def run(fast: bool):
        params = _params(checkpoint_policy=policy, padding_free=False, varlen_attention=False,
                         micro_batch_tokens=None, **({} if fast else {"enabled": "off"}))
        params = dataclasses.replace(params, lora=dataclasses.replace(params.lora,
                                                                       lora_dropout=0.1),
                                     train=dataclasses.replace(params.train,
                                                               gradient_checkpointing=True))
        precision = modeling.resolve_precision(params.quantization, "no", device="cpu")
        torch.manual_seed(0)
        model = training.build_model(params, precision)
        if fast:
            from transformers import TrainingArguments
            args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                     per_device_train_batch_size=4)
            model, _, _ = fastpath.apply(model, params, args, Collator(0), device="cpu")
            layers = fastpath.decoder_layers(model)
            assert [layer.gradient_checkpointing for layer in layers] == \
                [policy == "all"] * len(layers)
            flags = {m.dropout_mode for m in model.modules() if hasattr(m, "_peft_forward")}
            assert flags == {"replay" if policy == "none" else "peft"}
        vocab = model.config.vocab_size
        batch = Collator(pad_token_id=0)(_rows([9, 23, 16, 30], vocab))
        model.train()
        torch.manual_seed(5)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    plain_loss, plain_grads = run(False)
    assert not replays
    fast_loss, fast_grads = run(True)
    # every adapted projection but down_proj (6 a layer) replays once in forward (policy
    # none), or none does; down_proj replays from its rebuilt input (policy none) or uses
    # peft's dropout (policy all: the layer's forward runs twice, so its branch too)
    layers = yaml.safe_load((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert len(replays) == (6 * layers if policy == "none" else 0)
    assert rebuilt == (["replay"] * layers if policy == "none" else [])
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- micro-batches by tokens

def test_micro_batch_rows_is_a_divisor_under_the_token_budget():
    assert fastpath.micro_batch_rows(4, 2048, 2048) == 1
    assert fastpath.micro_batch_rows(4, 2048, 4096) == 2
    assert fastpath.micro_batch_rows(4, 2048, 6144) == 2      # 3 rows would not divide 4
    assert fastpath.micro_batch_rows(4, 512, 2048) == 4
    assert fastpath.micro_batch_rows(6, 512, 2048) == 3
    assert fastpath.micro_batch_rows(4, 4096, 2048) == 1      # a row longer than the budget
    assert fastpath.micro_batch_rows(4, 2048, None) == 4


@pytest.mark.slow
def test_split_micro_batches_give_the_same_update(tmp_path, tiny_model):
    # Rows with different label counts: the split run sums per-micro-batch losses over the
    # step's label count (num_items_in_batch), so one SGD step moves the adapter the same way.
    from transformers import Trainer, TrainingArguments
    vocab = yaml.safe_load((tiny_model / "config.json").read_text())["vocab_size"]
    data = _rows([40, 12, 33, 7, 25, 18, 40, 9], vocab, seed=3)

    def step(tokens):
        params = _params(padding_free=False, varlen_attention=False, micro_batch_tokens=tokens,
                         checkpoint_policy="all")
        precision = modeling.resolve_precision(params.quantization, "no", device="cpu")
        torch.manual_seed(0)
        model = training.build_model(params, precision)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = TrainingArguments(output_dir=str(tmp_path / str(tokens)), use_cpu=True,
                                 report_to="none", per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=1, optim="sgd",
                                 learning_rate=1.0, lr_scheduler_type="constant",
                                 max_grad_norm=0.0, weight_decay=0.0, save_strategy="no",
                                 remove_unused_columns=False, seed=1, data_seed=1)
        model, collator, args = fastpath.apply(model, params, args, Collator(0), device="cpu")
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
        moved = {n: p.detach() - before[n] for n, p in model.named_parameters()
                 if p.requires_grad}
        return args, moved
    whole_args, whole = step(None)
    split_args, split = step(256)       # max_seq_length 256: one row a micro-batch
    assert (whole_args.per_device_train_batch_size, whole_args.gradient_accumulation_steps) == (
        4, 2)
    assert (split_args.per_device_train_batch_size, split_args.gradient_accumulation_steps) == (
        1, 8)
    assert any(delta.abs().max() > 0 for delta in whole.values())
    for name, delta in whole.items():
        # fp32 sums in another order: ~1e-6 of the update; a per-micro-batch mean would be off
        # by the label-count ratios (tens of %)
        torch.testing.assert_close(split[name], delta, rtol=1e-4,
                                   atol=1e-5 * float(delta.abs().max()) + 1e-12, msg=name)
