"""The package's model card (README.md) and its two charts.

    card = Card(name=..., base=..., adapter_meta=..., metrics={...}, ...)
    text = render(card)
    images = write_charts(out / "images", Path("dvclive/train"), metrics["evaluate"])

Charts are drawn with matplotlib's Agg backend (no display) and saved without a date or
software stamp, so the same inputs give the same PNG bytes.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Metrics of metrics/evaluate.json shown in the card and chart: (key, label, higher is better).
EVAL_METRICS = (("perplexity", "Perplexity", False), ("bleu", "BLEU", True),
                ("rouge_l", "ROUGE-L", True), ("diagnostic_accuracy", "Diagnostic accuracy", True))
PNG_METADATA = {"Software": None}


@dataclass
class Card:
    """Everything the card states; gathered by packaging.build_package."""
    name: str
    license: str
    base: str
    adapter_meta: dict[str, Any]
    metrics: dict[str, dict | None]
    generation: dict[str, Any]
    images: list[str] = field(default_factory=list)
    merged: dict[str, Any] = field(default_factory=lambda: {"included": False, "reason": None})
    data_meta: dict | None = None


# ---------------------------------------------------------------- charts

def loss_series(plots_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{"train/loss": (steps, values), ...} from dvclive's TSV files whose name has "loss"."""
    series = {}
    root = plots_dir / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        if "loss" not in path.stem:
            continue
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows and "step" in rows[0] and path.stem in rows[0]:
            series[path.relative_to(root).with_suffix("").as_posix()] = (
                [float(r["step"]) for r in rows], [float(r[path.stem]) for r in rows])
    return series


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede the pyplot import
    from matplotlib import pyplot as plt
    return plt


def loss_chart(path: Path, series: dict) -> bool:
    """Loss against optimizer step, one line per dvclive loss series."""
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (steps, values) in series.items():
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="loss", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    plt.close(fig)
    return True


def comparison_chart(path: Path, evaluate: dict | None) -> bool:
    """Base vs adapter bars for each metric both have, with the 95% CI as error bars."""
    if not evaluate or not evaluate.get("base") or not evaluate.get("adapter"):
        return False
    shown = [(k, label) for k, label, _ in EVAL_METRICS
             if evaluate["base"].get(k) is not None and evaluate["adapter"].get(k) is not None]
    if not shown:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 3.2), dpi=100,
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], shown):
        values = [evaluate[m][key] for m in ("base", "adapter")]
        errors = [[0, 0], [0, 0]]
        for i, model in enumerate(("base", "adapter")):
            ci = evaluate[model].get(f"{key}_ci95")
            if ci:
                errors[0][i], errors[1][i] = values[i] - ci[0], ci[1] - values[i]
        ax.bar(["base", "adapter"], values, yerr=errors, capsize=4,
               color=["#9e9e9e", "#1f77b4"])
        ax.set_title(label, fontsize=9)
    fig.suptitle("Base vs base + adapter (test split, 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    plt.close(fig)
    return True


def write_charts(out: Path, plots_dir: Path, evaluate: dict | None) -> list[str]:
    """Draw what the inputs allow; return the image paths relative to the package root."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if loss_chart(out / "loss_curve.png", loss_series(plots_dir)):
        made.append(f"{out.name}/loss_curve.png")
    if comparison_chart(out / "base_vs_adapter.png", evaluate):
        made.append(f"{out.name}/base_vs_adapter.png")
    if not made:
        out.rmdir()
    return made


# ---------------------------------------------------------------- text

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value)


def _with_ci(block: dict, key: str) -> str:
    value, ci = block.get(key), block.get(f"{key}_ci95")
    if value is None:
        return "n/a"
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(value)


def _scalars(block: dict | None, prefix: str = "") -> list[tuple[str, Any]]:
    """Flattened (key, value) pairs of the numbers and strings in a metrics block."""
    out = []
    for key, value in sorted((block or {}).items()):
        if isinstance(value, dict):
            out.extend(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out.append((f"{prefix}{key}", value))
    return out


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("key", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines) if rows else "_not recorded_"


def _evaluation(evaluate: dict | None) -> str:
    if not evaluate or not evaluate.get("adapter"):
        return "_No evaluation recorded (metrics/evaluate.json missing)._"
    base = evaluate.get("base") or {}
    lines = [f"Test split, {evaluate.get('n', 'n/a')} examples "
             f"({evaluate.get('n_diagnostic', 'n/a')} with a diagnostic label). "
             "Brackets: 95% bootstrap confidence interval.", "",
             "| metric | base | base + adapter |", "|---|---|---|"]
    for key, label, better in EVAL_METRICS:
        arrow = "higher is better" if better else "lower is better"
        lines.append(f"| {label} ({arrow}) | {_with_ci(base, key)} | "
                     f"{_with_ci(evaluate['adapter'], key)} |")
    return "\n".join(lines)


def _pm(block: dict | None, metric: str) -> str:
    """"0.55 ± 0.014" from a harness score block; n/a when the metric is absent."""
    if not block or block.get(metric) is None:
        return "n/a"
    err = block.get(f"{metric}_stderr")
    return f"{block[metric]:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def _benchmarks(bench: dict | None) -> str:
    """The standard-benchmark table and the protocol it was measured under."""
    tasks = (bench or {}).get("tasks") or {}
    if not tasks:
        return ("_No standard benchmark was run (`evaluate.benchmarks` is empty). README "
                "\"Standard benchmarks\" says how to add MedQA, MedMCQA, PubMedQA and MMLU._")
    lines = [f"lm-evaluation-harness {bench.get('lm_eval_version')}: the harness's own task "
             "definitions, prompts and metrics, on local copies of the public files. Each "
             "answer choice (the letter for MedQA, MedMCQA and MMLU; yes/no/maybe for "
             "PubMedQA) is scored by its log-likelihood after the prompt; `acc` takes the most "
             "likely choice, `acc_norm` divides each log-likelihood by the choice's length in "
             "characters first. "
             "Base: the same 4-bit base with the adapter switched off. ± is the harness's "
             "standard error.", "",
             "| task | n | shots | metric | base | base + adapter | delta |",
             "|---|---|---|---|---|---|---|"]
    for name, task in sorted(tasks.items()):
        shown = [m for m in ("acc", "acc_norm") if (task.get("adapter") or {}).get(m) is not None]
        for i, metric in enumerate(shown):
            delta = (task.get("delta") or {}).get(metric)
            head = f"| {name} | {task['n']} | {task['num_fewshot']} |" if i == 0 else "| | | |"
            lines.append(f"{head} {metric} | {_pm(task.get('base'), metric)} | "
                         f"{_pm(task['adapter'], metric)} | "
                         f"{'n/a' if delta is None else f'{delta:+.3f}'} |")
    lines += ["", "Protocol per task: harness task version (`Yaml`: the task file carries no "
                  "version number, the lm-evaluation-harness release pins it), scored file and "
                  "its sha256, few-shot file, and the prompt with placeholders:"]
    for name, task in sorted(tasks.items()):
        shots = (f"; {task['num_fewshot']}-shot from `{task.get('fewshot_file')}`"
                 if task.get("num_fewshot") else "; zero-shot")
        lines += ["", f"- `{name}` version {task.get('version')}, `{task.get('file')}` "
                      f"({task.get('items_in_file')} items, sha256 "
                      f"`{str(task.get('sha256'))[:16]}…`){shots}:", "",
                  "  ```text", *[f"  {line}" for line in task.get("prompt_lines") or []],
                  "  ```"]
    return "\n".join(lines)


def _parity(merge: dict | None) -> str:
    if not merge:
        return "_No merge recorded._"
    if merge.get("enabled") is False:
        return "Merging was disabled (`merge.enabled: false`): deploy the adapter on the 4-bit base."
    if merge.get("passed") is None and merge.get("reason"):
        return f"Not merged: {merge['reason']}. Deploy the adapter on the 4-bit base."
    floor, effect = merge.get("noise_floor") or {}, merge.get("adapter_effect") or {}
    text = (f"Merged in float32 into the **{merge.get('into')}** base weights, stored in "
            f"{merge.get('dtype')}. On {merge.get('n_prompts')} held-out test prompts "
            f"({merge.get('n_positions')} positions), mean / max |logit difference|:\n\n"
            "| comparison | mean | max | top-1 agreement |\n|---|---|---|---|\n"
            f"| adapter effect (4-bit base vs base + adapter) | "
            f"{_fmt(effect.get('mean_abs_logit_diff'))} | {_fmt(effect.get('max_abs_logit_diff'))}"
            f" | {_fmt(effect.get('top1_agreement'))} |\n"
            f"| noise floor (4-bit base vs its weights stored unquantized) | "
            f"{_fmt(floor.get('mean_abs_logit_diff'))} | {_fmt(floor.get('max_abs_logit_diff'))}"
            f" | {_fmt(floor.get('top1_agreement'))} |\n"
            f"| merged model vs 4-bit base + adapter | {_fmt(merge.get('mean_abs_logit_diff'))} | "
            f"{_fmt(merge.get('max_abs_logit_diff'))} | {_fmt(merge.get('top1_agreement'))} |\n\n"
            f"The merged model keeps {_fmt(merge.get('effect_kept'))} of the adapter's mean effect. "
            + "Gate: " + "; ".join(
                f"{key} {_fmt(check['value'])} (limit {_fmt(check['limit'])})"
                for key, check in (merge.get("gate") or {}).items())
            + f": **{'passed' if merge.get('passed') else 'FAILED'}**.")
    if merge.get("passed") is False:
        text += (" The merged weights were therefore **not** shipped: deploy the adapter on the "
                 "4-bit base (below), which is exactly the model evaluated.")
    alt = merge.get("alternative")
    if alt:
        text += (f"\n\nFor comparison, merging into the **{alt['into']}** weights instead gives max "
                 f"|diff| {_fmt(alt['max_abs_logit_diff'])}, mean {_fmt(alt['mean_abs_logit_diff'])}, "
                 f"top-1 agreement {_fmt(alt['top1_agreement'])}: the adapter was trained against "
                 "the NF4-dequantized weights, so merging into the original ones shifts behaviour.")
    if merge.get("requantized"):
        req = merge["requantized"]
        text += (f"\n\nRe-quantized to 4-bit for serving (informational): max |diff| "
                 f"{_fmt(req['max_abs_logit_diff'])}, top-1 agreement {_fmt(req['top1_agreement'])}.")
    return text


LOADING = """```python
# Run from the project root (or a folder holding the base at `base_model_name_or_path`).
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

package = "{package}"
config = PeftConfig.from_pretrained(package)
model = AutoModelForCausalLM.from_pretrained(
    config.base_model_name_or_path,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="{quant_type}",
        bnb_4bit_use_double_quant={double_quant}, bnb_4bit_compute_dtype=torch.{compute}),
)
model = PeftModel.from_pretrained(model, package)
tokenizer = AutoTokenizer.from_pretrained(package)
prompt = "### Instruction:\\nWhat is the first-line treatment of hypertension?\\n\\n### Response:\\n"
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, generation_config=GenerationConfig.from_pretrained(package))
print(tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
```"""


def _front_matter(card: Card) -> str:
    tags = ["medical", "qlora", "lora", "peft", "medqlora"]
    lines = ["---", f"license: {card.license}", f"base_model: {card.base}", "library_name: peft",
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---"]
    return "\n".join(lines)


def _loading(card: Card) -> str:
    quant = card.adapter_meta.get("params", {}).get("quantization", {})
    compute = (card.adapter_meta.get("precision") or {}).get(
        "compute_dtype", quant.get("bnb_4bit_compute_dtype", "bfloat16"))
    return LOADING.format(package="artifacts/package",
                          quant_type=quant.get("bnb_4bit_quant_type", "nf4"),
                          double_quant=bool(quant.get("bnb_4bit_use_double_quant", True)),
                          compute=compute)


def _contamination(prepare: dict | None) -> str:
    """One sentence on held-out items overlapping train (prepare's content-only 8-grams)."""
    report = (prepare or {}).get("contamination")
    if not report or not report.get("test"):
        return "_Held-out overlap with train: not measured._"
    test = report["test"]
    return (f"**Held-out overlap with train** (word {report['ngram']}-grams of the records' "
            f"content, template text excluded): {test['items_with_overlap']} of {test['items']} "
            f"test items share at least one with train; {test['over_threshold']} share more "
            f"than {report['threshold']:.0%} of theirs (mean overlap {test['mean_overlap']:.2f}, "
            f"max {test['max_overlap']:.2f}). Test scores on overlapping items measure recall "
            "of seen text, not generalisation.")


def _data(card: Card) -> str:
    source = card.metrics.get("prepare") or card.data_meta
    rows = [(k, v) for k, v in _scalars(source) if not isinstance(v, str) or len(v) < 80]
    return _contamination(card.metrics.get("prepare")) + "\n\n" + _table(rows[:40])


def _params(card: Card) -> str:
    params = card.adapter_meta.get("params", {})
    rows = _scalars({k: params.get(k) for k in ("seed", "model", "quantization", "lora", "train")})
    return _table([(k, json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in rows])


def render(card: Card) -> str:
    """The model card's Markdown (Hugging Face front matter on top)."""
    base_rev = (card.adapter_meta.get("base") or {}).get("revision")
    images = "\n\n".join(f"![{Path(i).stem.replace('_', ' ')}]({i})" for i in card.images)
    merged = ("`merged/` holds the adapter merged into the base (plain transformers weights, "
              "no peft needed)." if card.merged["included"] else
              f"No merged weights are included ({card.merged['reason']}).")
    sections = [
        _front_matter(card),
        f"# {card.name}",
        f"A LoRA adapter trained with QLoRA (4-bit NF4 base) on medical instruction data, for "
        f"the base model `{card.base}`" + (f" at revision `{base_rev}`." if base_rev else ".")
        + f" Built by medqlora. {merged}",
        "## Intended use\n\nResearch and education: drafting answers to medical-knowledge "
        "questions, summarising lab-value patterns, and multiple-choice practice, always read by "
        "a qualified person. A starting point for further evaluation in a specific setting.",
        "## Out of scope\n\n- **Not a medical device.** Not cleared or approved for clinical "
        "use by any regulator.\n- **No diagnosis, triage or treatment decision without clinician "
        "review.** Outputs can be wrong, outdated or confidently fabricated.\n- Patient-facing "
        "advice, emergencies, dosing for individual patients.\n- Any use on identifiable "
        "patient data without the governance that use requires.",
        "## Training data\n\n" + _data(card),
        "## Training parameters\n\n" + _params(card),
        "## Training results\n\n" + _table(_scalars(card.metrics.get("train"))),
        "## Evaluation\n\n" + _evaluation(card.metrics.get("evaluate")),
        "## Standard benchmarks\n\n" + _benchmarks(card.metrics.get("benchmark")),
        "## Merge parity\n\n" + _parity(card.metrics.get("merge")),
        "## Charts\n\n" + (images or "_No charts: training or evaluation history missing._"),
        "## Generation settings\n\n`generation_config.json`: " + ", ".join(
            f"{k}={_fmt(v)}" for k, v in sorted(card.generation.items())),
        "## Limitations\n\n- Scores come from a small held-out split of the training "
        "distribution; they say little about real clinical text.\n- The base model's biases "
        "and knowledge cut-off carry over; the adapter adds no retrieval or citation.\n"
        "- Multilingual coverage is only what the training data held.\n- 4-bit quantization "
        "and merging change outputs slightly; the parity figures above bound that on the "
        "test prompts only.",
        "## How to load\n\nWith transformers and peft only:\n\n" + _loading(card)
        + "\n\nOr `medqlora generate --package artifacts/package --prompt \"...\"`.",
        "## Integrity\n\n`manifest.json` lists the sha256 and size of every file and the "
        "lineage (dvc.lock hashes, base, library versions). Check a copy with "
        "`medqlora verify <folder>`.",
    ]
    return "\n\n".join(sections) + "\n"
