"""Contamination report: word n-gram overlap of test items with the train split."""
from __future__ import annotations

import pytest

from medqlora.metrics import contamination, ngrams

TRAIN = ["The patient has iron deficiency anemia with a low ferritin level today.",
         "Hemoglobin 9.1 g/dL, MCV 70 fL: microcytic anemia."]


def test_ngrams_normalise_case_punctuation_and_width():
    assert ngrams("A, b!  C", 2) == {("a", "b"), ("b", "c")}
    assert ngrams("ＡＢＣ d", 2) == {("abc", "d")}   # NFKC folds full-width letters
    assert ngrams("one two", 3) == set()


def test_contamination_counts_items_and_max_overlap():
    test = [
        # 12 words -> 5 8-grams; the first 8 words come from TRAIN[0] verbatim: 1 of 5 shared
        "the patient has iron deficiency anemia with a zzz yyy xxx www",
        # all 10 words copied (case/punctuation differ): 3 of 3 8-grams shared
        "THE PATIENT has iron-deficiency anemia with a low ferritin",
        "an unrelated question about potassium levels in renal failure patients",
        "too short",
    ]
    report = contamination(test, TRAIN, n=8)
    assert report == {"ngram": 8, "items_with_overlap": 2, "share": 0.5, "max_overlap": 1.0}
    assert contamination(test[:1], TRAIN, n=8)["max_overlap"] == pytest.approx(1 / 5)


def test_no_overlap_and_empty_test():
    assert contamination(["nothing in common at all with the training text here ok"], TRAIN) == {
        "ngram": 8, "items_with_overlap": 0, "share": 0.0, "max_overlap": 0.0}
    assert contamination([], TRAIN)["share"] == 0.0
