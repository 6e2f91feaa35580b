"""The decode copy: the 4-bit base's weights dequantized once, for fast decoding, kept only when
its logits agree with the 4-bit reference within the merge parity gate's tolerance.

    copy = DecodeCopy.make(model)           # Linear4bit -> nn.Linear (compute dtype), swapped in
    stats = agreement(reference_logits, logits_now, effect)
    copy.keep() or copy.undo()

A 4-bit matmul dequantizes NF4 blocks on every call; at decode sizes (one token a row) that is
most of a step. dequantize(Q(W)) is exactly the tensor every 4-bit matmul multiplies with, so
the copy computes the shipped model (4-bit base + adapter, unmerged) with other kernels: what
differs is summation order, the noise floor of the merge's parity gate. It costs the base's
size in the compute dtype (Mistral-7B: 14 GiB in bf16 instead of 3.9 GiB); where that does not
fit (`fits`), decoding stays on the 4-bit weights and evaluate says so.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from medqlora.evaluate.parity import compare_logits, sequence_logits

log = logging.getLogger(__name__)
# Left free after the copy: the KV cache, prefill activations and the allocator's slack.
HEADROOM_BYTES = {"cuda": 8 * 2**30, "cpu": 2 * 2**30}


def quantized_linears(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, bnb Linear4bit) of every 4-bit linear layer, LoRA bases included."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if isinstance(child, bnb.nn.Linear4bit)]


def copy_bytes(model) -> int:
    """Bytes the dequantized weights take in their compute dtype."""
    return sum(child.in_features * child.out_features * _dtype(child).itemsize
               for _, _, child in quantized_linears(model))


def _dtype(layer) -> torch.dtype:
    return layer.compute_dtype or torch.float32


def free_bytes(device: torch.device) -> int:
    """Free memory where the model lives: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def fits(model) -> tuple[bool, str]:
    """(whether the copy fits, why): it must leave HEADROOM_BYTES free beside the 4-bit weights
    (both are held until the agreement check decides)."""
    need = copy_bytes(model)
    device = next(model.parameters()).device
    free, headroom = free_bytes(device), HEADROOM_BYTES.get(device.type, HEADROOM_BYTES["cuda"])
    gib = 2**30
    if need + headroom > free:
        return False, (f"the dequantized copy needs {need / gib:.1f} GiB + "
                       f"{headroom / gib:.0f} GiB headroom, {free / gib:.1f} GiB free on "
                       f"{device.type}")
    return True, f"{need / gib:.2f} GiB copy, {free / gib:.1f} GiB free on {device.type}"


def dequantized_linear(layer) -> torch.nn.Linear:
    """An nn.Linear holding dequantize(Q(W)) of a bnb Linear4bit, in its compute dtype."""
    import bitsandbytes.functional as F
    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpacked_cpu(data, state)
    weight = F.dequantize_4bit(data, state).to(_dtype(layer))
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device="meta")
    linear.weight = torch.nn.Parameter(weight.reshape(layer.out_features, layer.in_features),
                                       requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(_dtype(layer)), requires_grad=False)
    return linear


def _unpacked_cpu(data: torch.Tensor, state):
    """(codes, quant state) in dequantize_4bit's layout, of a CPU layer bitsandbytes repacked
    for its own kernel at its first forward (dequantize_4bit reads the repacked bytes as
    garbage). The repacked state keeps the block scales in bfloat16, transposed: those exact
    scales are used, so the copy holds what the CPU kernel multiplies with. The layer itself
    is left as it was (bitsandbytes' inverse rewrites the state it is given: a copy here)."""
    import copy

    import bitsandbytes.functional as F
    scratch = copy.deepcopy(state)
    scratch.original_nested = False      # keep the scales; bitsandbytes would re-quantize them
    codes, scratch = F._convert_weight_packed_for_cpu_inverse(data, scratch)
    scratch.absmax = state.absmax.T.reshape(-1).float()
    scratch.nested = False
    return codes, scratch


@dataclass
class DecodeCopy:
    """The swap of every Linear4bit for its dequantized nn.Linear, undoable until kept."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)

    @classmethod
    def make(cls, model) -> "DecodeCopy":
        swapped = []
        for parent, name, layer in quantized_linears(model):
            setattr(parent, name, dequantized_linear(layer))
            swapped.append((parent, name, layer))
        return cls(swapped)

    def keep(self) -> None:
        """Drop the 4-bit layers (their memory is freed)."""
        self.swapped.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def undo(self) -> None:
        """Put the 4-bit layers back."""
        for parent, name, layer in self.swapped:
            setattr(parent, name, layer)
        self.swapped.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor],
              effect: dict[str, Any], max_effect_lost: float,
              min_top1: float) -> dict[str, Any]:
    """The copy's logits against the 4-bit reference's, gated as merge gates its floor: mean
    |logit diff| at most max_effect_lost x the adapter's mean effect, top-1 agreement at least
    min_top1 (merge.max_effect_lost, merge.min_top1_agreement)."""
    stats = compare_logits(reference, other)
    limit = max_effect_lost * effect["mean_abs_logit_diff"]
    checks = {
        "mean_abs_logit_diff": {"value": stats["mean_abs_logit_diff"], "limit": round(limit, 6),
                                "passed": stats["mean_abs_logit_diff"] <= limit},
        "top1_agreement": {"value": stats["top1_agreement"], "limit": min_top1,
                           "passed": stats["top1_agreement"] >= min_top1},
    }
    return {**stats, "adapter_effect_mean_abs_logit_diff": effect["mean_abs_logit_diff"],
            "checks": checks, "passed": all(c["passed"] for c in checks.values())}


def prepare(model, sequences: list[list[int]], max_effect_lost: float,
            min_top1: float) -> dict[str, Any]:
    """Swap in the decode copy when it fits and agrees with the 4-bit reference on `sequences`
    (prompt + reference answer, teacher-forced); return what was decided, for the metrics.

    The reference is the model as loaded (4-bit base + adapter); the adapter's effect is the
    same model with the adapter switched off. Whatever is decided, every later forward pass
    (perplexity, option scoring, generation) runs on the weights it names.
    """
    if not quantized_linears(model):
        return {"weights": "as loaded", "reason": "the base is not 4-bit: nothing to dequantize"}
    ok, why = fits(model)
    if not ok:
        log.warning("decoding on the 4-bit weights: %s", why)
        return {"weights": "4-bit", "reason": why}
    reference = sequence_logits(model, sequences)
    with model.disable_adapter():
        effect = compare_logits(reference, sequence_logits(model, sequences))
    dtype = str(_dtype(quantized_linears(model)[0][2])).removeprefix("torch.")
    size = {"copy_gib": round(copy_bytes(model) / 2**30, 3)}   # metrics hold no free memory
    copy = DecodeCopy.make(model)
    stats = agreement(reference, sequence_logits(model, sequences), effect,
                      max_effect_lost, min_top1)
    log.info("decode copy vs the 4-bit reference over %d positions: mean |logit diff| %.5f "
             "(limit %.5f), top-1 agreement %.4f (limit %.2f)", stats["n_positions"],
             stats["mean_abs_logit_diff"], stats["checks"]["mean_abs_logit_diff"]["limit"],
             stats["top1_agreement"], min_top1)
    if stats["passed"]:
        copy.keep()
        log.info("decoding on the dequantized copy (%s)", why)
        return {"weights": f"dequantized copy ({dtype})", **size, "agreement": stats}
    copy.undo()
    log.warning("decoding on the 4-bit weights: the dequantized copy disagrees with them beyond "
                "the parity gate's tolerance (merge.max_effect_lost, merge.min_top1_agreement)")
    return {"weights": "4-bit", "reason": "the copy failed the agreement check", **size,
            "agreement": stats}
