"""The decode copy (medqlora/evaluate/decode_copy.py) on a trained adapter over the 4-bit tiny
base: the copy holds the numbers the 4-bit layers multiply with, undo restores them exactly,
and evaluate's decision follows the agreement and the memory check."""
from __future__ import annotations

import pytest
import torch

from adapter_fixture import make_adapter
from conftest import TINY_MODEL
from medqlora.evaluate import decode_copy, parity

pytestmark = pytest.mark.slow
TEXTS = ["What is the normal range of serum potassium?",
         "Analyse the following results:\n\nSodium (Na+): 128 mmol/L (ref: 135-145)"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(str(TINY_MODEL), tmp_path_factory.mktemp("adapter"), steps=12, lr=0.1,
                        **{"quantization.bnb_4bit_compute_dtype": "bfloat16"})


@pytest.fixture()
def shipped(adapter):
    from medqlora.core.modeling import load_shipped
    model, tokenizer, _ = load_shipped(adapter)
    return model, [tokenizer(t)["input_ids"] for t in TEXTS]


def test_the_copy_multiplies_by_the_4bit_layers_numbers_and_undo_restores_them(shipped):
    model, ids = shipped
    (_, _, layer), *_ = decode_copy.quantized_linears(model)
    x = torch.randn(3, layer.in_features).to(layer.compute_dtype)
    before = decode_copy.dequantized_linear(layer).weight    # the layout bitsandbytes loaded
    reference = parity.sequence_logits(model, ids)  # repacks CPU layers for its kernel
    assert layer.weight.quant_state.packing_format_for_cpu
    after = decode_copy.dequantized_linear(layer).weight      # read from the repacked layout
    # The repacked state keeps block scales in bf16: the copy uses those, a bf16 rounding of
    # the loaded float32 scales, so at most one bf16 step of difference per block.
    assert torch.allclose(after.float(), before.float(), rtol=2 ** -7, atol=0)
    assert (after != before).float().mean() < 0.5
    # The copy's matmul is the 4-bit layer's up to summation order.
    assert torch.allclose(torch.nn.functional.linear(x, after).float(), layer(x).float(),
                          atol=0.05, rtol=0.02)
    copy = decode_copy.DecodeCopy.make(model)
    assert not decode_copy.quantized_linears(model) and len(copy.swapped) == 28
    copied = parity.sequence_logits(model, ids)
    copy.undo()
    assert len(decode_copy.quantized_linears(model)) == 28
    again = parity.sequence_logits(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))    # undo is exact
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, copied)])
    assert 0 < diff.mean() < 0.05          # kernel noise, not another model


def test_prepare_keeps_the_copy_when_it_agrees(shipped):
    model, ids = shipped
    decided = decode_copy.prepare(model, ids, max_effect_lost=0.1, min_top1=0.9)
    assert decided["weights"] == "dequantized copy (bfloat16)"
    agreement = decided["agreement"]
    assert agreement["passed"] and agreement["n_positions"] == sum(map(len, ids))
    assert agreement["mean_abs_logit_diff"] <= agreement["checks"]["mean_abs_logit_diff"]["limit"]
    assert agreement["adapter_effect_mean_abs_logit_diff"] > 1.0   # the trained adapter: 2.02
    assert not decode_copy.quantized_linears(model)


def test_prepare_stays_on_4bit_when_the_copy_disagrees_or_does_not_fit(shipped, monkeypatch):
    model, ids = shipped
    reference = parity.sequence_logits(model, ids)
    strict = decode_copy.prepare(model, ids, max_effect_lost=1e-9, min_top1=0.9)
    assert strict["weights"] == "4-bit" and not strict["agreement"]["passed"]
    assert len(decode_copy.quantized_linears(model)) == 28
    assert all(torch.equal(a, b) for a, b in
               zip(reference, parity.sequence_logits(model, ids)))
    monkeypatch.setattr(decode_copy, "free_bytes", lambda device: 2**30)
    tight = decode_copy.prepare(model, ids, max_effect_lost=0.1, min_top1=0.9)
    assert tight == {"weights": "4-bit", "reason": tight["reason"]}
    assert "GiB headroom, 1.0 GiB free on cpu" in tight["reason"]
