"""The evaluate stage on a tiny fixture: a LoRA adapter on the tiny 4-bit base, 7 test rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from adapter_fixture import adapter_meta
from conftest import ROOT, write_params
from medqlora.evaluate import evaluation
from medqlora.evaluate import generation
from medqlora.core import modeling
from medqlora.core.config import build_params
from medqlora.data.templates import format_prompt

# (id, kind, label, user text, reference); ids sort as listed, "g-..." is cut by max_examples=6
ROWS = [
    ("a-qa", "qa", None, "What is anemia?", "A low hemoglobin level."),
    ("b-lab", "lab", "anemia", "Analyse: Hemoglobin 8.1 g/dL (ref 12-16)",
     "Hemoglobin is low.\nFinding: anemia"),
    ("c-mcq", "mcq", "B", "Which ion sets osmolality?\nA. Ca\nB. Na\nC. K\nD. Mg",
     "Answer: B. Sodium."),
    ("d-lab", "lab", "hyperkalemia", "Analysez : Potassium 6.6 mmol/L (N 3.5-5.0)",
     "Potassium élevé.\nConclusion : hyperkaliémie"),
    ("e-qa", "qa", None, "Qu'est-ce que l'anaphylaxie ?", "Une réaction allergique sévère."),
    ("f-mcq", "mcq", "A", "Traitement de la TVP ?\nA. anticoagulation\nB. chirurgie",
     "Réponse : A. Anticoagulation."),
    ("g-qa", "qa", None, "What does the kidney do?", "It filters blood."),
]
MAX_EXAMPLES = 6


def _params(base: str, **evaluate):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["model"]["base"] = base
    doc["evaluate"].update({"max_examples": MAX_EXAMPLES, "max_new_tokens": 6,
                            "batch_size": 4, "bootstrap_samples": 200, **evaluate})
    return build_params(doc)


def write_test_parquet(data_dir: Path, tokenizer) -> Path:
    """test.parquet following the prepared-data contract (prompt masked with -100)."""
    import pandas as pd
    records = []
    for rid, kind, label, text, ref in reversed(ROWS):  # stored out of order on purpose
        prompt = format_prompt(tokenizer, text)
        p_ids = tokenizer(prompt)["input_ids"]
        a_ids = tokenizer(ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        records.append({"id": rid, "source": f"fixture:{rid}", "kind": kind, "lang": "en",
                        "prompt": prompt, "reference": ref, "label": label,
                        "options": json.dumps({"A": "x", "B": "y"}) if kind == "mcq" else None,
                        "input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + a_ids,
                        "length": len(p_ids) + len(a_ids)})
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(data_dir / "test.parquet")
    return data_dir


def write_adapter(out: Path, base: str, perturb: bool) -> Path:
    """An adapter folder as train writes it; perturb=False keeps LoRA B = 0 (adapter == base)."""
    from peft import get_peft_model
    params = _params(base)
    precision = modeling.resolve_precision(params.quantization, "no")
    torch.manual_seed(0)
    model = get_peft_model(modeling.load_base(params.model, params.quantization, precision),
                           modeling.lora_config(params.lora))
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    model.save_pretrained(str(out))
    modeling.load_tokenizer(params.model).save_pretrained(str(out))
    adapter_meta(out, params, modeling.resolve_precision(params.quantization, "auto", "cpu"),
                 base)
    return out


@pytest.fixture(scope="module")
def fixture_dirs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    tokenizer = modeling.load_tokenizer(_params(str(tiny_model)).model)
    data = write_test_parquet(tmp / "prepared", tokenizer)
    zero = write_adapter(tmp / "adapter-zero", str(tiny_model), perturb=False)
    moved = write_adapter(tmp / "adapter-moved", str(tiny_model), perturb=True)
    return {"tmp": tmp, "data": data, "zero": zero, "moved": moved, "base": str(tiny_model)}


@pytest.mark.slow
def test_load_test_is_first_n_by_id(fixture_dirs):
    rows = evaluation.load_test(fixture_dirs["data"], MAX_EXAMPLES)
    assert [r["id"] for r in rows] == [r[0] for r in ROWS[:MAX_EXAMPLES]]
    assert rows[0]["label"] is None and rows[1]["label"] == "anemia"
    prompt = evaluation.prompt_ids(rows[1])
    assert prompt == rows[1]["input_ids"][:len(prompt)]
    assert rows[1]["labels"][len(prompt)] != -100 and rows[1]["labels"][len(prompt) - 1] == -100


def test_left_pad_right_aligns_rows():
    ids, mask = generation.left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.slow
def test_answer_nll_matches_the_models_own_loss(fixture_dirs):
    """NLL over answer tokens == HF's mean loss per row; padding in a batch changes little."""
    model, tokenizer, _ = evaluation.load_models(fixture_dirs["moved"])
    rows = evaluation.load_test(fixture_dirs["data"])
    single = evaluation.answer_nll(model, rows, batch_size=1, pad_id=tokenizer.pad_token_id)
    batched = evaluation.answer_nll(model, rows, batch_size=4, pad_id=tokenizer.pad_token_id)
    for row, (nll, count), (nll_b, count_b) in zip(rows, single, batched):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss.item()
        assert count == count_b == sum(t != -100 for t in row["labels"])
        assert nll / count == pytest.approx(loss, rel=1e-5)
        # bfloat16 compute: a right-padded batch runs other kernel shapes (observed 0.3%)
        assert nll_b == pytest.approx(nll, rel=2e-2)


@pytest.mark.slow
def test_greedy_generation_is_deterministic(fixture_dirs):
    model, tokenizer, _ = evaluation.load_models(fixture_dirs["moved"])
    rows = evaluation.load_test(fixture_dirs["data"])
    settings = generation.GenerationSettings(5, False, 0.7, 1.0, 3, 42)
    prompts = [evaluation.prompt_ids(r) for r in rows]
    first = generation.generate_from_ids(model, tokenizer, prompts, settings)
    assert len(first) == len(rows) and all(isinstance(t, str) for t in first)
    assert generation.generate_from_ids(model, tokenizer, prompts, settings) == first
    # one prompt alone (no padding) decodes like it did inside the padded batch
    alone = generation.generate_from_ids(model, tokenizer, prompts[:1],
                                         generation.GenerationSettings(5, False, 0.7, 1.0, 1, 42))
    assert alone == first[:1]
    assert settings.as_dict() == {"max_new_tokens": 5, "do_sample": False, "batch_size": 3,
                                  "seed": 42, "decoding": "greedy"}


@pytest.mark.slow
def test_evaluate_untrained_adapter_equals_base(fixture_dirs):
    """LoRA B = 0: the adapter computes exactly the base, so every delta is 0."""
    tmp = fixture_dirs["tmp"] / "run-zero"
    params = _params(fixture_dirs["base"])
    result = evaluation.evaluate(params, fixture_dirs["data"], fixture_dirs["zero"],
                                 tmp / "predictions", tmp / "metrics" / "evaluate.json")
    assert json.loads((tmp / "metrics" / "evaluate.json").read_text()) == result
    assert set(result) == {"n", "n_diagnostic", "n_option_scored", "n_generated",
                           "n_answer_tokens", "base", "adapter", "delta", "delta_ci95",
                           "generation", "decoding"}
    # No adapter effect leaves no room for the decode copy's kernel noise (the limit is
    # merge.max_effect_lost x an effect of 0): decoding stays on the 4-bit weights, and says so.
    decoding = result["decoding"]
    assert decoding["weights"] == "4-bit" and not decoding["agreement"]["passed"]
    assert decoding["agreement"]["adapter_effect_mean_abs_logit_diff"] == 0.0
    assert decoding["agreement"]["checks"]["mean_abs_logit_diff"]["limit"] == 0.0
    assert result["n"] == MAX_EXAMPLES and result["n_diagnostic"] == 4
    assert result["n_option_scored"] == 2 and result["n_generated"] == 4
    keys = {*evaluation.SCALARS, *(f"{k}_ci95" for k in evaluation.SCALARS), "stopped_by_eos"}
    for name in ("base", "adapter"):
        block = result[name]
        assert set(block) == keys
        assert math.isfinite(block["perplexity"]) and block["perplexity"] > 1.0
        for key in evaluation.SCALARS:   # each interval holds its point estimate
            lo, hi = block[f"{key}_ci95"]
            assert lo <= block[key] <= hi, key
        assert 0.0 <= block["bleu_ci95"][0] and block["bleu_ci95"][1] <= 100.0
        assert 0.0 <= block["diagnostic_accuracy_ci95"][0]
        assert block["diagnostic_accuracy_ci95"][1] <= 1.0
        assert 0.0 <= block["parse_failure_rate"] <= 1.0
        # a share of the 4 generated answers (the tiny base meets eos within 6 tokens in some)
        assert block["stopped_by_eos"] * 4 == int(block["stopped_by_eos"] * 4)
    assert result["base"] == result["adapter"]
    assert result["delta"] == {k: 0.0 for k in evaluation.SCALARS}
    # paired: the same resampled items give the same difference, 0, on every resample
    assert result["delta_ci95"] == {k: [0.0, 0.0] for k in evaluation.SCALARS}
    assert result["generation"]["max_new_tokens"] == 6
    assert result["generation"]["decoding"] == "greedy"

    lines = (tmp / "predictions" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    preds = [json.loads(line) for line in lines]
    assert len(preds) == result["n"]
    assert [p["id"] for p in preds] == [r[0] for r in ROWS[:MAX_EXAMPLES]]
    for pred in preds:
        assert pred["base_output"] == pred["adapter_output"]
        scores = pred["adapter_scores"]
        assert (scores["correct"] is None) == (pred["kind"] == "qa")
        if pred["kind"] == "mcq":  # scored by option likelihood: no generated text, no BLEU
            assert set(scores) == {"bleu", "rouge_l", "method", "option_loglik", "parsed",
                                   "correct", "perplexity"}
            assert scores["method"] == "option_loglik" and scores["bleu"] is None
            assert pred["adapter_output"] == {"c-mcq": "Answer: ", "f-mcq": "Réponse : "}[
                pred["id"]] + scores["parsed"]
        else:
            assert set(scores) == {"bleu", "rouge_l", "method", "parsed", "correct",
                                   "perplexity"}
            assert scores["method"] == "generation"
    meta = json.loads((tmp / "predictions" / "meta.json").read_text())
    assert meta["stage"] == "evaluate" and meta["n"] == MAX_EXAMPLES
    assert meta["quantization"]["load_in_4bit"] is True
    assert set(meta["inputs"]) == {"test", "adapter"}


@pytest.mark.slow
def test_evaluate_without_base_through_the_stage_entrypoint(fixture_dirs, monkeypatch):
    """stages/evaluate.py with compare_base false: base and delta are null, adapter moved."""
    import importlib.util
    tmp = fixture_dirs["tmp"] / "run-stage"
    tmp.mkdir()
    params_path = write_params(tmp / "params.yaml", {
        "evaluate.compare_base": False, "evaluate.max_examples": 3,
        "evaluate.max_new_tokens": 4, "evaluate.bootstrap_samples": 100})
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(ROOT)  # params validation resolves data.sources from the project root
    assert module.main(["--params", str(params_path), "--data", str(fixture_dirs["data"]),
                        "--adapter", str(fixture_dirs["moved"]),
                        "--predictions", str(tmp / "predictions"),
                        "--metrics", str(tmp / "evaluate.json")]) == 0
    result = json.loads((tmp / "evaluate.json").read_text())
    assert result["n"] == 3 and result["base"] is None and result["delta"] is None
    assert math.isfinite(result["adapter"]["perplexity"])
    preds = (tmp / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 3
    assert all(json.loads(p)["base_output"] is None for p in preds)


@pytest.mark.slow
def test_compare_perplexity_sees_the_adapter(fixture_dirs):
    zero = evaluation.compare_perplexity(fixture_dirs["data"], fixture_dirs["zero"])
    assert zero["base"] == zero["adapter"]
    moved = evaluation.compare_perplexity(fixture_dirs["data"], fixture_dirs["moved"])
    assert moved["base"] == pytest.approx(zero["base"])
    assert moved["adapter"] != pytest.approx(moved["base"], rel=1e-3)


def test_token_batches_arithmetic():
    # longest first; 9 alone (2 x 9 > 16), then 7 and 5 (2 x 7 = 14 <= 16)
    assert evaluation.token_batches([5, 9, 7], max_rows=8, max_tokens=16) == [[1], [2, 0]]
    assert evaluation.token_batches([3, 3, 3], max_rows=2, max_tokens=100) == [[0, 1], [2]]
    assert evaluation.token_batches([40], max_rows=4, max_tokens=16) == [[0]]


@pytest.mark.slow
def test_options_scored_by_their_log_likelihood(fixture_dirs):
    """Each option's score is the summed log-probability of "Answer: X" after the prompt,
    computed here independently with one unpadded forward pass per option; the choice is the
    argmax, as in lm-evaluation-harness's multiple_choice acc."""
    model, tokenizer, _ = evaluation.load_models(fixture_dirs["moved"])
    rows = [r for r in evaluation.load_test(fixture_dirs["data"]) if r["kind"] == "mcq"]
    assert evaluation.option_continuations(rows[0]) == {
        "A": "Answer: A", "B": "Answer: B", "C": "Answer: C", "D": "Answer: D"}
    items = evaluation.score_options(model, tokenizer, rows, batch_size=3)
    for row, item in zip(rows, items):
        prompt = evaluation.prompt_ids(row)
        for letter, text in evaluation.option_continuations(row).items():
            cont = tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
            expected = float(logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum())
            # bf16 compute: a padded batch runs other kernel shapes (observed 0.15%)
            assert item["option_loglik"][letter] == pytest.approx(expected, rel=5e-3)
        assert item["parsed"] == max(item["option_loglik"], key=item["option_loglik"].get)
        assert item["correct"] == (item["parsed"] == row["label"])


@pytest.mark.slow
def test_option_letters_must_hold_the_answer(fixture_dirs):
    row = dict(evaluation.load_test(fixture_dirs["data"])[2], label="E")
    with pytest.raises(ValueError, match=r"mcq answer 'E' is not among the option lines "
                                         r"\['A', 'B', 'C', 'D'\]"):
        evaluation.option_continuations(row)


def _scored(correct, parsed, rouge, method="generation"):
    return {"method": method, "correct": correct, "parsed": parsed, "rouge_l": rouge,
            "bleu": None}


def test_paired_intervals_and_stops_from_item_columns():
    """Hand-made items: two generated lab answers (one right), one mcq scored by likelihood."""
    rows = [{"reference": "Finding: anemia"}, {"reference": "Finding: hyperkalemia"},
            {"reference": "Answer: B"}]
    base = evaluation.item_arrays(
        rows, ["Finding: anemia", "no idea", "Answer: A"],
        [_scored(True, "anemia", 1.0), _scored(False, None, 0.0),
         _scored(False, "A", None, "option_loglik")],
        [(2.0, 2), (6.0, 2), (1.0, 1)], [True, False, None])
    summary = evaluation.summarise(base, {k: [0.0, 1.0] for k in evaluation.SCALARS})
    assert summary["perplexity"] == pytest.approx(math.exp(9.0 / 5))
    assert summary["diagnostic_accuracy"] == pytest.approx(1 / 3)   # 1 of 2 labs + 0 of 1 mcq
    assert summary["parse_failure_rate"] == 0.5                      # 1 of the 2 parsed items
    assert summary["rouge_l"] == 0.5 and summary["stopped_by_eos"] == 0.5
    adapter = dict(base, correct=np.array([True, True, True]))
    per_model, paired = evaluation.intervals({"base": base, "adapter": adapter}, 300, 0)
    lo, hi = paired["diagnostic_accuracy"]
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0       # the adapter never does worse on an item
    assert paired["perplexity"] == [0.0, 0.0]    # same NLLs: no difference on any resample
    assert per_model["adapter"]["diagnostic_accuracy"] == [1.0, 1.0]
    assert evaluation.intervals({"base": base, "adapter": adapter}, 300, 0) == (per_model, paired)
