"""Preflight memory estimate (medqlora/core/memory.py): exact parts by hand, refusal, calibration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.archs import ARCHS
from medqlora.cli import main
from medqlora.core import memory
from medqlora.core.config import load_params
from medqlora.core.memory import GIB, Arch, Setup, estimate
from medqlora.train import preflight
from tests.conftest import TINY_MODEL, write_params

MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
               tie_word_embeddings=False, model_type="mistral")
LLAMA3 = {**MISTRAL, "vocab_size": 128256, "model_type": "llama"}


def tiny_arch() -> Arch:
    return Arch.from_config(json.loads((TINY_MODEL / "config.json").read_text()))


def test_tiny_weights_lora_optimizer_by_hand():
    # tiny-med-llama: hidden 128, intermediate 384, 4 layers, 4 heads x 32, 2 kv heads, vocab 4096
    est = estimate(tiny_arch(), Setup(batch=8, seq=256, r=16))
    # nf4 bytes = n/2 + blocks(n/64) one-byte absmax + 4 x ceil(blocks/256) + 4 (double quant)
    q = 16384 // 2 + 256 + 4 * 1 + 4           # 128x128: 8,456
    kv = 8192 // 2 + 128 + 4 * 1 + 4           # 128x64: 4,232
    mlp = 49152 // 2 + 768 + 4 * 3 + 4         # 128x384: 25,360
    assert est.rows["4-bit weights + quant constants"] == 4 * (2 * q + 2 * kv + 3 * mlp) == 405824
    # embeddings + lm_head 2 x 4096 x 128, 9 norms x 128, upcast to fp32 by peft
    assert est.rows["embeddings, lm_head, norms"] == (2 * 4096 * 128 + 9 * 128) * 4
    # LoRA r=16: q 16x(128+128), k/v 16x(128+64), o 16x(128+128), gate/up/down 16x(128+384)
    lora = 4 * (4096 + 3072 + 3072 + 4096 + 3 * 8192)
    assert lora == 155648
    assert est.rows["LoRA weights + grads (fp32)"] == lora * 8
    assert est.rows["optimizer state (adamw_torch)"] == lora * 8
    eight_bit = estimate(tiny_arch(), Setup(batch=8, seq=256, r=16, optim="paged_adamw_8bit"))
    assert eight_bit.rows["optimizer state (paged_adamw_8bit)"] == lora * 2
    fp32_absmax = estimate(tiny_arch(), Setup(batch=8, seq=256, r=16, double_quant=False))
    # fp32 absmax: 4 bytes per 64 values = 0.5 bit/param over 786,432 params
    assert fp32_absmax.rows["4-bit weights + quant constants"] == 786432 // 2 + 786432 // 64 * 4


@pytest.mark.slow
def test_lora_count_matches_peft(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=list(memory.PROJECTIONS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == memory.lora_params(tiny_arch(), 16, memory.PROJECTIONS)


@pytest.mark.parametrize("arch, seq, measured", [
    (MISTRAL, 2048, 14.72),   # bench/results/h100-main.md, reference row
    (MISTRAL, 1024, 10.8),    # reference, sequence 1024 (bench/README.md)
    (LLAMA3, 2048, 26.69),    # bench/results/h100-llama.md, reference row
])
def test_reference_estimate_within_15_percent_of_bench(arch, seq, measured):
    # HF Trainer reference: nf4 + double quant, r=64 on 7 projections, batch 4, checkpointing,
    # adamw_torch; the bench measures torch's max_memory_allocated (no CUDA context).
    est = estimate(Arch.from_config(arch), Setup(batch=4, seq=seq, r=64))
    assert abs(est.peak / GIB - measured) / measured <= 0.15


def mistral_params(tmp_path: Path, **overrides) -> Path:
    base = tmp_path / "mistral-config"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps(MISTRAL))
    keys = {"model.base": str(base), "data.max_seq_length": 2048, "lora.r": 64,
            "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 4,
            "train.gradient_checkpointing": True, "train.memory_budget_gib": 12,
            "train.fast_path": {"enabled": "off"}, **overrides}
    return write_params(tmp_path / "params.yaml", keys)


def test_preflight_refuses_and_names_batch_knob(tmp_path, capsys):
    assert main(["preflight", str(mistral_params(tmp_path))]) == preflight.EXIT_WONT_FIT
    err = capsys.readouterr().err
    assert "will not fit: estimated 15.61 GiB > train.memory_budget_gib = 12 GiB" in err
    assert "train.per_device_train_batch_size: 4 -> 2 would fit" in err
    assert "gradient_accumulation_steps 4 -> 8" in err


def test_preflight_names_checkpointing_knob(tmp_path, capsys):
    path = mistral_params(tmp_path, **{"train.gradient_checkpointing": False,
                                       "train.memory_budget_gib": 24})
    assert main(["preflight", str(path)]) == preflight.EXIT_WONT_FIT
    assert "enable train.gradient_checkpointing (true) would fit" in capsys.readouterr().err


def test_preflight_fits_prints_table(tmp_path, capsys):
    path = mistral_params(tmp_path, **{"train.memory_budget_gib": 16, "merge.enabled": False,
                                       "package.include_merged": False})
    assert main(["preflight", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4-bit weights + quant constants" in out and "fits: 15.61 GiB" in out
    assert "evaluate: at most" in out and "merge: disabled" in out


def test_preflight_refuses_a_merge_that_will_not_fit(tmp_path, capsys):
    """Train fits 16 GiB, but the merge computes in a float32 base (~29 GiB for Mistral-7B)."""
    path = mistral_params(tmp_path, **{"train.memory_budget_gib": 16})
    assert main(["preflight", str(path)]) == preflight.EXIT_WONT_FIT
    err = capsys.readouterr().err
    assert "fits: 15.61 GiB" in err
    assert "merge will not fit: estimated 29.25 GiB > train.memory_budget_gib = 16 GiB" in err


def test_every_measured_gpu_peak_within_15_percent():
    """bench/preflight_vs_measured.py's rows: train (one GPU, DDP, FSDP), evaluate, merge."""
    from bench import preflight_vs_measured as table
    rows = table.estimates()
    assert len(rows) == 21
    for label, arch, est, measured, _ in rows:
        assert abs(est.peak / memory.GIB - measured) <= 0.15 * measured, (label, arch)


def test_fsdp_shards_weights_and_optimizer_but_not_activations():
    arch = memory.Arch.from_config(dict(ARCHS["llama-2-13b"]))
    ddp = memory.estimate(arch, memory.Setup(batch=4, seq=2048, world=2))
    fsdp = memory.estimate(arch, memory.Setup(batch=4, seq=2048, world=2, strategy="fsdp"))
    single = memory.estimate(arch, memory.Setup(batch=4, seq=2048))
    # DDP adds one fp32 copy of the LoRA gradients (its buckets): 250M params x 4 bytes
    assert ddp.rows["DDP gradient buckets"] == memory.lora_params(arch, 64, memory.PROJECTIONS) * 4
    assert ddp.peak - single.peak == ddp.rows["DDP gradient buckets"]
    key = "4-bit weights + quant constants"
    assert fsdp.rows[key] == -(-single.rows[key] // 2)
    # no peft fp32 upcast under FSDP: bf16 frozen tensors and residual stream
    assert fsdp.rows["embeddings, lm_head, norms"] * 2 == single.rows["embeddings, lm_head, norms"]
    assert 12.40 * 0.85 <= fsdp.peak / memory.GIB <= 12.40 * 1.15  # measured on 2 x H100


def test_hub_id_not_cached_warns_and_exits_0(tmp_path, capsys):
    path = write_params(tmp_path / "params.yaml", {
        "model.base": "no-such-org/no-such-model", "model.revision": "0" * 40})
    assert main(["preflight", str(path)]) == 0
    assert "cannot estimate memory offline" in capsys.readouterr().out


def test_train_stage_refuses_before_loading(tmp_path, capsys):
    from medqlora.train.training import run
    params = load_params(mistral_params(tmp_path))
    with pytest.raises(preflight.WontFit, match="refusing to start"):  # no data: preflight first
        run(params, tmp_path / "missing", tmp_path / "out", tmp_path / "ck", tmp_path / "live",
            tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_setup_follows_micro_batches_and_where_dropout_is_replayed(tmp_path):
    # The fast path on a GPU: micro_batch_tokens 2048 at 4 x 2048 plans 1-row micro-batches;
    # fused_lora replays the dropout only in layers that skip recompute, so a checkpointed
    # run plans the recomputed layer with peft's copies and a policy-none run without.
    def setup(**fast):
        path = mistral_params(tmp_path, **{"train.fast_path": {"enabled": "on", **fast}})
        return preflight.setup_from(load_params(path), device="cuda")
    split = setup(micro_batch_tokens=2048)
    assert (split.batch, split.seq, split.fast_kernels) == (1, 2048, True)
    assert setup().batch == 4
    assert setup().dropout_copies and setup(fused_lora=False).dropout_copies
    assert not setup(checkpoint_policy="none").dropout_copies
    assert setup(checkpoint_policy="none", fused_lora=False).dropout_copies
    arch = Arch.from_config(MISTRAL)
    assert memory.layer_working_bytes(arch, split) == memory.layer_activation_bytes(
        arch, 2048, dropout_copies=True)
    assert estimate(arch, split).peak < estimate(arch, setup()).peak


def test_setup_plans_the_rebuilt_down_input_and_cuda_graph_buffers(tmp_path):
    # fused_lora keeps gate and up for down_proj's branch instead of their product: an
    # un-recomputed layer plans 2 intermediates a token, not 3; cuda_graphs adds the graph's
    # adapter gradients and input/output buffers.
    def setup(**fast):
        path = mistral_params(tmp_path, **{"train.fast_path": {"enabled": "on", **fast}})
        return preflight.setup_from(load_params(path), device="cuda")
    arch = Arch.from_config(MISTRAL)
    kept = setup(checkpoint_policy="none")
    assert kept.swiglu_recomputed and not setup(fused_lora=False).swiglu_recomputed
    h, kv, i = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate
    assert memory.layer_working_bytes(arch, kept) == int(
        kept.tokens * 2 * (6.5 * h + 2 * kv + 2 * i))
    graphed = setup(checkpoint_policy="none", cuda_graphs=True)
    assert graphed.cuda_graphs and not kept.cuda_graphs
    lora = memory.lora_params(arch, 64, memory.PROJECTIONS)
    buffers = estimate(arch, graphed).rows["CUDA graph buffers"]
    assert buffers == lora * 4 + 4 * graphed.tokens * h * 2
    assert estimate(arch, graphed).peak == estimate(arch, kept).peak + buffers
