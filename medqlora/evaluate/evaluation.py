"""The evaluate stage: base vs base + adapter on the test split, under the same quantization.

    python stages/evaluate.py --data data/prepared --adapter models/adapter \
        --predictions predictions --metrics metrics/evaluate.json

The base is loaded once, exactly as training loaded it (model, quantization and compute dtype
come from the adapter's meta.json, not from params.yaml), the adapter is attached, and the
base is scored with the adapter switched off (`disable_adapter()`: LoRA adds B·A to frozen
weights, so switching it off *is* the base, at half the memory of a second copy). For each:

- perplexity over answer tokens only: teacher-forced logits, token NLL summed where
  label != -100, exp(sum / count);
- multiple-choice (mcq) items scored by the log-likelihood of each option, the protocol of
  lm-evaluation-harness: the continuation "Answer: X" (as prepare wrote the reference, the
  option letter X) after the prompt; the option with the highest summed log-probability is
  the model's answer. No text is generated for them;
- generation for every other item (medqlora.evaluate.generation through the continuous-batching
  Decoder: greedy by default, each row stops at eos / end of turn and frees its slot), scored against the reference with corpus BLEU, per-item sentence
  BLEU and ROUGE-L F1; lab items' diagnostic answers are parsed from the text
  (medqlora.evaluate.metrics.parse_answer documents the rule; no parseable answer counts as wrong and
  as a parse failure);
- bootstrap 95% intervals (seeded, items resampled) of every metric, and of the adapter's
  difference from the base on the same resampled items (paired: `delta_ci95`);
- the share of generated answers that ended by end-of-sequence / end-of-turn rather than by
  reaching max_new_tokens (`stopped_by_eos`).

Sets: the test split, and the held-out set when prepare wrote one (data.heldout_sources:
evaluated only, never trained on); each gets its block, the test split's at the top level.

What runs: the 4-bit base + adapter as loaded, or, when it fits and agrees with it within the
merge parity gate's tolerance (merge.max_effect_lost, merge.min_top1_agreement, over the first
merge.parity_prompts test items, teacher-forced), the same weights dequantized once
(medqlora.evaluate.decode_copy): the numbers every 4-bit matmul uses, without dequantizing on
every step. metrics/evaluate.json "decoding" records which, why, and the agreement measured.

Why options by likelihood: generating 512 tokens to read one letter is most of evaluate's
cost at 7B, and parsing free text adds failures unrelated to knowledge; the likelihood ranks
exactly the answers the model could give, one forward pass per option.

Model text goes only to predictions/predictions.jsonl; the log carries counts and scores.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medqlora.core.config import Params
from medqlora.core.memory import EVAL_NLL_TOKENS
from medqlora.core.outputs import atomic_dir, write_json
from medqlora.core.provenance import write_meta
from medqlora.evaluate import metrics
from medqlora.evaluate import decode_copy
from medqlora.evaluate.generation import GenerationSettings, generate_tokens

log = logging.getLogger(__name__)
IGNORE = -100
# Teacher-forced passes hold tokens x vocab float32 log-probabilities: 4,096 tokens x 128,256
# (Llama-3) x 4 bytes = 2.1 GB, plus the bf16 logits. Rows are batched up to this many tokens
# (the memory model's evaluate estimate counts the same).
NLL_TOKENS = EVAL_NLL_TOKENS
OPTION_LINE = re.compile(r"^([A-Z])\. ", re.MULTILINE)  # dataset.user_text: "B. <option>"
SCALARS = ("perplexity", "bleu", "rouge_l", "diagnostic_accuracy", "parse_failure_rate")
HELDOUT = "heldout"


# ---------------------------------------------------------------- inputs


def load_test(data_dir: str | Path, max_examples: int | None = None,
              split: str = "test") -> list[dict[str, Any]]:
    """Rows of a split (test, or the held-out set) sorted by id, the first `max_examples`
    of them (deterministic first N)."""
    import pandas as pd
    path = Path(data_dir) / f"{split}.parquet"
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
    """(peft model, tokenizer, adapter meta): the base rebuilt from the adapter's meta.json
    (modeling.load_shipped)."""
    from medqlora.core.modeling import load_shipped
    return load_shipped(adapter_dir)


# ---------------------------------------------------------------- scoring


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices grouped longest first: at most `max_rows` rows and `max_tokens` padded
    tokens a group (a row longer than `max_tokens` goes alone). E.g. lengths [5, 9, 7],
    max_rows 8, max_tokens 16 -> [[1], [2, 0]] (9 alone: 2 x 9 > 16; then 2 x 7 = 14)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and \
                (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def answer_nll(model, rows: Sequence[dict[str, Any]], batch_size: int,
               pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, answer-token count) per row, from teacher-forced logits.

    Logits at position t predict token t+1, so logits[:, :-1] are scored against
    labels[:, 1:]; prompt and padding positions carry -100 and are skipped. The NLL is the
    cross-entropy of the full distribution (log-softmax in float32), never of argmax ids.
    Rows go longest first in batches of at most `batch_size` rows and NLL_TOKENS tokens.
    With bfloat16 compute, padding a row into a batch moves its NLL by ~0.3% (other kernel
    shapes); base and adapter are batched identically, so their comparison is unaffected.
    """
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for batch_idx in token_batches([len(r["input_ids"]) for r in rows], batch_size, NLL_TOKENS):
        batch = [rows[i] for i in batch_idx]
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
        for i, s, c in zip(batch_idx, nll.sum(dim=1).tolist(),
                           (target != IGNORE).sum(dim=1).tolist()):
            out[i] = (float(s), int(c))
        del logits, nll
    return out


def is_option_item(row: dict[str, Any]) -> bool:
    """Scored by option likelihood: a multiple-choice item with its answer letter."""
    return row["kind"] == "mcq" and bool(row.get("label"))


def option_continuations(row: dict[str, Any]) -> dict[str, str]:
    """{letter: continuation text} of an mcq row, e.g. {"A": "Answer: A", "B": "Answer: B"}.

    The letters are the option lines prepare wrote into the prompt ("B. <option>", see
    dataset.user_text); the answer word is the reference's text before its letter
    ("Answer: B. ..." -> "Answer: ", "Réponse : B. ..." -> "Réponse : ").
    """
    letters = list(dict.fromkeys(OPTION_LINE.findall(row["prompt"])))
    label, reference = row["label"], row["reference"]
    head = reference.find(label)
    if label not in letters or head < 0:
        raise ValueError(f"test row {row['id']}: mcq answer {label!r} is not among the option "
                         f"lines {letters} of its prompt, or not in its reference; re-run "
                         "prepare")
    return {letter: reference[:head] + letter for letter in letters}


def score_options(model, tokenizer, rows: Sequence[dict[str, Any]], batch_size: int
                  ) -> list[dict[str, Any]]:
    """Per mcq row: each option's summed log-probability, the choice and its correctness."""
    candidates, owners = [], []
    for r, row in enumerate(rows):
        prompt = prompt_ids(row)
        for letter, text in option_continuations(row).items():
            cont = tokenizer(text, add_special_tokens=False)["input_ids"]
            candidates.append({"input_ids": prompt + cont, "labels": [IGNORE] * len(prompt) + cont})
            owners.append((r, letter))
    logliks: list[dict[str, float]] = [{} for _ in rows]
    for (r, letter), (nll, _) in zip(owners, answer_nll(model, candidates, batch_size,
                                                         tokenizer.pad_token_id)):
        logliks[r][letter] = round(-nll, 6)
    items = []
    for row, scores in zip(rows, logliks):
        choice = max(scores, key=scores.get)
        items.append({"bleu": None, "rouge_l": None, "method": "option_loglik",
                      "option_loglik": scores, "parsed": choice,
                      "correct": choice == row["label"]})
    return items


def score_outputs(rows: Sequence[dict[str, Any]], outputs: Sequence[str]
                  ) -> list[dict[str, Any]]:
    """Per-item scores of generated text: sentence BLEU, ROUGE-L F1, parsed answer."""
    items = []
    for row, text in zip(rows, outputs):
        item: dict[str, Any] = {"bleu": metrics.sentence_bleu(text, row["reference"]),
                                "rouge_l": metrics.rouge_l(text, row["reference"]),
                                "method": "generation", "parsed": None, "correct": None}
        if metrics.is_diagnostic(row["kind"], row["label"]):
            item["parsed"] = metrics.parse_answer(row["kind"], text)
            item["correct"] = item["parsed"] == row["label"]
        items.append(item)
    return items


def item_arrays(rows: Sequence[dict[str, Any]], outputs: Sequence[str | None],
                items: Sequence[dict[str, Any]], nll: Sequence[tuple[float, int]],
                stopped: Sequence[bool | None]) -> dict[str, np.ndarray]:
    """Per-item columns every metric is a function of, so a resample of items recomputes any
    metric by indexing: NLL sums and counts, BLEU statistics (generated items), ROUGE-L,
    correctness (diagnostic items), parse failures (parsed items), stops by eos."""
    n = len(rows)
    gen = np.array([it["method"] == "generation" for it in items])
    stats = np.zeros((n, 10), dtype=np.int64)
    if gen.any():
        idx = np.flatnonzero(gen)
        stats[idx] = metrics.bleu_statistics([outputs[i] for i in idx],
                                             [rows[i]["reference"] for i in idx])
    diag = np.array([it["correct"] is not None for it in items])
    return {"nll": np.array([s for s, _ in nll], dtype=float),
            "count": np.array([c for _, c in nll], dtype=float),
            "gen": gen, "bleu_stats": stats,
            "rouge": np.array([it["rouge_l"] if it["rouge_l"] is not None else 0.0
                               for it in items], dtype=float),
            "diag": diag, "correct": np.array([bool(it["correct"]) for it in items]),
            "parsed_item": diag & gen,
            "parse_failed": np.array([it["parsed"] is None for it in items]),
            "stopped": np.array([bool(s) for s in stopped])}


def metric_values(a: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, float | None]:
    """Every scalar metric over the items `idx` (with repeats: a bootstrap resample)."""
    gen, diag, parsed = a["gen"][idx], a["diag"][idx], a["parsed_item"][idx]
    count = a["count"][idx].sum()
    return {
        "perplexity": math.exp(a["nll"][idx].sum() / count) if count else None,
        "bleu": metrics.bleu_from_statistics(a["bleu_stats"][idx][gen]) if gen.any() else None,
        "rouge_l": float(a["rouge"][idx][gen].mean()) if gen.any() else None,
        "diagnostic_accuracy": float(a["correct"][idx][diag].mean()) if diag.any() else None,
        "parse_failure_rate": (float(a["parse_failed"][idx][parsed].mean())
                               if parsed.any() else None),
    }


def intervals(arrays: dict[str, dict[str, np.ndarray]], samples: int, seed: int,
              level: float = 0.95) -> tuple[dict[str, dict], dict[str, list[float] | None]]:
    """Percentile bootstrap intervals of each model's metrics and, when base and adapter were
    both scored, of adapter minus base, both from the same resampled items (paired): an
    interval of the difference that excludes 0 is a difference the items support. Seeded:
    the same intervals on every run."""
    n = len(next(iter(arrays.values()))["nll"])
    draws = metrics.resample_indices(n, samples, seed)
    values = {name: [metric_values(a, idx) for idx in draws] for name, a in arrays.items()}
    ci = functools.partial(metrics.percentile_interval, level=level)
    per_model = {name: {k: ci([v[k] for v in vals]) for k in SCALARS}
                 for name, vals in values.items()}
    paired = {}
    if {"base", "adapter"} <= set(values):
        paired = {k: ci([None if b[k] is None or a[k] is None else a[k] - b[k]
                         for b, a in zip(values["base"], values["adapter"])]) for k in SCALARS}
    return per_model, paired


def summarise(a: dict[str, np.ndarray], cis: dict[str, list[float] | None]) -> dict[str, Any]:
    """One model's metrics block of metrics/evaluate.json: each metric with its `_ci95`, and
    the share of generated answers that stopped by eos.

    BLEU and ROUGE-L cover the generated items; diagnostic accuracy covers mcq (option
    likelihood) and lab (parsed) items; the parse failure rate covers the parsed ones.
    """
    summary: dict[str, Any] = {}
    for key, value in metric_values(a, np.arange(len(a["nll"]))).items():
        summary[key] = value
        summary[f"{key}_ci95"] = cis[key] if value is not None else None
    gen = a["gen"]
    summary["stopped_by_eos"] = float(a["stopped"][gen].mean()) if gen.any() else None
    return summary


def run_model(model, tokenizer, rows, settings: GenerationSettings
              ) -> tuple[dict[str, np.ndarray], list[str | None], list[dict[str, Any]]]:
    """(per-item arrays, outputs, per-item scores) of whatever `model` currently computes.

    An mcq item's output is the continuation it chose ("Answer: B"); the others' is the text
    generated. A generated answer shorter than max_new_tokens stopped by eos (generation
    cuts each row at its first eos or end-of-turn token).
    """
    clock = time.perf_counter()
    nll = answer_nll(model, rows, settings.batch_size, tokenizer.pad_token_id)
    seconds = {"nll": time.perf_counter() - clock}
    options = [i for i, r in enumerate(rows) if is_option_item(r)]
    generate = [i for i, r in enumerate(rows) if not is_option_item(r)]
    outputs: list[str | None] = [None] * len(rows)
    items: list[dict[str, Any]] = [{}] * len(rows)
    clock = time.perf_counter()
    for i, item in zip(options, score_options(model, tokenizer, [rows[i] for i in options],
                                              settings.batch_size)):
        outputs[i] = option_continuations(rows[i])[item["parsed"]]
        items[i] = item
    seconds["options"] = time.perf_counter() - clock
    clock = time.perf_counter()
    new = generate_tokens(model, tokenizer, [prompt_ids(rows[i]) for i in generate],
                          settings) if generate else []
    seconds["generation"] = time.perf_counter() - clock
    texts = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
    stopped: list[bool | None] = [None] * len(rows)
    for i, text, item, tokens in zip(generate, texts,
                                     score_outputs([rows[i] for i in generate], texts), new):
        outputs[i], items[i] = text, item
        stopped[i] = len(tokens) < settings.max_new_tokens
    # Timings go to the log only: metrics files stay a function of the inputs.
    log.info("timing: answer NLL %.1f s (%d rows); options %.1f s (%d mcq); generation %.1f s "
             "(%d prompts, %d new tokens, %.0f tokens/s)", seconds["nll"], len(rows),
             seconds["options"], len(options), seconds["generation"], len(generate),
             sum(map(len, new)), sum(map(len, new)) / max(seconds["generation"], 1e-9))
    for item, (s, c) in zip(items, nll):
        item["perplexity"] = math.exp(s / c) if c else None
    return item_arrays(rows, outputs, items, nll, stopped), outputs, items


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


def score_set(model, tokenizer, rows, settings: GenerationSettings, compare_base: bool,
              samples: int, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics block, prediction rows) of one set: base (adapter switched off) and adapter."""
    arrays: dict[str, Any] = {}
    outputs: dict[str, Any] = {"base": None}
    items: dict[str, Any] = {"base": None}
    runs = (("base", model.disable_adapter), ) if compare_base else ()
    for model_name, context in (*runs, ("adapter", contextlib.nullcontext)):
        with context():
            arrays[model_name], outputs[model_name], items[model_name] = run_model(
                model, tokenizer, rows, settings)
    cis, paired = intervals(arrays, samples, settings.seed)
    summaries = {m: summarise(a, cis[m]) for m, a in arrays.items()}
    for model_name, s in summaries.items():
        log.info("%s, %s: perplexity %.3f, BLEU %s, ROUGE-L %s, diagnostic accuracy %s, "
                 "stopped by eos %s", name, model_name, s["perplexity"], s["bleu"],
                 s["rouge_l"], s["diagnostic_accuracy"], s["stopped_by_eos"])
    block = {
        "n": len(rows),
        "n_diagnostic": sum(metrics.is_diagnostic(r["kind"], r["label"]) for r in rows),
        "n_option_scored": sum(is_option_item(r) for r in rows),
        "n_generated": sum(not is_option_item(r) for r in rows),
        "n_answer_tokens": sum(sum(t != IGNORE for t in r["labels"]) for r in rows),
        "base": summaries.get("base"),
        "adapter": summaries["adapter"],
        "delta": delta(summaries["base"], summaries["adapter"]) if compare_base else None,
        "delta_ci95": paired or None,
    }
    return block, prediction_rows(rows, outputs, items)


def evaluate(params: Params, data_dir: str | Path, adapter_dir: str | Path,
             predictions_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Score base and base + adapter on the test split (and the held-out set when prepare
    wrote one); write predictions/ and the metrics JSON; return it."""
    cfg = params.evaluate
    settings = GenerationSettings.from_params(cfg, params.seed)
    sets = {"test": load_test(data_dir, cfg.max_examples)}
    if (Path(data_dir) / f"{HELDOUT}.parquet").is_file():
        sets[HELDOUT] = load_test(data_dir, cfg.max_examples, HELDOUT)
    model, tokenizer, meta = load_models(adapter_dir)
    agreement_rows = sets["test"][:params.merge.parity_prompts]
    decoding = decode_copy.prepare(model, [r["input_ids"] for r in agreement_rows],
                                   params.merge.max_effect_lost, params.merge.min_top1_agreement)
    blocks, predictions = {}, {}
    for name, rows in sets.items():
        blocks[name], predictions[name] = score_set(model, tokenizer, rows, settings,
                                                    cfg.compare_base, cfg.bootstrap_samples,
                                                    name)
    result = {**blocks["test"], **({HELDOUT: blocks[HELDOUT]} if HELDOUT in blocks else {}),
              "generation": settings.as_dict(), "decoding": decoding}
    with atomic_dir(predictions_dir) as tmp:
        for name, recs in predictions.items():
            file = "predictions.jsonl" if name == "test" else f"{name}_predictions.jsonl"
            with open(tmp / file, "w", encoding="utf-8") as handle:
                for rec in recs:
                    handle.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        write_meta(tmp, stage="evaluate", params=params.section("seed", "evaluate"),
                   inputs={name: Path(data_dir) / f"{name}.parquet" for name in sets}
                   | {"adapter": adapter_dir},
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
