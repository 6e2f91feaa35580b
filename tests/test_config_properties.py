"""Property tests: no params document makes the validator fail with anything but problems."""
from __future__ import annotations

import copy
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medqlora.core.config import (MAX_YAML_VALUES, ParamsError, build_params, load_schema,
                             read_yaml, validate_document)
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


# ---------------------------------------------------------------- hostile documents

def _numeric_keys(schema: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every key whose schema takes a number (directly or in a oneOf)."""
    out = []
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        branches = [b.get("type") for b in sub.get("oneOf", []) + sub.get("anyOf", [])]
        if {"number", "integer"} & set(types + [t for t in branches if isinstance(t, str)]):
            out.append(path)
        out.extend(_numeric_keys(sub, f"{path}."))
    return out


NUMERIC_KEYS = _numeric_keys(load_schema())


def test_the_schema_has_numeric_keys_in_every_section():
    assert {k.split(".")[0] for k in NUMERIC_KEYS} >= {"seed", "data", "lora", "train",
                                                        "evaluate", "merge", "runner"}
    assert "train.fast_path.enabled" not in NUMERIC_KEYS and "lora.lora_alpha" in NUMERIC_KEYS


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(NUMERIC_KEYS),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_no_numeric_key_accepts_nan_or_infinity(key, value):
    doc = copy.deepcopy(BASE)
    set_key(doc, key, value)
    problems = validate_document(doc, ROOT)
    mine = [p for p in problems if p.startswith(f"{key}: ")]
    assert mine == [f"{key}: {value} is not a finite number (NaN and infinities are refused)"] \
        or (len(mine) == 1 and "is not of type" in mine[0]), problems


@settings(max_examples=60, deadline=None)
@given(levels=st.integers(1, 12), fanout=st.integers(1, 12),
       key=st.sampled_from(["runner.env", "lora.target_modules", "data.sources", "x"]))
def test_nested_aliases_parse_or_are_refused_without_expanding(tmp_path_factory, levels, fanout,
                                                               key):
    lines, size = [f"a0: &a0 [{', '.join(['v'] * fanout)}]"], 1 + fanout
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]")
        size = 1 + fanout * size
    section, _, leaf = key.partition(".")
    text = "\n".join(lines) + "\n" + (f"{section}: *a{levels - 1}\n" if not leaf else
                                      yaml.safe_dump({k: v for k, v in BASE.items() if k != section})
                                      + f"{section}:\n  {leaf}: *a{levels - 1}\n")
    path = tmp_path_factory.mktemp("alias") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    # every anchor's list once more for the top-level a_i keys: the biggest one decides
    if size > MAX_YAML_VALUES:
        try:
            read_yaml(path)
        except ParamsError as err:
            assert len(err.problems) == 1
            assert "expands to more than 5,000 values once its aliases are expanded" in \
                err.problems[0] or "more than 5,000 values (the limit" in err.problems[0]
        else:
            raise AssertionError(f"{levels} levels x {fanout} ({size} values) was read")
    else:
        try:
            doc = read_yaml(path)
        except ParamsError as err:  # the whole document may still pass the limit
            assert "5,000 values" in err.problems[0]
        else:
            assert _count(doc[f"a{levels - 1}"]) == size
            validate_document(doc, ROOT)


def _count(node) -> int:
    return 1 + sum(_count(c) for c in node) if isinstance(node, list) else 1
