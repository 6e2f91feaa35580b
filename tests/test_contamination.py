"""Contamination report: word n-gram overlap of test items with the train split."""
from __future__ import annotations

import pytest

from medqlora.data.contamination import ngrams, overlaps

TRAIN = ["The patient has iron deficiency anemia with a low ferritin level today.",
         "Hemoglobin 9.1 g/dL, MCV 70 fL: microcytic anemia."]


def test_ngrams_normalise_case_punctuation_and_width():
    assert ngrams("A, b!  C", 2) == {("a", "b"), ("b", "c")}
    assert ngrams("ＡＢＣ d", 2) == {("abc", "d")}   # NFKC folds full-width letters
    assert ngrams("one two", 3) == set()


def test_overlaps_share_of_each_items_ngrams_in_train():
    test = [
        # 12 words -> 5 8-grams; the first 8 words come from TRAIN[0] verbatim: 1 of 5 shared
        "the patient has iron deficiency anemia with a zzz yyy xxx www",
        # all 10 words copied (case/punctuation differ): 3 of 3 8-grams shared
        "THE PATIENT has iron-deficiency anemia with a low ferritin",
        "an unrelated question about potassium levels in renal failure patients",
        "too short",
    ]
    assert overlaps(test, TRAIN, n=8) == pytest.approx([1 / 5, 1.0, 0.0, 0.0])
    assert overlaps([], TRAIN) == []


# ---------------------------------------------------------------- prepare: content only

def _example(source, question, answer, kind="qa", options=None, explanation=None):
    from medqlora.data.records import Example
    return Example(source=source, kind=kind, messages=[{"role": "user", "content": question}],
                   reference=answer, options=options,
                   extra={"explanation": explanation} if explanation else {})


def _data(mode="warn", threshold=0.5):
    from medqlora.core.config import DataParams
    return DataParams(sources=(), heldout_sources=(), on_invalid="error", max_errors_reported=50, val_fraction=0.1,
                      test_fraction=0.1, max_seq_length=256, overlength="truncate",
                      packing=False, system_prompt="", phi="error", on_contamination=mode,
                      contamination_threshold=threshold)


def test_content_text_has_no_template_or_answer_scaffold():
    from medqlora.data.dataset import content_text
    mcq = _example("mcq.jsonl:3", "Which drug first?", "B", kind="mcq",
                   options={"A": "Aspirin", "B": "Heparin"}, explanation="Heparin acts at once.")
    assert content_text(mcq) == "Which drug first?\nAspirin\nHeparin\nHeparin acts at once."
    assert content_text(_example("qa.jsonl:1", "What is anemia?", "Low hemoglobin.")) == (
        "What is anemia?\nLow hemoglobin.")


SENTENCE = "pulmonary embolism is the obstruction of pulmonary arteries by a thrombus"


def _splits():
    train = [_example("qa.jsonl:1", "Define it.", SENTENCE.capitalize() + "."),
             _example("qa.jsonl:2", "What is asthma?", "A chronic inflammatory airway disease "
                                                       "with reversible obstruction.")]
    test = [  # 4 + 11 = 15 words -> 8 8-grams; the sentence's 11 - 8 + 1 = 4 are in train: 4/8
        _example("qa.jsonl:7", "What is pulmonary embolism?", SENTENCE + "."),
        _example("qa.jsonl:8", "What is gout?", "Urate crystals deposit in a joint and "
                                                "inflame it acutely and painfully.")]
    return {"train": train, "val": [], "test": test}


def test_prepare_reports_held_out_overlap_with_train_content():
    from medqlora.data.dataset import contamination_report
    report = contamination_report(_splits(), _data(threshold=0.4))
    assert report == {"ngram": 8, "content_only": True, "threshold": 0.4,
                      "val": {"items": 0, "items_with_overlap": 0, "mean_overlap": 0.0,
                              "max_overlap": 0.0, "over_threshold": 0},
                      "test": {"items": 2, "items_with_overlap": 1, "mean_overlap": 0.25,
                               "max_overlap": 0.5, "over_threshold": 1}}


def test_on_contamination_error_names_the_items():
    from medqlora.data.dataset import contamination_report
    from medqlora.data.records import DataError
    with pytest.raises(DataError) as err:
        contamination_report(_splits(), _data("error", threshold=0.4))
    assert err.value.problems[0] == "qa.jsonl:7: test item shares 50% of its 8-grams with train"
    assert "data.contamination_threshold 0.4" in err.value.problems[-1]
    # an item at the threshold only counts in the report, so error mode passes
    assert contamination_report(_splits(), _data("error", threshold=0.5))["test"][
        "over_threshold"] == 0


def test_model_card_states_the_overlap():
    from medqlora.ship.modelcard import _contamination
    report = {"ngram": 8, "content_only": True, "threshold": 0.5,
              "test": {"items": 98, "items_with_overlap": 94, "mean_overlap": 0.5,
                       "max_overlap": 0.88, "over_threshold": 49}}
    assert _contamination({"contamination": report}) == (
        "**Held-out overlap with train** (word 8-grams of the records' content, template text "
        "excluded): 94 of 98 test items share at least one with train; 49 share more than 50% "
        "of theirs (mean overlap 0.50, max 0.88). Test scores on overlapping items measure "
        "recall of seen text, not generalisation.")
    assert "not measured" in _contamination({})
