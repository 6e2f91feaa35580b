"""Params are declared once: schema/params.schema.json; medqlora/config.py's dataclasses are
the typed view of it, checked here so the two cannot drift.

The schema holds everything about a key (description, type, default, enum, bounds); each
dataclass declares only the names and Python types of one object of the schema, in the
schema's order, and no default (defaults are filled from the schema before the dataclasses
are built). The expected annotation of every field is derived from the schema below
(`annotation`) and compared with the one written in config.py, section by section.
"""
from __future__ import annotations

import dataclasses

import pytest

from medqlora import config
from medqlora.config import Params, load_schema

SCALARS = {"integer": "int", "number": "float", "boolean": "bool", "string": "str",
           "null": "None"}


def annotation(node: dict, nested: str | None = None) -> str:
    """The Python annotation of a schema node, as config.py writes it.

    `nested`: the dataclass name config.py gives an object (or array of objects) with
    properties; the schema has no class names, so the check takes them from config.py and
    then checks that class against the object's properties.
    """
    if "oneOf" in node:
        return " | ".join(annotation(branch, nested) for branch in node["oneOf"])
    if "const" in node:
        return SCALARS[_json_type(node["const"])]
    kind = node.get("type")
    if kind is None and "enum" in node:  # a closed choice: the type of its values
        return " | ".join(dict.fromkeys(SCALARS[_json_type(v)] for v in node["enum"]))
    if isinstance(kind, list):
        return " | ".join(SCALARS[k] for k in kind)
    if kind == "array":
        return f"tuple[{annotation(node['items'], nested)}, ...]"
    if kind == "object":
        if "properties" in node:
            assert nested, f"an object with properties needs a dataclass: {node}"
            return nested
        return f"dict[str, {annotation(node['additionalProperties'])}]"
    return SCALARS[kind]


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return "number" if isinstance(value, float) else "string"


def _nested_class(annotation_text: str) -> str | None:
    """The config dataclass an annotation names (`DataParams`, `tuple[Source, ...]`)."""
    for word in annotation_text.replace("[", " ").replace(",", " ").replace("]", " ").split():
        if dataclasses.is_dataclass(getattr(config, word, None)):
            return word
    return None


def sections() -> list[tuple[str, type, dict]]:
    """(key path, dataclass, schema object) for Params and every nested dataclass."""
    out, todo = [], [("(top level)", Params, load_schema())]
    while todo:
        path, cls, node = todo.pop(0)
        out.append((path, cls, node))
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, sub in node["properties"].items():
            nested = _nested_class(hints.get(name, ""))
            if nested:
                obj = sub["items"] if sub.get("type") == "array" else sub
                todo.append((name if path == "(top level)" else f"{path}.{name}",
                             getattr(config, nested), obj))
    return out


SECTIONS = sections()


def test_every_object_of_the_schema_has_its_dataclass():
    paths = [path for path, _, _ in SECTIONS]
    assert paths == ["(top level)", "data", "model", "quantization", "lora", "train", "evaluate",
                     "merge", "package", "runner", "data.sources", "train.fast_path",
                     "evaluate.benchmarks", "runner.distributed"]


@pytest.mark.parametrize("path,cls,node", SECTIONS, ids=[p for p, _, _ in SECTIONS])
def test_dataclass_declares_the_schema_keys_in_order_with_their_types(path, cls, node):
    fields = [f for f in dataclasses.fields(cls) if not (cls is Params and f.name == "raw")]
    declared = {f.name: f.type for f in fields}
    expected = {name: annotation(sub, _nested_class(declared.get(name, "")))
                for name, sub in node["properties"].items()}
    assert list(declared) == list(expected), f"{path}: keys differ from the schema's"
    wrong = {name: (declared[name], want) for name, want in expected.items()
             if declared[name] != want}
    assert not wrong, f"{path}: config.py type vs schema type: {wrong}"


@pytest.mark.parametrize("path,cls,node", SECTIONS, ids=[p for p, _, _ in SECTIONS])
def test_defaults_and_choices_live_in_the_schema_only(path, cls, node):
    # A default in a dataclass would be a second declaration that the schema's could leave.
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING]
    assert with_default == []
    undocumented = [name for name, sub in node["properties"].items() if not sub.get("description")]
    assert undocumented == [], f"{path}: schema keys without a description"


def test_the_derivation_catches_drift():
    # The check above can fail: a renamed key, a changed type and a new enum value type each do.
    assert annotation({"type": ["number", "null"]}) == "float | None"
    assert annotation({"oneOf": [{"type": "array", "items": {"type": "string"}},
                                 {"const": "all-linear"}]}) == "tuple[str, ...] | str"
    assert annotation({"enum": ["a", "b", None]}) == "str | None"
    assert annotation({"type": "object", "additionalProperties": {"type": "string"}}) \
        == "dict[str, str]"
    assert annotation({"type": "integer"}) != "float"
