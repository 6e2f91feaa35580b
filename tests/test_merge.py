"""Merge stage: a trained tiny adapter merges into the dequantized NF4 weights within tolerance;
a wrong merge fails the gate, writes its metrics and publishes nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adapter_fixture import TEXTS, adapter_params, make_adapter, write_test_split
from conftest import ROOT, write_params
from medqlora import merging

# 16 held-out-style prompts (about 500 positions), templated as prepare does by default.
PROMPTS = [f"### Instruction:\n{json.loads(line)['instruction']}\n\n### Response:\n"
           for line in (ROOT / "data/raw/qa.jsonl").read_text(encoding="utf-8").splitlines()[:16]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """(adapter dir, prepared data dir) made once for the module."""
    tmp = tmp_path_factory.mktemp("merge")
    adapter = make_adapter(str(tiny_model), tmp / "adapter")
    return adapter, write_test_split(tmp / "prepared", PROMPTS)


def _merge(trained, tmp_path, **overrides):
    adapter, data = trained
    params = adapter_params(str(ROOT / "models" / "tiny-med-llama"), **overrides)
    rc = merging.run_merge(params, data, adapter, tmp_path / "merged", tmp_path / "merge.json")
    return rc, json.loads((tmp_path / "merge.json").read_text())


@pytest.mark.slow
def test_dequantized_merge_passes_parity(trained, tmp_path):
    rc, m = _merge(trained, tmp_path)
    assert rc == 0 and m["passed"] is True
    assert m["into"] == "dequantized" and m["dtype"] == "bfloat16" and m["n_prompts"] == 16
    assert m["tolerance"] == {"max_abs_logit_diff": 0.5, "min_top1_agreement": 0.99}
    # Only one bf16 rounding of W_deq + s·B·A separates the two models.
    # Measured on the embedded base: max 0.0625 (one bf16 step at |logit| 8-16), mean ~0.01.
    assert 0 < m["max_abs_logit_diff"] <= 0.25 and m["mean_abs_logit_diff"] < 0.03
    assert m["top1_agreement"] >= 0.99
    # The adapter really changed the model: parity is small against the adapter's effect.
    assert m["adapter_effect"]["max_abs_logit_diff"] > 5 * m["max_abs_logit_diff"]
    # The QLoRA pitfall, measured: merging into the original weights drifts further.
    # (measured: max 0.81 vs 0.0625, mean 0.059 vs 0.0097, top-1 0.934 vs 0.996)
    assert m["alternative"]["into"] == "original" and m["alternative"]["passed"] is False
    assert m["alternative"]["mean_abs_logit_diff"] > 3 * m["mean_abs_logit_diff"]
    merged = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= {
        p.name for p in merged.iterdir()}
    meta = json.loads((merged / "meta.json").read_text())
    assert meta["into"] == "dequantized" and meta["parity"]["passed"] is True
    assert meta["base"]["id"] == str(ROOT / "models" / "tiny-med-llama")
    assert not list(merged.glob("*.bin"))


@pytest.mark.slow
def test_merge_into_original_fails_gate_and_publishes_nothing(trained, tmp_path, monkeypatch):
    """The entrypoint with the QLoRA pitfall: exit 1, metrics say why, no merged folder."""
    sys.path.insert(0, str(ROOT / "stages"))
    import merge as merge_stage
    adapter, data = trained
    monkeypatch.chdir(ROOT)  # params' data paths are checked against the project root
    params = write_params(tmp_path / "params.yaml", {"merge.into": "original"})
    rc = merge_stage.main(["--params", str(params), "--data", str(data), "--adapter", str(adapter),
                           "--out", str(tmp_path / "merged"),
                           "--metrics", str(tmp_path / "merge.json")])
    m = json.loads((tmp_path / "merge.json").read_text())
    assert rc == 1 and m["passed"] is False and m["into"] == "original"
    assert m["max_abs_logit_diff"] > 0.5 or m["top1_agreement"] < 0.99
    assert m["alternative"]["into"] == "dequantized" and m["alternative"]["passed"] is True
    assert not (tmp_path / "merged").exists()


def test_disabled_merge_writes_skip_markers(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    params = adapter_params("models/tiny-med-llama", **{"merge.enabled": False,
                                                       "package.include_merged": False})
    rc = merging.run_merge(params, tmp_path, adapter, tmp_path / "merged", tmp_path / "m.json")
    assert rc == 0
    assert json.loads((tmp_path / "m.json").read_text()) == {"enabled": False, "passed": None}
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["meta.json"]
    assert json.loads((tmp_path / "merged" / "meta.json").read_text())["skipped"] is True


def test_compare_logits_arithmetic():
    ref = [torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])]
    other = [torch.tensor([[1.0, 1.5, 2.5], [3.0, 0.5, 0.0]])]
    stats = merging.compare_logits(ref, other)
    # |diff| = [0, .5, 2.5, 0, .5, 0]: max 2.5, mean 3.5 / 6; argmax 1 vs 2, 0 vs 0.
    assert stats == {"n_positions": 2, "max_abs_logit_diff": 2.5,
                     "mean_abs_logit_diff": round(3.5 / 6, 6), "top1_agreement": 0.5}


def test_top1_agreement_counts_exact_ties_only():
    # Reference ties tokens 0 and 1; the merged model picks 1 by a hair: agreement.
    # Second position: a real gap (2.0 vs 1.9) in both models, opposite picks: disagreement.
    ref = [torch.tensor([[5.0, 5.0, 1.0], [2.0, 1.9, 0.0]])]
    other = [torch.tensor([[4.9, 5.0, 1.0], [1.9, 2.0, 0.0]])]
    assert merging.compare_logits(ref, other)["top1_agreement"] == 0.5
