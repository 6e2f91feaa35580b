"""Merge the adapter into the weights it was trained against, and prove parity.

    python stages/merge.py --params params.yaml --data data/prepared --adapter models/adapter \
        --out models/merged --metrics metrics/merge.json

Why "dequantized" by default: QLoRA trains the LoRA update B·A against the base's NF4 weights
Q(W), not against W. Merging into the original high-precision W gives W + s·B·A, which differs
from what was trained and scored (Q(W) + s·B·A) by the whole quantization error W - Q(W) on every
layer: the known QLoRA merge shift. Merging into dequant(Q(W)) keeps the model evaluate scored.

Why float32 arithmetic (then `merge.dtype` storage): at 7B the update s·B·A is mostly smaller
than one bf16 step of W (~0.4% of |W|), so a merge rounded to bf16 throws most of it away
(measured on a Mistral-7B-shaped run: merged-vs-reference mean |logit diff| 0.134 against an
adapter effect of 0.172). The sum is taken in float32 and rounded once to the stored dtype.

The parity gate runs the held-out test prompts through the reference (4-bit base + adapter,
exactly as evaluate loaded it), the base alone, the base's weights stored unquantized (the
noise floor) and the merged model, and reads the merged model's difference against the floor
and the adapter's own effect (`gate`). metrics/merge.json is written either way; when the gate
fails, models/merged holds only a meta.json saying why, and the package ships the adapter.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medqlora.core import modeling
from medqlora.core.config import MergeParams, Params
from medqlora.core.outputs import atomic_dir, write_json
from medqlora.core.provenance import read_meta, write_meta
from medqlora.evaluate.parity import compare_logits, sequence_logits

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


def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 CPU logits [positions, vocab] of each prompt, one prompt at a time (no padding)."""
    return sequence_logits(model, [tokenizer(prompt).input_ids for prompt in prompts])


def worse(*stats: dict[str, Any]) -> dict[str, Any]:
    """The larger differences and the lower agreement of several comparisons."""
    return {"mean_abs_logit_diff": max(s["mean_abs_logit_diff"] for s in stats),
            "max_abs_logit_diff": max(s["max_abs_logit_diff"] for s in stats),
            "top1_agreement": min(s["top1_agreement"] for s in stats)}


def gate(stats: dict[str, Any], floor: dict[str, Any], effect: dict[str, Any],
         merge: MergeParams) -> dict[str, Any]:
    """The parity gate, each criterion read against the floor and the adapter's effect.

    The floor is what no merge can remove: the noise floor (4-bit base vs its dequantized
    weights unquantized, no adapter) and, for a merge into the dequantized weights, the
    worse of that and the unmerged float32 model (same weights + adapter, unmerged) vs the
    reference: bf16 compute and kernels.

    - merge_error: the merged model vs the same weights + adapter unmerged in float32 (the
      merge's own error, no compute-dtype noise), mean |logit diff| at most
      merge.max_effect_lost x the adapter's mean effect. Measured at 7B with an effect of
      0.153: float32 storage 1.2e-5 (passes), float16 0.0165 (fails a 0.0153 limit).
    - mean: the merged model's mean |logit diff| to base + adapter may exceed the floor's
      mean by at most the same fraction of the effect. E.g. effect 0.172, floor 0.008,
      max_effect_lost 0.1: limit 0.0252; a bf16 merge measured at 0.134 fails.
    - max: the largest difference may exceed the floor's largest by merge.max_abs_logit_diff.
    - top1: agreement at least merge.min_top1_agreement, or the floor's own agreement when
      that is lower (the stored representation alone flips those positions).
    """
    limits = {
        "merge_error": merge.max_effect_lost * effect["mean_abs_logit_diff"],
        "mean_abs_logit_diff": floor["mean_abs_logit_diff"]
        + merge.max_effect_lost * effect["mean_abs_logit_diff"],
        "max_abs_logit_diff": floor["max_abs_logit_diff"] + merge.max_abs_logit_diff,
        "top1_agreement": min(merge.min_top1_agreement, floor["top1_agreement"]),
    }
    checks = {}
    for key, limit in limits.items():
        value = stats[key]["mean_abs_logit_diff"] if key == "merge_error" else stats[key]
        ok = value >= limit if key == "top1_agreement" else value <= limit
        checks[key] = {"value": value, "limit": round(limit, 6), "passed": bool(ok)}
    return {"checks": checks, "passed": all(c["passed"] for c in checks.values())}


def effect_kept(merge_error: dict[str, Any], effect: dict[str, Any]) -> float | None:
    """Share of the adapter's mean effect the merge keeps: 1 - merge error / effect, the merge
    error being merged vs the same weights + adapter unmerged (float32). Measured at 7B
    (bench/README.md): float32 storage 0.9998, float16 0.89."""
    if not effect["mean_abs_logit_diff"]:
        return None
    return round(1 - merge_error["mean_abs_logit_diff"] / effect["mean_abs_logit_diff"], 6)


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


def plain_base(settings: modeling.LoadSettings, weights: dict[str, torch.Tensor] | None,
               dtype: torch.dtype):
    """The base unquantized in `dtype`; `weights` overwrite its Linear weights (exactly: the
    dequantized values are bf16/fp16 numbers, which float32 holds without rounding)."""
    model = modeling.load_base(settings.model, dataclasses.replace(settings.quant,
                                                                   load_in_4bit=False),
                               dataclasses.replace(settings.precision, compute_dtype=dtype))
    modules = dict(model.named_modules())
    for name, weight in (weights or {}).items():
        target = modules[name].weight
        with torch.no_grad():
            target.copy_(weight.to(target.dtype))
    model.eval()
    return model


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def storage_error(model) -> dict[str, float | None]:
    """Share of the LoRA update's norm that storing the merged weights in each dtype destroys.

    For every adapted Linear (before merging, float32): the exact merged weight M = W + s·B·A
    and its update D = s·B·A; storing M in a dtype rounds it to M'; the error is
    ||M' - M|| / ||D|| over all layers. E.g. a bf16 step (~0.4% of |W|) larger than most of D
    gives an error near 1: the stored weights no longer hold the update.
    """
    errors = {name: 0.0 for name in STORAGE_DTYPES}
    update = 0.0
    for module in model.modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        for adapter in module.active_adapters:
            delta = module.get_delta_weight(adapter).float()
            exact = module.base_layer.weight.float() + delta
            update += float(delta.pow(2).sum())
            for name, dtype in STORAGE_DTYPES.items():
                errors[name] += float((exact.to(dtype).float() - exact).pow(2).sum())
            del delta, exact
    if not update:
        return {name: None for name in STORAGE_DTYPES}
    return {name: round((err / update) ** 0.5, 6) for name, err in errors.items()}


def merged_model(settings: modeling.LoadSettings, adapter_dir: Path,
                 weights: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                 ref: "Reference | None" = None):
    """Base (+ dequantized weights) with the adapter merged in float32, stored in `dtype`;
    returns (model, diagnostics).

    Why float32 arithmetic: W + s·B·A rounded to bf16 moves each weight by up to half a bf16
    step (2^-9 of |W|, ~0.2%), while a 7B adapter's update is mostly smaller than that: a bf16
    merge keeps only part of what was trained. In float32 the sum is exact to 2^-24; the
    chosen storage dtype then rounds once, and `storage_error` says what each dtype costs.
    With `ref`, the unmerged float32 model (base + adapter) is also compared with it: the
    best any merge can reach under float32 compute.
    """
    model = modeling.load_adapter(plain_base(settings, weights, torch.float32), adapter_dir)
    model.eval()
    diagnostics: dict[str, Any] = {"storage_error": storage_error(model)}
    if ref is not None:
        unmerged = prompt_logits(model, ref.tokenizer, ref.prompts)
        diagnostics["unmerged_float32"] = compare_logits(ref.logits, unmerged)
    merged = model.merge_and_unload()
    merged.to(dtype)
    merged.eval()
    if ref is not None:
        # The merge's own error: merged vs the same base + adapter unmerged, in float32.
        diagnostics["merge_error"] = compare_logits(
            unmerged, prompt_logits(merged, ref.tokenizer, ref.prompts))
    return merged, diagnostics


def parameter_count(model) -> int:
    """Parameters of a model as stored (4-bit weights counted as 2 per uint8)."""
    return modeling.trainable_parameters(model)[1]


def _free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the stage

@dataclass
class Reference:
    """What the merged model is compared with: the model evaluate scored, and the base."""
    tokenizer: Any
    prompts: list[str]
    logits: list[torch.Tensor]          # 4-bit base + adapter
    base_logits: list[torch.Tensor]     # 4-bit base alone
    weights: dict[str, torch.Tensor]    # dequantized Linear weights ({} for a plain base)
    size: int
    effect: dict[str, Any]              # base vs base + adapter: the scale of the differences


def reference_pass(settings: modeling.LoadSettings, adapter_dir: Path,
                   prompts: list[str]) -> Reference:
    """Load the model evaluate scored, once: its logits, the base's, the dequantized weights."""
    tokenizer = modeling.saved_tokenizer(adapter_dir, settings.model)  # as evaluate loads it
    base = modeling.load_base(*settings)
    weights = dequantized_weights(base) if settings.quant.load_in_4bit else {}
    size = parameter_count(base)
    base_logits = prompt_logits(base, tokenizer, prompts)
    model = modeling.load_adapter(base, adapter_dir)
    logits = prompt_logits(model, tokenizer, prompts)
    _free(model, base)
    return Reference(tokenizer, prompts, logits, base_logits, weights, size,
                     compare_logits(logits, base_logits))


def noise_floor(settings, ref: Reference, dtype: torch.dtype) -> dict[str, Any]:
    """The 4-bit base vs its dequantized weights stored unquantized in `dtype`, no adapter:
    the difference no merge can remove (compute dtype, kernels), against which parity is
    read. Always the dequantized weights, whatever merge.into: merging into the original
    weights adds the quantization error, which is the merge's doing, not noise."""
    model = plain_base(settings, ref.weights, dtype)
    stats = compare_logits(ref.base_logits, prompt_logits(model, ref.tokenizer, ref.prompts))
    _free(model)
    return stats


def measure(settings, adapter_dir: Path, weights, dtype: torch.dtype, ref: Reference,
            floor: dict[str, Any], merge: MergeParams):
    """Merge into `weights` (None: the original ones) and store in `dtype`; (model, report).
    `floor` is noise_floor's, the same for every merge of one run."""
    model, diagnostics = merged_model(settings, adapter_dir, weights, dtype, ref)
    stats = compare_logits(ref.logits, prompt_logits(model, ref.tokenizer, ref.prompts))
    # The unmerged model bounds what a merge can reach only when it holds the weights the
    # adapter was trained against; with the original weights its difference is the merge's.
    dequantized = weights is not None and weights is ref.weights
    verdict = gate({**stats, "merge_error": diagnostics["merge_error"]},
                   worse(floor, diagnostics["unmerged_float32"]) if dequantized else floor,
                   ref.effect, merge)
    return model, {**stats, "effect_kept": effect_kept(diagnostics["merge_error"], ref.effect),
                   "noise_floor": floor, **diagnostics, "gate": verdict["checks"],
                   "passed": verdict["passed"]}


def requantized_parity(out_dir: Path, settings, ref: Reference) -> dict:
    """Reload the saved merged model in 4-bit (the serving option) and measure it (informational)."""
    from transformers import AutoModelForCausalLM
    _, quant, precision = settings
    model = AutoModelForCausalLM.from_pretrained(
        str(out_dir), quantization_config=modeling.bnb_config(
            dataclasses.replace(quant, load_in_4bit=True), precision.compute_dtype),
        dtype=precision.compute_dtype,
        device_map=modeling.device_map(precision))
    stats = compare_logits(ref.logits, prompt_logits(model, ref.tokenizer, ref.prompts))
    _free(model)
    return stats


def exceeds_gpu(settings: modeling.LoadSettings, adapter_meta: dict) -> str | None:
    """Why the merge cannot run on this GPU (memory.estimate_merge above its memory), or None.

    The float32 base a 7B merge computes in takes ~28 GiB: on a smaller card the stage says so
    before loading anything, instead of failing out of memory."""
    if settings.precision.device != "cuda":
        return None
    from medqlora.core import memory
    try:
        arch = memory.Arch.from_config(memory.read_model_config(settings.model))
    except (memory.CannotEstimate, KeyError):
        return None
    lora = adapter_meta.get("params", {}).get("lora", {})
    targets = lora.get("target_modules") or memory.PROJECTIONS
    setup = memory.Setup(batch=1, seq=1, r=int(lora.get("r", 64)),
                         targets=memory.PROJECTIONS if targets == "all-linear" else tuple(targets))
    need = memory.estimate_merge(arch, setup, 2048).total
    limit, what = memory.device_limit(None)
    if limit is None or need <= limit:
        return None
    return (f"merge needs an estimated {need / memory.GIB:.1f} GiB of GPU memory (the base in "
            f"float32), more than {what}")


def publish_without_weights(out_dir: Path, params: Params, adapter_dir: Path,
                            extra: dict[str, Any]) -> None:
    """A merged folder holding only meta.json, which says why there are no weights."""
    with atomic_dir(out_dir) as tmp:
        write_meta(tmp, stage="merge", params=params.section("seed", "merge"),
                   inputs={"adapter": adapter_dir}, extra=extra)


def skip(out_dir: Path, metrics_path: Path, params: Params, adapter_dir: Path) -> int:
    """merge.enabled false: an empty merged folder whose meta.json says so, and null parity."""
    publish_without_weights(out_dir, params, adapter_dir, {"skipped": True})
    write_json(metrics_path, {"enabled": False, "passed": None})
    log.info("merge.enabled is false: adapter-only deployment, nothing merged")
    return 0


def failure_reason(report: dict[str, Any]) -> str:
    """One sentence naming each failed gate criterion, its value and its limit."""
    failed = [f"{key} {check['value']:g} (limit {check['limit']:g})"
              for key, check in report["gate"].items() if not check["passed"]]
    return "merge parity failed: " + ", ".join(failed)


def run_merge(params: Params, data_dir: str | Path, adapter_dir: str | Path,
              out_dir: str | Path, metrics_path: str | Path) -> int:
    """The merge stage: merge in float32, store in merge.dtype, gate on parity. Returns 0.

    A failed gate publishes a merged folder without weights (its meta.json says why), so the
    package still ships the adapter, which is what evaluate scored, and says merged weights
    are absent.
    """
    merge, adapter_dir, out_dir = params.merge, Path(adapter_dir), Path(out_dir)
    metrics_path = Path(metrics_path)
    if not merge.enabled:
        return skip(out_dir, metrics_path, params, adapter_dir)
    torch.manual_seed(params.seed)
    adapter_meta = read_meta(adapter_dir)
    settings = modeling.settings_from_meta(adapter_meta)
    if merge.into == "dequantized" and not settings.quant.load_in_4bit:
        raise ValueError(f"merge.into: dequantized needs an adapter trained on a 4-bit base, but "
                         f"{adapter_dir}/meta.json records quantization.load_in_4bit: false; "
                         "use merge.into: original for a plain LoRA adapter")
    dtype = STORAGE_DTYPES[merge.dtype]
    too_big = exceeds_gpu(settings, adapter_meta)
    if too_big:
        publish_without_weights(out_dir, params, adapter_dir, {"merged": False, "reason": too_big})
        write_json(metrics_path, {"enabled": True, "into": merge.into, "dtype": merge.dtype,
                                  "passed": None, "reason": too_big})
        log.error("%s: %s holds no weights; the package ships the adapter alone", too_big,
                  out_dir)
        return 0
    ref = reference_pass(settings, adapter_dir, parity_prompts(data_dir, merge.parity_prompts))
    chosen = ref.weights if merge.into == "dequantized" else None

    floor = noise_floor(settings, ref, dtype)  # one load, whichever weights are merged into

    alternative = None
    if ref.size <= CHEAP_PARAMETERS and ref.weights:
        other = None if merge.into == "dequantized" else ref.weights
        model, alternative = measure(settings, adapter_dir, other, dtype, ref, floor, merge)
        alternative = {"into": "original" if other is None else "dequantized", **alternative}
        _free(model)

    model, report = measure(settings, adapter_dir, chosen, dtype, ref, floor, merge)
    metrics = {
        "enabled": True, "into": merge.into, "dtype": merge.dtype, "merge_arithmetic": "float32",
        "compute_dtype": str(settings.precision.compute_dtype).removeprefix("torch."),
        "n_prompts": len(ref.prompts), **report,
        "tolerance": {"max_abs_logit_diff": merge.max_abs_logit_diff,
                      "min_top1_agreement": merge.min_top1_agreement,
                      "max_effect_lost": merge.max_effect_lost},
        "adapter_effect": ref.effect,
    }
    if alternative:
        metrics["alternative"] = alternative
    if not report["passed"]:
        _free(model)
        reason = failure_reason(report)
        publish_without_weights(out_dir, params, adapter_dir, {"merged": False, "reason": reason})
        write_json(metrics_path, metrics)
        log.error("%s (into=%s, dtype=%s): %s holds no weights; the package ships the adapter "
                  "alone. Try merge.dtype: float32 (or float16), or check merge.into.", reason,
                  merge.into, merge.dtype, out_dir)
        return 0
    with atomic_dir(out_dir) as tmp:
        save_merged(model, ref.tokenizer, tmp, params, adapter_dir, adapter_meta, metrics)
        if merge.requantize:
            metrics["requantized"] = requantized_parity(tmp, settings, ref)
    write_json(metrics_path, metrics)
    log.info("merge parity passed (into=%s, stored %s): mean |diff| %.5f vs noise floor %.5f and "
             "adapter effect %.5f (%.1f%% of the effect kept), max %.4f, top-1 %.4f",
             merge.into, merge.dtype, metrics["mean_abs_logit_diff"],
             report["noise_floor"]["mean_abs_logit_diff"], ref.effect["mean_abs_logit_diff"],
             100 * (metrics["effect_kept"] or 0), metrics["max_abs_logit_diff"],
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
               extra={"merged": True, "into": metrics["into"], "dtype": metrics["dtype"],
                      "base": adapter_meta.get("base"),
                      "precision": adapter_meta.get("precision"),
                      "parity": {k: metrics[k] for k in ("max_abs_logit_diff",
                                                         "mean_abs_logit_diff",
                                                         "top1_agreement", "effect_kept",
                                                         "passed")}})
