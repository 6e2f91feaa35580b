"""Collation: the rows of one micro-batch as padded tensors the model takes.

    collator = Collator(tokenizer.pad_token_id)     # medqlora/train/training.py hands it to the Trainer

The fast path (medqlora/train/fast/fastpath.py, train.fast_path.padding_free) wraps it; the train stage
wraps the result in WithTokenCount (callbacks.TokensSeen counts the tokens trained on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Collator:
    """Pads a batch to its longest row: input_ids with the pad id, labels with -100.

    Unpacked rows get an attention_mask (1 on real tokens). Packed rows (train_packed.parquet)
    carry position_ids that restart at 0 for every example; they get no attention_mask, so
    transformers builds a block-diagonal causal mask from the position_ids and examples packed
    together do not attend to each other. Their padding is given positions 0..k-1 as well,
    which makes it one more (fully masked-out, label -100) "example".
    """
    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]],
                 pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """`pad_to`: pad to at least this many tokens (one shape for every micro-batch)."""
        longest = max(max(len(row["input_ids"]) for row in rows), pad_to or 0)
        packed = "position_ids" in rows[0]
        batch: dict[str, list] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for row in rows:
            size = len(row["input_ids"])
            pad = longest - size
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            if packed:
                batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * size + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


REAL_TOKENS = "medqlora_real_tokens"   # the batch key WithTokenCount adds


@dataclass
class WithTokenCount:
    """Wraps a collator: each batch also carries its real (non-padding) token count, counted
    from the rows on the host, as a plain int under REAL_TOKENS.

    The Trainer moves a batch's tensors to the device and passes other values through;
    callbacks.TokensSeen takes the count off before the model sees the batch. Attributes of
    the wrapped collator (PaddingFree.efficiency) read through.
    """
    inner: Any

    def __call__(self, rows: list[dict[str, Any]], *args, **kwargs) -> dict[str, Any]:
        batch = self.inner(rows, *args, **kwargs)
        batch[REAL_TOKENS] = sum(len(row["input_ids"]) for row in rows)
        return batch

    def __getattr__(self, name: str):
        if name == "inner":            # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)
