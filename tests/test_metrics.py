"""medqlora.evaluate.metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu

from medqlora.evaluate import metrics


def test_perplexity_of_known_nll_vector():
    # NLLs 1, 2, 3 -> mean 2 -> exp(2)
    assert metrics.perplexity(sum([1.0, 2.0, 3.0]), 3) == pytest.approx(math.exp(2.0))
    # a uniform guess over 4 tokens has NLL ln 4 per token -> perplexity 4
    assert metrics.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)


def test_perplexity_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="count was 0"):
        metrics.perplexity(0.0, 0)


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["The hemoglobin is low at 9 g/dL.", "Sodium is low; this is hyponatremia."]
    assert metrics.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.sentence_bleu(refs[0], refs[0]) == pytest.approx(100.0)
    disjoint = ["zebra quantum violin", "purple orbit marmalade"]
    assert metrics.corpus_bleu(disjoint, refs) == 0.0
    assert metrics.sentence_bleu(disjoint[0], refs[0]) == 0.0


def test_bleu_from_statistics_equals_sacrebleu_corpus_bleu():
    hyps = ["the patient has anemia", "potassium is high at 6.1", "normal panel", "B"]
    refs = ["the patient has anemia today", "potassium is high at 6.6 mmol/L", "normal", "B"]
    stats = metrics.bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10)
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 0 < expected < 100
    assert metrics.bleu_from_statistics(stats) == pytest.approx(expected)
    # a resample with repeats is the corpus BLEU of the repeated list
    idx = np.array([0, 0, 1, 3])
    repeated = sacrebleu.corpus_bleu([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
    assert metrics.bleu_from_statistics(stats[idx]) == pytest.approx(repeated)


def test_rouge_l_of_known_pair():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens: P = 5/5, R = 5/6,
    # F1 = 2PR/(P+R) = (10/6)/(11/6) = 10/11
    assert metrics.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert metrics.rouge_l("anemia", "anemia") == pytest.approx(1.0)
    assert metrics.rouge_l("zebra", "anemia") == 0.0


def test_rouge_l_keeps_accented_words_whole():
    # rouge-score's default tokenizer splits "hyperkaliémie" into "hyperkali", "mie": the two
    # opposite findings would share "mie" and score 0.5. Whole words share nothing.
    assert metrics.rouge_l("hyperkaliémie", "hypokaliémie") == 0.0
    assert metrics.rouge_l("Hyperkaliémie", "hyperkaliémie") == pytest.approx(1.0)
    assert metrics.WordTokenizer().tokenize("L'anémie sévère, Na+ 125") == [
        "l", "anémie", "sévère", "na", "125"]
    # NFD input (e + combining accent) equals NFC: "anémie" is one word either way
    assert metrics.rouge_l("ane\u0301mie ferriprive", "anémie ferriprive") == pytest.approx(1.0)
    # LCS("une anémie sévère", "anémie très sévère") = "anémie sévère": P = 2/3, R = 2/3
    assert metrics.rouge_l("une anémie sévère", "anémie très sévère") == pytest.approx(2 / 3)


def test_rouge_l_equals_rouge_score_default_on_english():
    from rouge_score import rouge_scorer
    default = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("Creatinine is high at 395 umol/L.", "creatinine high: 395 umol/L (ref 60-110)"),
             ("Treatment combines lifestyle measures", "Lifestyle measures and a PPI")]
    for hyp, ref in pairs:
        assert metrics.rouge_l(hyp, ref) == pytest.approx(
            default.score(ref, hyp)["rougeL"].fmeasure)


@pytest.mark.parametrize("text, expected", [
    ("Answer: B", "B"),
    ("answer:C. The sodium...", "C"),
    ("Réponse : D", "D"),
    ("Réponse: (A) une anticoagulation", "A"),
    ("reponse : E", "E"),
    ("The options differ. Answer: Anemia is B", "B"),   # "A" inside "Anemia" is not standalone
    ("B. Potassium is high", "B"),                      # no marker: the leading letter
    ("  (C) because", "C"),
    ("Answer: none of them", None),                     # marker without a letter, no lead letter
    ("Because sodium is low, A is right", None),        # letter not at the start, no marker
    ("F. wrong range", None),                           # only A-E count
    ("b. lowercase", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert metrics.extract_choice(text) == expected
    assert metrics.parse_answer("mcq", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Hemoglobin is low.\nFinding: anemia", "anemia"),
    ("Finding: Renal impairment.", "renal_impairment"),
    ("finding:hyperkalemia\nThe rest", "hyperkalemia"),
    ("Potassium : valeur élevée.\nConclusion : hyperkaliémie", "hyperkalemia"),
    ("Conclusion: insuffisance rénale", "renal_impairment"),
    ("Conclusion : bilan normal", "normal"),
    ("Finding: normal", "normal"),
    ("Conclusion : cytolyse hépatique ; à explorer", "hepatic_cytolysis"),
    ("Finding: hypothyroidism, primary", "hypothyroidism"),
    ("Conclusion : hyperleucocytose", "leukocytosis"),
    ("Finding: anemias", None),                  # a longer word is not the name
    ("Finding: something else", None),
    ("The sodium is low: hyponatremia", None),   # no Finding/Conclusion marker
    ("Finding:\nanemia", None),                  # nothing on the marker's line
])
def test_extract_finding(text, expected):
    assert metrics.extract_finding(text) == expected
    assert metrics.parse_answer("lab", text) == expected


def test_every_label_of_the_raw_labs_parses_back():
    """Each closing line of data/raw/labs.jsonl maps to its own label."""
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "data" / "raw" / "labs.jsonl"
    if not path.is_file():
        pytest.skip("data/raw/labs.jsonl not generated")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 12
    for row in rows:
        assert metrics.extract_finding(row["output"]) == row["label"], row["id"]


def test_parse_answer_rejects_non_diagnostic_kinds():
    with pytest.raises(ValueError, match="'qa'"):
        metrics.parse_answer("qa", "Answer: A")
    assert metrics.is_diagnostic("mcq", "A") and metrics.is_diagnostic("lab", "anemia")
    assert not metrics.is_diagnostic("qa", None)
    assert not metrics.is_diagnostic("lab", None)


def _accuracy_interval(correct, samples, seed):
    hits = np.asarray(correct, dtype=float)
    return metrics.percentile_interval(
        [hits[idx].mean() for idx in metrics.resample_indices(len(hits), samples, seed)])


def test_bootstrap_interval_contains_estimate_and_is_deterministic():
    correct = [True] * 30 + [False] * 20
    lo, hi = _accuracy_interval(correct, samples=1000, seed=7)
    assert lo < 0.6 < hi
    # binomial SE = sqrt(.6*.4/50) = 0.069 -> a 95% interval about +-0.136 wide
    assert 0.2 < hi - lo < 0.35
    assert _accuracy_interval(correct, samples=1000, seed=7) == [lo, hi]
    assert _accuracy_interval(correct, samples=1000, seed=8) != [lo, hi]


def test_bleu_interval_contains_corpus_bleu():
    refs = [f"value {i} is low so the finding is anemia" for i in range(20)]
    hyps = [r if i % 2 else f"value {i} is high" for i, r in enumerate(refs)]
    point = metrics.corpus_bleu(hyps, refs)
    stats = metrics.bleu_statistics(hyps, refs)
    lo, hi = metrics.percentile_interval([metrics.bleu_from_statistics(stats[idx])
                                          for idx in metrics.resample_indices(20, 500, 1)])
    assert lo <= point <= hi and lo < hi


def test_bootstrap_of_constant_statistic_is_a_point_and_undefined_is_none():
    assert _accuracy_interval([True] * 5, samples=200, seed=0) == [1.0, 1.0]
    assert metrics.percentile_interval([None, None, 1.0]) is None    # undefined on most
    assert metrics.percentile_interval([None, 2.0, 2.0]) == [2.0, 2.0]
    with pytest.raises(ValueError):
        metrics.resample_indices(0, 10, 0)
