"""Comparing two models' logits position by position: the measure of merge's parity gate and of
evaluate's decode copy (how far another representation of the same model moves its choices)."""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def sequence_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Float32 CPU logits [positions, vocab] of each token sequence, one at a time (no padding,
    no cache): the teacher-forced numbers every comparison here reads."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
            .logits[0].float().cpu() for ids in sequences]


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
