"""Write medqlora/core/settings.py, the typed params, from schema/params.schema.json.

    python scripts/make_settings.py     # or: make settings

Params are declared once, in the schema (description, type, default, enum, bounds). This
script turns each object of the schema into a frozen dataclass: its keys in schema order, each
annotated with the Python type of its schema node (`annotation`) and documented with its
schema description. Defaults stay in the schema: config.build_params fills them in before
building. The schema names no classes, so CLASSES below does; methods the classes carry live
in the hand-written medqlora/core/settings_methods.py (METHODS). Stdlib only; deterministic:
tests/test_config_schema.py regenerates the text and fails when the committed file differs.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema" / "params.schema.json"
OUT = ROOT / "medqlora" / "core" / "settings.py"
COMMAND = "python scripts/make_settings.py"

# Class name of every schema object with properties, by key path ("" is the whole file,
# "[i]" an item of an array). A new object in the schema needs a line here.
CLASSES = {
    "": "Params",
    "data": "DataParams",
    "data.sources[i]": "Source",
    "data.heldout_sources[i]": "Source",
    "model": "ModelParams",
    "quantization": "QuantizationParams",
    "lora": "LoraParams",
    "train": "TrainParams",
    "train.fast_path": "FastPathParams",
    "evaluate": "EvaluateParams",
    "evaluate.benchmarks[i]": "BenchmarkParams",
    "merge": "MergeParams",
    "package": "PackageParams",
    "runner": "RunnerParams",
    "runner.distributed": "DistributedParams",
}
# Hand-written bases (medqlora/core/settings_methods.py) for classes that have methods.
METHODS = {"Params": "ParamsMethods", "ModelParams": "ModelMethods"}
# Fields that are not params keys: (name, annotation, description), after the schema's keys.
EXTRA_FIELDS = {
    "Params": [("raw", "dict[str, Any]",
                "The validated mapping with defaults filled, as stages record it in meta.json.")],
}
SCALARS = {"integer": "int", "number": "float", "boolean": "bool", "string": "str",
           "null": "None"}
WIDTH = 100


class SchemaError(ValueError):
    """The schema (or CLASSES) cannot be turned into dataclasses; names the key path."""


def annotation(node: dict, nested: str | None = None) -> str:
    """The Python annotation of a schema node (`nested`: the class of an object with keys).

    A choice (oneOf, a type list, an enum) is the union of its branches' types; an array is a
    tuple (the settings are frozen); a free mapping is a dict.
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
            if not nested:
                raise SchemaError(f"an object with properties needs a class name: {node}")
            return nested
        return f"dict[str, {annotation(node['additionalProperties'])}]"
    return SCALARS[kind]


def _json_type(value) -> str:
    """The JSON Schema type of a literal (a const or an enum value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: True is an int in Python
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return "number" if isinstance(value, float) else "string"


def _object_of(node: dict) -> dict | None:
    """The object with properties a key holds, itself or as array items (else None)."""
    if "properties" in node:
        return node
    items = node.get("items")
    return items if isinstance(items, dict) and "properties" in items else None


def _join(path: str, name: str, node: dict) -> str:
    """Key path of `name` under `path`, with [i] when it holds an array of objects."""
    full = f"{path}.{name}" if path else name
    return f"{full}[i]" if "properties" not in node and _object_of(node) else full


def classes(schema: dict) -> list[tuple[str, str, dict]]:
    """(key path, class name, schema object) of every object, nested ones before their user."""
    out = []

    def visit(path: str, node: dict):
        for name, sub in node["properties"].items():
            if _object_of(sub):
                visit(_join(path, name, sub), _object_of(sub))
        if path not in CLASSES:
            raise SchemaError(f"{path or '(top level)'}: no class name for this schema object; add one to "
                              "CLASSES in scripts/make_settings.py")
        out.append((path, CLASSES[path], node))

    visit("", schema)
    stale = sorted(set(CLASSES) - {path for path, _, _ in out})
    if stale:
        raise SchemaError(f"CLASSES in scripts/make_settings.py names {', '.join(stale)}, "
                          "which the schema does not have")
    return out


def _docstring(text: str) -> str:
    """`text` as a class-body docstring wrapped to WIDTH; escapes what would end it early."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if text.endswith('"'):
        text = text[:-1] + '\\"'
    return textwrap.fill(text, WIDTH - 3, initial_indent='    """',
                         subsequent_indent="    ", break_long_words=False,
                         break_on_hyphens=False) + '"""'


def _description(path: str, node: dict) -> str:
    """The schema description of the key at `path`; every key and object needs one."""
    if not node.get("description"):
        raise SchemaError(f"{path or '(top level)'}: no description in schema/params.schema.json; "
                          "every key needs one")
    return node["description"]


def render_class(path: str, name: str, node: dict) -> str:
    """One frozen dataclass: a docstring from the object's description, then each key."""
    base = f"({METHODS[name]})" if name in METHODS else ""
    summary = f"{path or 'params.yaml'}: {_description(path, node)}"
    lines = ["@dataclass(frozen=True)", f"class {name}{base}:", _docstring(summary)]
    for key, sub in node["properties"].items():
        where = _join(path, key, sub)
        lines += [f"    {key}: {annotation(sub, CLASSES.get(where))}",
                  _docstring(_description(where, sub))]
    for key, kind, text in EXTRA_FIELDS.get(name, []):
        lines += [f"    {key}: {kind}", _docstring(text)]
    return "\n".join(lines) + "\n"


HEADER = f'''\
# Generated from schema/params.schema.json by `{COMMAND}`: do not edit.
# After editing the schema, run that command (or `make settings`) and commit both files;
# tests/test_config_schema.py fails while they differ.
"""Typed params: one frozen dataclass per object of schema/params.schema.json.

Keys, their order, types and descriptions come from the schema; defaults and bounds stay there
(config.build_params fills the defaults in before building these). Import them from
medqlora.core.config, which loads and validates params.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medqlora.core.settings_methods import {", ".join(sorted(METHODS.values()))}
'''


def render(schema: dict) -> str:
    """The text of medqlora/core/settings.py for `schema`."""
    # A class used at several paths (data.sources[i], data.heldout_sources[i]) is written once,
    # with the first path's docstring; the schema must give it the same keys everywhere.
    first: dict[str, dict] = {}
    for path, name, node in classes(schema):
        if name in first and first[name]["properties"] != node["properties"]:
            raise SchemaError(f"{path}: class {name} is used with other keys elsewhere; give it "
                              "its own name in CLASSES")
        first.setdefault(name, {"path": path, **node})
    return HEADER + "".join(f"\n\n{render_class(node.pop('path'), name, node)}"
                            for name, node in first.items())


def main() -> None:
    """Regenerate medqlora/core/settings.py from the schema."""
    text = render(json.loads(SCHEMA.read_text(encoding="utf-8")))
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({text.count('@dataclass')} classes)")


if __name__ == "__main__":
    main()
