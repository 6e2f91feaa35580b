"""Merge the adapter into the weights it was trained against, and prove parity.

    python stages/merge.py --params params.yaml --data data/prepared --adapter models/adapter \
        --out models/merged --metrics metrics/merge.json

Why "dequantized" by default: QLoRA trains the LoRA update B·A against the base's NF4 weights
Q(W), not against W. Merging into the original high-precision W gives W + s·B·A, which differs
from what was trained and scored (Q(W) + s·B·A) by the whole quantization error W - Q(W) on every
layer: the known QLoRA merge shift. Merging into dequant(Q(W)) in the compute dtype keeps the
model evaluate scored, up to one bf16 rounding of the merged weight.

The parity gate runs the held-out test prompts through both the reference (4-bit base + adapter,
exactly as evaluate loaded it) and the merged model, and compares their logits at every prompt
position. metrics/merge.json is written whether or not the gate passes; the merged folder is
published only when it passes.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from medqlora import modeling
from medqlora.config import MergeParams, Params
from medqlora.outputs import atomic_dir, write_json
from medqlora.provenance import read_meta, write_meta

log = logging.getLogger(__name__)
# Merging into both weight sets costs a second full-precision load; below this size it is
# seconds, so the "other" merge is measured too, to show the QLoRA pitfall numerically.
CHEAP_PARAMETERS = 1_000_000_000


# ---------------------------------------------------------------- prompts and logits

def parity_prompts(data_dir: str | Path, count: int) -> list[str]:
    """The first `count` held-out test prompts (already templated by prepare)."""
    import pyarrow.parquet as pq
    path = Path(data_dir) / "test.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    if not prompts:
        raise ValueError(f"{path} has no rows: merge.parity_prompts needs a non-empty test split "
                         "(raise data.test_fraction)")
    return prompts[:count]


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 CPU logits [positions, vocab] of each prompt, one prompt at a time (no padding)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return out


def top1_agree(ref: torch.Tensor, oth: torch.Tensor) -> torch.Tensor:
    """Per position: do both models pick the same next token?

    Exact ties count as agreement: bf16 logits of magnitude 8-16 are spaced 0.0625 apart, so
    two tokens often share the top value and argmax picks between them by index, not by the
    model. A position agrees when either model's pick is tied for the top in the other's
    logits, i.e. one of them cannot tell the two tokens apart. Any non-zero gap in both models
    is a real disagreement.
    """
    ref_pick, oth_pick = ref.argmax(-1, keepdim=True), oth.argmax(-1, keepdim=True)
    ref_top = ref.gather(-1, oth_pick) == ref.max(-1, keepdim=True).values
    oth_top = oth.gather(-1, ref_pick) == oth.max(-1, keepdim=True).values
    return (ref_top | oth_top).squeeze(-1)


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, Any]:
    """Max and mean |logit difference| and top-1 agreement over every position of every prompt."""
    ref, oth = torch.cat(reference), torch.cat(other)
    diff = (ref - oth).abs()
    return {
        "n_positions": int(ref.shape[0]),
        "max_abs_logit_diff": round(float(diff.max()), 6),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
        "top1_agreement": round(float(top1_agree(ref, oth).float().mean()), 6),
    }


def passes(stats: dict[str, Any], merge: MergeParams) -> bool:
    """The gate: largest difference within tolerance and top-1 agreement high enough."""
    return (stats["max_abs_logit_diff"] <= merge.max_abs_logit_diff
            and stats["top1_agreement"] >= merge.min_top1_agreement)


# ---------------------------------------------------------------- models

def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """{module name: weight} of every bitsandbytes 4-bit Linear, dequantized, on CPU.

    peft's helper calls bitsandbytes.functional.dequantize_4bit with the module's quant state
    (absmax, double-quant constants); the result is in the compute dtype, as the 4-bit forward
    pass sees it.
    """
    from peft.utils.integrations import dequantize_module_weight
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = dequantize_module_weight(module)
            out[name] = weight.detach().to("cpu", copy=True)
    if not out:
        raise ValueError("the base loaded without any 4-bit Linear layer: merge.into dequantized "
                         "needs an adapter trained with quantization.load_in_4bit: true "
                         "(use merge.into: original for a plain LoRA adapter)")
    return out


def plain_base(settings, weights: dict[str, torch.Tensor] | None = None):
    """The base in the compute dtype, not quantized; `weights` overwrite its Linear weights."""
    model_params, quant, precision = settings
    model = modeling.load_base(model_params, dataclasses.replace(quant, load_in_4bit=False),
                               precision)
    modules = dict(model.named_modules())
    for name, weight in (weights or {}).items():
        target = modules[name].weight
        with torch.no_grad():
            target.copy_(weight.to(target.dtype))
    return model


def merged_model(settings, adapter_dir: Path, weights: dict[str, torch.Tensor] | None):
    """Plain base (+ dequantized weights) with the adapter merged in: a plain transformers model."""
    model = modeling.load_adapter(plain_base(settings, weights), adapter_dir)
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def parameter_count(model) -> int:
    """Parameters of a model as stored (4-bit weights counted as 2 per uint8)."""
    return modeling.trainable_parameters(model)[1]


def _free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the stage

def reference_pass(settings, adapter_dir: Path, prompts: list[str]):
    """Load the model evaluate scored; return (tokenizer, reference logits, dequantized weights,
    parameter count, adapter effect = base vs base + adapter logit statistics)."""
    tokenizer = modeling.saved_tokenizer(adapter_dir, settings[0])  # as evaluate loads it
    base = modeling.load_base(*settings)
    weights = dequantized_weights(base) if settings[1].load_in_4bit else {}
    size = parameter_count(base)
    base_logits = prompt_logits(base, tokenizer, prompts)
    model = modeling.load_adapter(base, adapter_dir)
    reference = prompt_logits(model, tokenizer, prompts)
    # How far the adapter moves the base: the scale the parity differences are read against.
    effect = compare_logits(reference, base_logits)
    _free(model, base)
    return tokenizer, reference, weights, size, effect


def measure(settings, adapter_dir, weights, tokenizer, prompts, reference, merge):
    """Merge into `weights` (None: the original ones); (model, parity stats)."""
    model = merged_model(settings, adapter_dir, weights)
    stats = compare_logits(reference, prompt_logits(model, tokenizer, prompts))
    stats["passed"] = passes(stats, merge)
    return model, stats


def requantized_parity(out_dir: Path, settings, tokenizer, prompts, reference) -> dict:
    """Reload the saved merged model in 4-bit (the serving option) and measure it (informational)."""
    from transformers import AutoModelForCausalLM
    _, quant, precision = settings
    model = AutoModelForCausalLM.from_pretrained(
        str(out_dir), quantization_config=modeling.bnb_config(
            dataclasses.replace(quant, load_in_4bit=True), precision.compute_dtype),
        dtype=precision.compute_dtype,
        device_map=modeling.device_map(precision))
    stats = compare_logits(reference, prompt_logits(model, tokenizer, prompts))
    _free(model)
    return stats


def skip(out_dir: Path, metrics_path: Path, params: Params, adapter_dir: Path) -> int:
    """merge.enabled false: an empty merged folder whose meta.json says so, and null parity."""
    with atomic_dir(out_dir) as tmp:
        write_meta(tmp, stage="merge", params=params.section("seed", "merge"),
                   inputs={"adapter": adapter_dir}, extra={"skipped": True})
    write_json(metrics_path, {"enabled": False, "passed": None})
    log.info("merge.enabled is false: adapter-only deployment, nothing merged")
    return 0


def run_merge(params: Params, data_dir: str | Path, adapter_dir: str | Path,
              out_dir: str | Path, metrics_path: str | Path) -> int:
    """The merge stage: merge, measure parity, publish only when it passes. Returns exit code."""
    merge, adapter_dir, out_dir = params.merge, Path(adapter_dir), Path(out_dir)
    metrics_path = Path(metrics_path)
    if not merge.enabled:
        return skip(out_dir, metrics_path, params, adapter_dir)
    torch.manual_seed(params.seed)
    adapter_meta = read_meta(adapter_dir)
    settings = modeling.settings_from_meta(adapter_meta)
    if merge.into == "dequantized" and not settings[1].load_in_4bit:
        raise ValueError(f"merge.into: dequantized needs an adapter trained on a 4-bit base, but "
                         f"{adapter_dir}/meta.json records quantization.load_in_4bit: false; "
                         "use merge.into: original for a plain LoRA adapter")
    prompts = parity_prompts(data_dir, merge.parity_prompts)
    tokenizer, reference, deq, size, effect = reference_pass(settings, adapter_dir, prompts)
    chosen = deq if merge.into == "dequantized" else None

    alternative = None
    if size <= CHEAP_PARAMETERS and deq:
        other = None if merge.into == "dequantized" else deq
        model, alternative = measure(settings, adapter_dir, other, tokenizer, prompts,
                                     reference, merge)
        alternative = {"into": "original" if other is None else "dequantized", **alternative}
        _free(model)

    model, stats = measure(settings, adapter_dir, chosen, tokenizer, prompts, reference, merge)
    metrics = {
        "enabled": True, "into": merge.into, "n_prompts": len(prompts),
        "dtype": str(settings[2].compute_dtype).removeprefix("torch."),
        **{k: v for k, v in stats.items() if k != "passed"},
        "tolerance": {"max_abs_logit_diff": merge.max_abs_logit_diff,
                      "min_top1_agreement": merge.min_top1_agreement},
        "passed": stats["passed"],
    }
    metrics["adapter_effect"] = effect
    if alternative:
        metrics["alternative"] = alternative
    if not stats["passed"]:
        write_json(metrics_path, metrics)
        log.error("merge parity FAILED (into=%s): max |diff| %.4f (tolerance %s), top-1 agreement "
                  "%.4f (minimum %s); %s was not written. Check merge.into, or the tolerances "
                  "merge.max_abs_logit_diff / merge.min_top1_agreement.", merge.into,
                  stats["max_abs_logit_diff"], merge.max_abs_logit_diff,
                  stats["top1_agreement"], merge.min_top1_agreement, out_dir)
        return 1
    with atomic_dir(out_dir) as tmp:
        save_merged(model, tokenizer, tmp, params, adapter_dir, adapter_meta, metrics)
        if merge.requantize:
            metrics["requantized"] = requantized_parity(tmp, settings, tokenizer, prompts,
                                                        reference)
    write_json(metrics_path, metrics)
    log.info("merge parity passed (into=%s): max |diff| %.4f, mean %.5f, top-1 %.4f",
             merge.into, metrics["max_abs_logit_diff"], metrics["mean_abs_logit_diff"],
             metrics["top1_agreement"])
    return 0


def save_merged(model, tokenizer, out: Path, params: Params, adapter_dir: Path,
                adapter_meta: dict, metrics: dict) -> None:
    """Safetensors (sharded per merge.max_shard_size), tokenizer and meta.json."""
    model.config.use_cache = True  # training turned the cache off; serving wants it
    model.save_pretrained(str(out), max_shard_size=params.merge.max_shard_size)
    tokenizer.save_pretrained(str(out))
    write_meta(out, stage="merge", params=params.section("seed", "merge"),
               inputs={"adapter": adapter_dir},
               extra={"into": metrics["into"], "dtype": metrics["dtype"],
                      "base": adapter_meta.get("base"),
                      "precision": adapter_meta.get("precision"),
                      "parity": {k: metrics[k] for k in ("max_abs_logit_diff",
                                                         "mean_abs_logit_diff",
                                                         "top1_agreement", "passed")}})
