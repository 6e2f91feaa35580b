"""Params are declared once: schema/params.schema.json. medqlora/core/settings.py, the dataclasses
the stages use (through medqlora.core.config), is generated from it by scripts/make_settings.py.

The committed file must be exactly what the generator writes for the committed schema; the
other tests show that the generator follows the schema (a changed type, a new key) and refuses
what it cannot name (an object without a class name, a key without a description).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import sys

import pytest

from conftest import ROOT
from medqlora.core import config
from medqlora.core import settings

sys.path.insert(0, str(ROOT / "scripts"))
import make_settings  # noqa: E402  (a script, not a package)

SCHEMA = config.load_schema()


def test_settings_py_is_what_the_schema_generates():
    committed = make_settings.OUT.read_text(encoding="utf-8")
    assert committed == make_settings.render(SCHEMA), (
        "medqlora/core/settings.py differs from what schema/params.schema.json generates: run "
        f"`{make_settings.COMMAND}` (or `make settings`) and commit the result")


def test_every_object_of_the_schema_has_its_class():
    found = [(path, name) for path, name, _ in make_settings.classes(SCHEMA)]
    assert found == [("data.sources[i]", "Source"), ("data.heldout_sources[i]", "Source"),
                     ("data", "DataParams"),
                     ("model", "ModelParams"), ("quantization", "QuantizationParams"),
                     ("lora", "LoraParams"), ("train.fast_path", "FastPathParams"),
                     ("train", "TrainParams"), ("evaluate.benchmarks[i]", "BenchmarkParams"),
                     ("evaluate", "EvaluateParams"), ("merge", "MergeParams"),
                     ("package", "PackageParams"), ("runner.distributed", "DistributedParams"),
                     ("runner", "RunnerParams"), ("", "Params")]


@pytest.mark.parametrize("path,name,node", make_settings.classes(SCHEMA),
                         ids=[name for _, name, _ in make_settings.classes(SCHEMA)])
def test_config_exports_each_class_with_the_schema_keys_and_no_defaults(path, name, node):
    cls = getattr(config, name)
    assert cls is getattr(settings, name)
    extras = [key for key, _, _ in make_settings.EXTRA_FIELDS.get(name, [])]
    assert [f.name for f in dataclasses.fields(cls)] == [*node["properties"], *extras], \
        f"{path or '(top level)'}: {name} does not declare the schema's keys in order"
    # A default here would be a second declaration that the schema's could leave.
    assert [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING] == []


def test_the_hand_written_methods_survive():
    params = config.build_params(config.read_yaml(ROOT / "params.yaml"))
    assert params.section("seed", "lora") == {"seed": params.seed, "lora": params.raw["lora"]}
    assert params.model.is_local  # the embedded default's tiny model is a folder
    assert not dataclasses.replace(params.model, base="mistralai/Mistral-7B-v0.1").is_local
    assert config.SECTIONS == tuple(SCHEMA["properties"])


def _class_body(text: str, name: str) -> list[ast.stmt]:
    """The statements of class `name` in a generated module."""
    return next(node.body for node in ast.parse(text).body
                if isinstance(node, ast.ClassDef) and node.name == name)


def _fields(text: str, name: str) -> list[str]:
    """`key: annotation` of each field of class `name` in a generated module."""
    return [f"{node.target.id}: {ast.unparse(node.annotation)}"
            for node in _class_body(text, name) if isinstance(node, ast.AnnAssign)]


def test_an_edited_schema_generates_a_different_module():
    schema = copy.deepcopy(SCHEMA)
    lora = schema["properties"]["lora"]["properties"]
    assert _fields(make_settings.render(schema), "LoraParams")[:2] == ["r: int",
                                                                       "lora_alpha: float"]
    lora["r"]["type"] = "number"
    lora["use_qalora"] = {"description": "New switch.", "type": ["boolean", "null"]}
    text = make_settings.render(schema)
    assert text != make_settings.OUT.read_text(encoding="utf-8")
    fields = _fields(text, "LoraParams")
    assert fields[0] == "r: float"
    assert fields[-1] == "use_qalora: bool | None"


def test_an_object_without_a_class_name_or_a_key_without_description_is_refused():
    schema = copy.deepcopy(SCHEMA)
    schema["properties"]["train"]["properties"]["fast_path"]["properties"]["paged"] = {
        "description": "A new nested object.", "type": "object",
        "properties": {"on": {"description": "On.", "type": "boolean"}}}
    with pytest.raises(make_settings.SchemaError, match=r"^train\.fast_path\.paged: no class"):
        make_settings.render(schema)
    schema = copy.deepcopy(SCHEMA)
    del schema["properties"]["runner"]["properties"]["distributed"]
    with pytest.raises(make_settings.SchemaError, match="names runner.distributed, which"):
        make_settings.render(schema)
    schema = copy.deepcopy(SCHEMA)
    del schema["properties"]["lora"]["properties"]["r"]["description"]
    with pytest.raises(make_settings.SchemaError, match=r"^lora\.r: no description"):
        make_settings.render(schema)


def test_a_description_with_quotes_and_backslashes_stays_one_docstring():
    schema = copy.deepcopy(SCHEMA)
    text = 'A regex \\d+ or """three quotes""", ending on "all-linear"'
    schema["properties"]["lora"]["properties"]["bias"]["description"] = text
    body = _class_body(make_settings.render(schema), "LoraParams")
    after = {prev.target.id: node.value.value for prev, node in zip(body, body[1:])
             if isinstance(prev, ast.AnnAssign)}
    assert " ".join(after["bias"].split()) == text


def test_the_annotation_of_each_kind_of_schema_node():
    assert make_settings.annotation({"type": ["number", "null"]}) == "float | None"
    assert make_settings.annotation({"oneOf": [{"type": "array", "items": {"type": "string"}},
                                               {"const": "all-linear"}]}) \
        == "tuple[str, ...] | str"
    assert make_settings.annotation({"enum": ["a", "b", None]}) == "str | None"
    assert make_settings.annotation({"enum": [True, 1, 2.5]}) == "bool | int | float"
    assert make_settings.annotation({"type": "object", "additionalProperties": {
        "type": "string"}}) == "dict[str, str]"
    assert make_settings.annotation({"type": "array", "items": {
        "type": "object", "properties": {}}}, "Source") == "tuple[Source, ...]"
    assert make_settings.annotation({"type": "integer"}) == "int"
