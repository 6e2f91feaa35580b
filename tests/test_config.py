"""params validation: every problem at once, each with its key path; typed settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medqlora.config import ParamsError, build_params, load_params, load_schema, validate_document
from tests.conftest import ROOT, write_params


def problems_for(tmp_path: Path, overrides: dict) -> list[str]:
    path = write_params(tmp_path / "params.yaml", overrides)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    return err.value.problems


def validate_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medqlora.cli", "validate", str(path)],
                          cwd=ROOT, capture_output=True, text=True)


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model.base == "models/tiny-med-llama"
    assert params.quantization.bnb_4bit_quant_type == "nf4"
    assert params.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_is_valid(example):
    assert validate_cli(example).returncode == 0


def test_reference_recipe_values():
    params = load_params(ROOT / "examples" / "mistral-7b-medical.yaml")
    assert params.model.base == "mistralai/Mistral-7B-v0.1"
    assert (params.lora.r, params.lora.lora_alpha, params.lora.lora_dropout) == (64, 16, 0.05)
    t = params.train
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps,
            t.learning_rate, t.warmup_ratio, t.max_grad_norm, t.save_steps,
            t.save_total_limit) == (3, 4, 4, 2e-4, 0.03, 0.3, 100, 2)
    assert params.quantization.bnb_4bit_use_double_quant is True
    assert params.quantization.bnb_4bit_compute_dtype == "bfloat16"


def test_schema_defaults_document_reference_recipe():
    props = load_schema()["properties"]
    lora, train = props["lora"]["properties"], props["train"]["properties"]
    assert lora["r"]["default"] == 64 and lora["lora_alpha"]["default"] == 16
    assert len(lora["target_modules"]["default"]) == 7
    assert train["learning_rate"]["default"] == 2e-4
    assert train["warmup_ratio"]["default"] == 0.03
    assert train["max_grad_norm"]["default"] == 0.3


def _walk(node, path="$"):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_strict_and_documented():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for path, node in _walk(schema):
        assert node.get("description"), f"{path} has no description"
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} allows unknown keys"


def test_params_first_line_points_editors_at_schema():
    first = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=schema/params.schema.json"


def test_all_problems_reported_at_once_with_key_paths(tmp_path):
    problems = problems_for(tmp_path, {
        "lora.r": 0,                       # out of range
        "train.learning_rate": "fast",     # wrong type
        "train.learing_rate": 0.1,         # unknown key, a typo of a known one
        "lora.target_modules": [],         # cross-field: empty
        "data.val_fraction": 0.5,          # cross-field with test_fraction
        "data.test_fraction": 0.5,
        "quantization.bnb_4bit_quant_type": "nf5",
    })
    assert "lora.r: 0 is less than the minimum of 1" in problems
    assert "train.learning_rate: 'fast' is not of type 'number'" in problems
    assert "train.learing_rate: unknown key (did you mean 'learning_rate'?)" in problems
    assert any(p.startswith("lora.target_modules: is empty") for p in problems)
    assert any(p.startswith("data.val_fraction + data.test_fraction: 0.5 + 0.5") for p in problems)
    assert "quantization.bnb_4bit_quant_type: 'nf5' is not one of ['nf4', 'fp4']" in problems
    assert len(problems) == 6


def test_missing_required_key_and_section(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    del doc["model"]["base"]
    del doc["runner"]
    problems = validate_document(doc, ROOT)
    assert sorted(problems) == ["model.base: required key is missing",
                                "runner: required key is missing"]


def test_nested_list_paths_and_missing_files(tmp_path):
    problems = problems_for(tmp_path, {"data.sources.1.format": "xml",
                                       "data.sources.2.path": "data/raw/nope.jsonl"})
    assert "data.sources[1].format: 'xml' is not one of ['alpaca', 'chat', 'mcq']" in problems
    assert any(p.startswith("data.sources[2].path: data/raw/nope.jsonl not found")
               for p in problems)


def test_cli_exit_codes_and_one_line_per_problem(tmp_path):
    good = validate_cli(ROOT / "params.yaml")
    assert good.returncode == 0, good.stderr
    bad = write_params(tmp_path / "bad.yaml", {"lora.r": -3, "seed": "x", "merge.colour": 1})
    out = validate_cli(bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4
    assert "lora.r: -3 is less than the minimum of 1" in lines
    assert "seed: 'x' is not of type 'integer'" in lines
    assert any(l.startswith("merge.colour: unknown key") for l in lines)
    assert lines[-1].endswith("3 problem(s)")


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ndata:\n  sources: [\n", encoding="utf-8")
    out = validate_cli(path)
    assert out.returncode == 2
    assert f"{path}:4:1: invalid YAML" in out.stderr


def test_duplicate_keys_are_errors(tmp_path):
    path = tmp_path / "dup.yaml"
    text = (ROOT / "params.yaml").read_text(encoding="utf-8") + "\nseed: 7\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert "duplicate key 'seed'" in err.value.problems[0]


def test_defaults_filled_from_schema():
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["train"] = {}
    doc["lora"] = {}
    params = build_params(doc)
    assert params.train.learning_rate == 2e-4 and params.train.gradient_accumulation_steps == 4
    assert params.lora.r == 64 and len(params.lora.target_modules) == 7


def test_distributed_cross_field_rules(tmp_path):
    problems = problems_for(tmp_path, {"runner.distributed.num_machines": 2,
                                       "runner.distributed.machine_rank": 2})
    assert "runner.distributed.machine_rank: 2 must be below num_machines (2)" in problems
    assert "runner.distributed.main_process_ip: required when num_machines > 1" in problems


def test_include_merged_needs_merge(tmp_path):
    problems = problems_for(tmp_path, {"merge.enabled": False, "package.include_merged": True})
    assert problems == ["package.include_merged: true needs merge.enabled: true"]
