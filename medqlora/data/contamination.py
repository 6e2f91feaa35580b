"""Contamination: how much of a held-out item's wording already appears in train.

    overlaps(test_texts, train_texts, n=8)   per test text, share of its word 8-grams in train

Prepare uses it to flag (or drop) val/test items that recall of train could answer.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of NFKC-normalised, casefolded text (punctuation and spacing ignored)."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlaps(test_texts: Sequence[str], train_texts: Sequence[str], n: int = 8) -> list[float]:
    """Per test text, the share of its word n-grams found anywhere in the train texts (0.0 for
    a text shorter than n words). E.g. 12 words -> 5 8-grams, 1 of them in train -> 0.2."""
    seen: set[tuple[str, ...]] = set()
    for text in train_texts:
        seen |= ngrams(text, n)
    out = []
    for text in test_texts:
        grams = ngrams(text, n)
        out.append(len(grams & seen) / len(grams) if grams else 0.0)
    return out
