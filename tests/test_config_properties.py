"""Property tests: no params document makes the validator fail with anything but problems."""
from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medqlora.config import ParamsError, build_params, validate_document
from tests.conftest import ROOT, set_key

BASE = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
LEAVES = [
    "seed", "data.val_fraction", "data.max_seq_length", "data.packing", "data.on_invalid",
    "model.base", "model.revision", "quantization.bnb_4bit_compute_dtype", "lora.r",
    "lora.target_modules", "lora.lora_alpha", "train.learning_rate", "train.max_steps",
    "train.optim", "evaluate.max_examples", "merge.max_shard_size", "runner.gpus",
    "runner.distributed.num_machines", "data.sources", "train", "lora",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LEAVES), value=json_values)
def test_any_single_change_is_valid_or_reported(key, value):
    doc = copy.deepcopy(BASE)
    set_key(doc, key, value)
    problems = validate_document(doc, ROOT)
    if problems:
        assert all(isinstance(p, str) and ": " in p for p in problems)
    else:
        build_params(doc)  # a valid document always types cleanly


@settings(max_examples=100, deadline=None)
@given(doc=json_values)
def test_arbitrary_documents_never_crash(doc):
    problems = validate_document(doc, ROOT)
    assert problems, "an arbitrary document cannot be a valid params file"
    assert all(": " in p for p in problems)


def test_params_error_lists_every_problem():
    err = ParamsError(["a: x", "b: y"])
    assert str(err) == "a: x\nb: y" and err.problems == ["a: x", "b: y"]
