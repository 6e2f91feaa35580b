"""The evaluate stage: base vs base + adapter on the test split, under the same quantization.

    python stages/evaluate.py --data data/prepared --adapter models/adapter \
        --predictions predictions --metrics metrics/evaluate.json

The base is loaded once, exactly as training loaded it (model, quantization and compute dtype
come from the adapter's meta.json, not from params.yaml), the adapter is attached, and the
base is scored with the adapter switched off (`disable_adapter()`: LoRA adds B·A to frozen
weights, so switching it off *is* the base, at half the memory of a second copy). For each:

- perplexity over answer tokens only: teacher-forced logits, token NLL summed where
  label != -100, exp(sum / count);
- generation (medqlora.generation: greedy by default, left padding, stop at eos), scored
  against the reference with corpus BLEU, per-item sentence BLEU and ROUGE-L F1;
- diagnostic accuracy on mcq and lab items (medqlora.metrics.parse_answer documents the rule;
  an output with no parseable answer counts as wrong and as a parse failure);
- bootstrap 95% intervals for BLEU and accuracy (seeded, items resampled).

Model text goes only to predictions/predictions.jsonl; the log carries counts and scores.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from medqlora import metrics
from medqlora.config import Params
from medqlora.generation import GenerationSettings, generate_from_ids
from medqlora.outputs import atomic_dir, write_json
from medqlora.provenance import read_meta, write_meta

log = logging.getLogger(__name__)
IGNORE = -100
SCALARS = ("perplexity", "bleu", "rouge_l", "diagnostic_accuracy", "parse_failure_rate")


# ---------------------------------------------------------------- inputs


def load_test(data_dir: str | Path, max_examples: int | None = None) -> list[dict[str, Any]]:
    """Test rows sorted by id, the first `max_examples` of them (deterministic first N)."""
    import pandas as pd
    path = Path(data_dir) / "test.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    frame = pd.read_parquet(path).sort_values("id", kind="stable")
    if max_examples is not None:
        frame = frame.head(max_examples)
    rows = []
    for rec in frame.to_dict("records"):
        rec["input_ids"] = [int(t) for t in rec["input_ids"]]
        rec["labels"] = [int(t) for t in rec["labels"]]
        rec["label"] = rec["label"] if isinstance(rec.get("label"), str) else None
        rows.append(rec)
    if not rows:
        raise ValueError(f"{path} has no rows: raise data.test_fraction or add records")
    return rows


def prompt_ids(row: dict[str, Any]) -> list[int]:
    """The prompt's token ids: input_ids up to the first answer token (label != -100).

    Taking them from the prepared ids (not re-tokenising `prompt`) feeds the model exactly the
    tokens it was trained on, bos and template boundaries included.
    """
    for i, label in enumerate(row["labels"]):
        if label != IGNORE:
            return row["input_ids"][:i]
    raise ValueError(f"test row {row['id']} has no answer token (every label is -100)")


def load_models(adapter_dir: str | Path):
    """(peft model, tokenizer, adapter meta): the base rebuilt from the adapter's meta.json."""
    from medqlora.modeling import load_adapter, load_base, saved_tokenizer, settings_from_meta
    meta = read_meta(adapter_dir)
    model_params, quant, precision = settings_from_meta(meta)
    tokenizer = saved_tokenizer(adapter_dir, model_params)
    model = load_adapter(load_base(model_params, quant, precision), adapter_dir)
    model.eval()
    return model, tokenizer, meta


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def answer_nll(model, rows: Sequence[dict[str, Any]], batch_size: int,
               pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, answer-token count) per row, from teacher-forced logits.

    Logits at position t predict token t+1, so logits[:, :-1] are scored against
    labels[:, 1:]; prompt and padding positions carry -100 and are skipped. The NLL is the
    cross-entropy of the full distribution (log-softmax in float32), never of argmax ids.
    With bfloat16 compute, padding a row into a batch moves its NLL by ~0.3% (other kernel
    shapes); base and adapter are batched identically, so their comparison is unaffected.
    """
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):  # right padding: causal attention never sees it
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        target = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE,
            reduction="none")
        sums = nll.sum(dim=1).tolist()
        counts = (target != IGNORE).sum(dim=1).tolist()
        out.extend((float(s), int(c)) for s, c in zip(sums, counts))
    return out


def score_outputs(rows: Sequence[dict[str, Any]], outputs: Sequence[str]
                  ) -> list[dict[str, Any]]:
    """Per-item scores: sentence BLEU, ROUGE-L F1, parsed answer and correctness."""
    items = []
    for row, text in zip(rows, outputs):
        item: dict[str, Any] = {"bleu": metrics.sentence_bleu(text, row["reference"]),
                                "rouge_l": metrics.rouge_l(text, row["reference"]),
                                "parsed": None, "correct": None}
        if metrics.is_diagnostic(row["kind"], row["label"]):
            item["parsed"] = metrics.parse_answer(row["kind"], text)
            item["correct"] = item["parsed"] == row["label"]
        items.append(item)
    return items


def summarise(rows: Sequence[dict[str, Any]], outputs: Sequence[str],
              items: Sequence[dict[str, Any]], nll: Sequence[tuple[float, int]],
              samples: int, seed: int) -> dict[str, Any]:
    """One model's metrics block of metrics/evaluate.json."""
    refs = [r["reference"] for r in rows]
    diag = [it for it in items if it["correct"] is not None]
    summary: dict[str, Any] = {
        "perplexity": metrics.perplexity(sum(s for s, _ in nll), sum(c for _, c in nll)),
        "bleu": metrics.corpus_bleu(outputs, refs),
        "bleu_ci95": metrics.bleu_ci(outputs, refs, samples, seed),
        "rouge_l": sum(it["rouge_l"] for it in items) / len(items),
        "diagnostic_accuracy": None, "diagnostic_accuracy_ci95": None,
        "parse_failure_rate": None,
    }
    if diag:
        correct = [bool(it["correct"]) for it in diag]
        summary["diagnostic_accuracy"] = sum(correct) / len(correct)
        summary["diagnostic_accuracy_ci95"] = metrics.accuracy_ci(correct, samples, seed)
        summary["parse_failure_rate"] = sum(it["parsed"] is None for it in diag) / len(diag)
    return summary


def run_model(model, tokenizer, rows, settings: GenerationSettings, samples: int
              ) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """(summary, outputs, per-item scores) of whatever `model` currently computes."""
    nll = answer_nll(model, rows, settings.batch_size, tokenizer.pad_token_id)
    outputs = generate_from_ids(model, tokenizer, [prompt_ids(r) for r in rows], settings)
    items = score_outputs(rows, outputs)
    for item, (s, c) in zip(items, nll):
        item["perplexity"] = math.exp(s / c) if c else None
    return summarise(rows, outputs, items, nll, samples, settings.seed), outputs, items


def delta(base: dict[str, Any], adapter: dict[str, Any]) -> dict[str, float | None]:
    """Adapter minus base for every scalar metric (None where either side is None)."""
    return {k: (None if base[k] is None or adapter[k] is None else adapter[k] - base[k])
            for k in SCALARS}


# ---------------------------------------------------------------- the stage


def prediction_rows(rows, outputs: dict[str, list[str] | None],
                    items: dict[str, list[dict] | None]) -> list[dict[str, Any]]:
    """predictions.jsonl rows: the example, each model's output and its per-item scores."""
    out = []
    for i, row in enumerate(rows):
        rec = {k: row.get(k) for k in ("id", "kind", "lang", "prompt", "reference", "label")}
        for name in ("base", "adapter"):
            rec[f"{name}_output"] = outputs[name][i] if outputs[name] is not None else None
            rec[f"{name}_scores"] = items[name][i] if items[name] is not None else None
        out.append(rec)
    return out


def contamination_report(data_dir: str | Path, rows) -> dict[str, Any] | None:
    """8-gram overlap of each scored test item's prompt + reference with the train split.

    None (with a warning) when the data folder has no train.parquet to compare with.
    """
    import pandas as pd
    path = Path(data_dir) / "train.parquet"
    if not path.is_file():
        log.warning("contamination: %s missing; no overlap report", path)
        return None
    train = pd.read_parquet(path, columns=["prompt", "reference"])
    report = metrics.contamination([r["prompt"] + " " + r["reference"] for r in rows],
                                   (train["prompt"] + " " + train["reference"]).tolist(), n=8)
    log.info("contamination: %d of %d test items share an 8-gram with train (max overlap %.2f)",
             report["items_with_overlap"], len(rows), report["max_overlap"])
    return report


def evaluate(params: Params, data_dir: str | Path, adapter_dir: str | Path,
             predictions_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Score base and base + adapter; write predictions/ and the metrics JSON; return it."""
    cfg = params.evaluate
    settings = GenerationSettings.from_params(cfg, params.seed)
    rows = load_test(data_dir, cfg.max_examples)
    model, tokenizer, meta = load_models(adapter_dir)
    summaries: dict[str, Any] = {"base": None}
    outputs: dict[str, Any] = {"base": None}
    items: dict[str, Any] = {"base": None}
    runs = (("base", model.disable_adapter), ) if cfg.compare_base else ()
    for name, context in (*runs, ("adapter", contextlib.nullcontext)):
        with context():
            summaries[name], outputs[name], items[name] = run_model(
                model, tokenizer, rows, settings, cfg.bootstrap_samples)
        log.info("%s: perplexity %.3f, BLEU %.2f, ROUGE-L %.3f, diagnostic accuracy %s",
                 name, summaries[name]["perplexity"], summaries[name]["bleu"],
                 summaries[name]["rouge_l"], summaries[name]["diagnostic_accuracy"])
    result = {
        "n": len(rows),
        "n_diagnostic": sum(metrics.is_diagnostic(r["kind"], r["label"]) for r in rows),
        "n_answer_tokens": sum(sum(t != IGNORE for t in r["labels"]) for r in rows),
        "base": summaries["base"],
        "adapter": summaries["adapter"],
        "delta": delta(summaries["base"], summaries["adapter"]) if cfg.compare_base else None,
        "generation": settings.as_dict(),
        "contamination": contamination_report(data_dir, rows),
    }
    with atomic_dir(predictions_dir) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as handle:
            for rec in prediction_rows(rows, outputs, items):
                handle.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        write_meta(tmp, stage="evaluate", params=params.section("seed", "evaluate"),
                   inputs={"test": Path(data_dir) / "test.parquet", "adapter": adapter_dir},
                   extra={"base": meta.get("base"), "quantization":
                          meta.get("params", {}).get("quantization"),
                          "n": result["n"], "generation": result["generation"]})
    write_json(metrics_path, result)
    return result


def compare_perplexity(data_dir: str | Path, adapter_dir: str | Path,
                       max_examples: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """{"base": ppl, "adapter": ppl} over the test split's answer tokens (no generation).

    For tests and quick checks: a trained adapter should have the lower perplexity.
    """
    rows = load_test(data_dir, max_examples)
    model, tokenizer, _ = load_models(adapter_dir)
    out = {}
    for name, context in (("base", model.disable_adapter), ("adapter", contextlib.nullcontext)):
        with context():
            nll = answer_nll(model, rows, batch_size, tokenizer.pad_token_id)
        out[name] = metrics.perplexity(sum(s for s, _ in nll), sum(c for _, c in nll))
    return out
