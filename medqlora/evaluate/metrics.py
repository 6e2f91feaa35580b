"""Scores for the evaluate stage: pure functions of numbers and strings, no model, no network.

    perplexity(nll_sum, count)            exp(mean token NLL) over answer tokens
    corpus_bleu / sentence_bleu           sacrebleu (0-100), on detokenised text
    rouge_l                               rouge-score ROUGE-L F1 (0-1), accent-aware words
    parse_answer(kind, text)              the diagnostic answer a model's output commits to
    resample_indices / percentile_interval  seeded percentile 95% intervals, items resampled

Nothing here calls `evaluate.load` or any hub: every metric is computed locally.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from typing import Sequence

import numpy as np

# ---------------------------------------------------------------- perplexity


def perplexity(nll_sum: float, count: int) -> float:
    """exp(total NLL / token count): the perplexity of the tokens the NLL was summed over.

    Example: NLLs [1.0, 2.0, 3.0] sum to 6.0 over 3 tokens -> exp(2.0) = 7.389.
    """
    if count <= 0:
        raise ValueError("perplexity needs at least one scored token (count was "
                         f"{count}): every test example lost its answer tokens")
    return math.exp(nll_sum / count)


# ---------------------------------------------------------------- BLEU


def _bleu():
    from sacrebleu.metrics import BLEU  # default 13a tokenizer, exp smoothing: sacrebleu's own
    return BLEU()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of plain detokenised strings, one reference each."""
    return _bleu().corpus_score(list(hypotheses), [list(references)]).score


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0-100, exp smoothing) of one output against its reference."""
    from sacrebleu.metrics import BLEU
    return BLEU(effective_order=True).sentence_score(hypothesis, [reference]).score


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-item sufficient statistics of corpus BLEU, shape (n, 10).

    Columns: hypothesis length, reference length, matching n-grams (n=1..4), hypothesis
    n-grams (n=1..4). Corpus BLEU of any subset (with repeats) is BLEU of the column sums, so
    a bootstrap resample costs a sum, not a re-tokenisation (about 300x faster).
    """
    stats = _bleu()._extract_corpus_statistics(list(hypotheses), [list(references)])
    return np.asarray(stats, dtype=np.int64).reshape(len(hypotheses), -1)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed or per-item statistics (see bleu_statistics)."""
    totals = np.asarray(stats).reshape(-1, 10).sum(axis=0)
    return _bleu()._compute_score_from_stats([int(v) for v in totals]).score


# ---------------------------------------------------------------- ROUGE-L


class WordTokenizer:
    """rouge-score tokenizer for French and English: NFC, casefolded, Unicode word runs.

    rouge-score's default tokenizer keeps only [a-z0-9] runs, so accented letters split words:
    "hyperkaliémie" -> "hyperkali", "mie" and "hypokaliémie" -> "hypokali", "mie" share "mie"
    (ROUGE-L 0.5 for two opposite findings). Here a word is a run of Unicode letters or digits
    (underscore and apostrophe separate: "l'anémie" -> "l", "anémie"), so the pair scores 0.
    No stemming: rouge-score's Porter stemmer is English-only.
    """

    _WORDS = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        """The words of `text`, in order."""
        return self._WORDS.findall(unicodedata.normalize("NFC", text).casefold())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordTokenizer())


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) from rouge-score, with WordTokenizer (accents kept, no stemming).

    English scores equal rouge-score's default (its tokenizer lowercases and keeps [a-z0-9]
    runs, as this one does for ASCII text); French words stay whole.
    """
    return float(_rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure)


# ---------------------------------------------------------------- diagnostic answers
#
# Extraction rule (what `parse_answer` does, in order; None means parse failure):
#   mcq: the first standalone capital letter A-E after the first "Answer:" / "Réponse :"
#        (any case, space before the colon optional); else a standalone capital A-E that is
#        the very first thing in the output, optionally inside "(" ")".
#   lab: the text after the first "Finding:" / "Conclusion :" up to the end of that line,
#        lowercased, accents kept, whitespace collapsed, trailing punctuation dropped; it is
#        the canonical label when it equals one of that label's names in FINDING_NAMES, else
#        the label whose longest name it starts with (followed by a non-letter), else None.
# "Standalone" = not preceded or followed by a letter, so the "A" in "Anemia" never counts.

ANSWER_MARKER = re.compile(r"(?:answer|r[ée]ponse)\s*:", re.IGNORECASE)
FINDING_MARKER = re.compile(r"(?:finding|conclusion)\s*:", re.IGNORECASE)
LETTER = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
LEADING_LETTER = re.compile(r"\s*\(?([A-E])(?![A-Za-z])")

# Canonical label -> its names in outputs: the EN and FR closings of data/raw/labs.jsonl
# (scripts/make_dataset.py FINDINGS) plus the label itself and common spelling variants.
FINDING_NAMES: dict[str, tuple[str, ...]] = {
    "anemia": ("anemia", "anaemia", "anémie", "anemie"),
    "hyperkalemia": ("hyperkalemia", "hyperkalaemia", "hyperkaliémie", "hyperkaliemie"),
    "hypokalemia": ("hypokalemia", "hypokalaemia", "hypokaliémie", "hypokaliemie"),
    "hyponatremia": ("hyponatremia", "hyponatraemia", "hyponatrémie", "hyponatremie"),
    "hyperglycemia": ("hyperglycemia", "hyperglycaemia", "hyperglycémie", "hyperglycemie"),
    "renal_impairment": ("renal impairment", "renal_impairment", "insuffisance rénale",
                         "insuffisance renale"),
    "hypothyroidism": ("hypothyroidism", "hypothyroïdie", "hypothyroidie"),
    "hyperthyroidism": ("hyperthyroidism", "hyperthyroïdie", "hyperthyroidie"),
    "hepatic_cytolysis": ("hepatic cytolysis", "hepatic_cytolysis", "cytolyse hépatique",
                          "cytolyse hepatique"),
    "thrombocytopenia": ("thrombocytopenia", "thrombopénie", "thrombopenie",
                         "thrombocytopénie"),
    "leukocytosis": ("leukocytosis", "leucocytosis", "hyperleucocytose", "hyperleukocytose"),
    "normal": ("normal", "bilan normal", "normal panel"),
}
_NAME_TO_LABEL = {unicodedata.normalize("NFC", name): label
                  for label, names in FINDING_NAMES.items() for name in names}
_NAMES_LONGEST_FIRST = sorted(_NAME_TO_LABEL, key=len, reverse=True)


def extract_choice(text: str) -> str | None:
    """The MCQ letter an output commits to (rule above), or None."""
    marker = ANSWER_MARKER.search(text)
    if marker:
        letter = LETTER.search(text, marker.end())
        if letter:
            return letter.group(1)
    leading = LEADING_LETTER.match(text)
    return leading.group(1) if leading else None


def _normalise_finding(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = " ".join(text.split())
    return text.rstrip(" .;:,!?)").strip()


def extract_finding(text: str) -> str | None:
    """The canonical lab label an output concludes with (rule above), or None."""
    marker = FINDING_MARKER.search(text)
    if not marker:
        return None
    finding = _normalise_finding(text[marker.end():].split("\n", 1)[0])
    if finding in _NAME_TO_LABEL:
        return _NAME_TO_LABEL[finding]
    for name in _NAMES_LONGEST_FIRST:
        if finding.startswith(name) and not finding[len(name):len(name) + 1].isalpha():
            return _NAME_TO_LABEL[name]
    return None


def parse_answer(kind: str, text: str) -> str | None:
    """The diagnostic answer in `text` for an item of `kind` ("mcq" or "lab"); None if none."""
    if kind == "mcq":
        return extract_choice(text)
    if kind == "lab":
        return extract_finding(text)
    raise ValueError(f"kind {kind!r} has no diagnostic answer (expected 'mcq' or 'lab')")


def is_diagnostic(kind: str, label: str | None) -> bool:
    """True for items scored by accuracy: mcq and lab items that carry a label."""
    return kind in ("mcq", "lab") and label is not None and label == label  # NaN-safe


# ---------------------------------------------------------------- bootstrap


def resample_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """`samples` resamples of n item indices drawn with replacement, shape (samples, n), from a
    numpy Generator seeded with `seed`: the same draws, so the same intervals, on every run.
    Scoring two models on the same draws pairs them (evaluation.intervals)."""
    if n <= 0:
        raise ValueError("bootstrap needs at least one item")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: Sequence[float | None], level: float = 0.95
                        ) -> list[float] | None:
    """Percentile bootstrap interval [lo, hi] of a statistic's resampled values: with 1000
    resamples the 95% bounds are the 2.5th and 97.5th percentiles. None values (the statistic
    is undefined on that resample, e.g. no generated item drawn) are left out; None when that
    is most of them."""
    kept = [v for v in values if v is not None]
    if not kept or len(kept) < len(values) / 2:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(kept, dtype=float), [tail, 100 - tail])
    return [float(lo), float(hi)]
