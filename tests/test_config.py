"""params validation: every problem at once, each with its key path; typed settings."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medqlora.core.config import (ParamsError, build_params, load_params, load_schema,
                                  validate_document)
from tests.conftest import ROOT, set_key, write_params


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


def test_whole_number_floats_in_integer_keys_are_all_reported_by_validate(tmp_path):
    # JSON Schema counts 42.0 as an integer: these passed validation, then train died in
    # set_seed with a numpy TypeError.
    path = write_params(tmp_path / "floats.yaml", {
        "seed": 42.0, "lora.r": 16.0, "train.per_device_train_batch_size": 8.0,
        "train.save_steps": 25.0, "evaluate.max_new_tokens": 64.0, "runner.gpus": 2.0,
        "evaluate.max_examples": 10.0,   # integer or null
        "train.max_steps": 2.5,          # not whole: no "write" hint
        "lora.lora_alpha": 16.0,         # a number key: 16.0 is fine
    })
    assert "seed: 42.0" in path.read_text(encoding="utf-8")  # the file says 42.0, not 42
    out = validate_cli(path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "evaluate.max_examples: 10.0 is not of type 'integer', 'null'; write 10",
        "evaluate.max_new_tokens: 64.0 is not of type 'integer'; write 64",
        "lora.r: 16.0 is not of type 'integer'; write 16",
        "runner.gpus: 2.0 is not of type 'integer'; write 2",
        "seed: 42.0 is not of type 'integer'; write 42",
        "train.max_steps: 2.5 is not of type 'integer'",
        "train.per_device_train_batch_size: 8.0 is not of type 'integer'; write 8",
        "train.save_steps: 25.0 is not of type 'integer'; write 25",
        f"{path}: 8 problem(s)",
    ]


def test_look_alike_and_invisible_characters_in_keys_are_named(tmp_path):
    # Each unknown key below prints exactly like the key that was meant.
    path = tmp_path / "params.yaml"
    path.write_text(params_text({
        "  learning_rate: 0.003": "  learning_r\u0430te: 0.003",   # Cyrillic small a
        "  lora_alpha: 32": "  lora_alpha\u200b: 32",              # zero-width space at the end
        "bnb_4bit_quant_type: nf4": "bnb_4bit_quant_type: n\uff46\u200d4",  # fullwidth f, ZWJ
    }), encoding="utf-8")
    out = validate_cli(path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "lora.lora_alpha\u200b: unknown key: character 11 is U+200B ZERO WIDTH SPACE, not plain "
        "ASCII (did you mean 'lora_alpha'?)",
        "quantization.bnb_4bit_quant_type: 'n\uff46\\u200d4' is not one of ['nf4', 'fp4']; "
        "character 2 is U+FF46 FULLWIDTH LATIN SMALL LETTER F, character 3 is U+200D ZERO WIDTH "
        "JOINER, not plain ASCII",
        "train.learning_r\u0430te: unknown key: character 11 is U+0430 CYRILLIC SMALL LETTER A, "
        "not plain ASCII (did you mean 'learning_rate'?)",
        f"{path}: 3 problem(s)",
    ]


def test_unusual_characters_are_listed_up_to_a_limit():
    from medqlora.core.config import unusual_characters
    assert unusual_characters("learning_rate") == ""
    assert unusual_characters("a\tb\x7f") == ("character 2 is U+0009 (a control character), "
                                              "character 4 is U+007F (a control character)")
    assert unusual_characters("\u5b66\u4e60\u7387\u738b\u738b") == (
        "character 1 is U+5B66 CJK UNIFIED IDEOGRAPH-5B66, character 2 is U+4E60 CJK UNIFIED "
        "IDEOGRAPH-4E60, character 3 is U+7387 CJK UNIFIED IDEOGRAPH-7387 and 2 more")


def _integer_keys(schema: dict, prefix: str = ""):
    """Dotted paths of every mapping key whose schema takes an integer (directly or in a oneOf)."""
    for name, sub in schema.get("properties", {}).items():
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "integer" in types + [branch.get("type") for branch in sub.get("oneOf", [])]:
            yield prefix + name
        yield from _integer_keys(sub, f"{prefix}{name}.")


def test_every_integer_key_refuses_a_whole_float_and_types_an_int():
    keys = sorted(_integer_keys(load_schema()))
    # 28 integer keys in the schema, less the 2 inside evaluate.benchmarks[] items.
    assert len(keys) == 26 and {"seed", "runner.gpus", "evaluate.max_examples"} <= set(keys)
    for key in keys:
        doc = yaml.safe_load(params_text())
        set_key(doc, key, 3.0)
        typed = [p for p in validate_document(doc, ROOT) if "is not of type" in p]
        assert len(typed) == 1 and typed[0].startswith(f"{key}: 3.0 is not of type 'integer'")
        assert typed[0].endswith("; write 3"), typed
    params = load_params(ROOT / "params.yaml")
    assert type(params.seed) is int and type(params.lora.r) is int
    assert type(params.train.save_steps) is int and type(params.evaluate.max_new_tokens) is int


# ---------------------------------------------------------------- hostile and degenerate files

def billion_laughs(levels: int = 9) -> str:
    """`levels` anchors, each a list of 9 aliases to the one before: 9^levels values."""
    lines = ['x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def params_text(replace: dict[str, str] | None = None, append: str = "") -> str:
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return text + append


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    # Anchors at the top (unknown keys) and the 387,420,489-value list under runner.env,
    # which the schema would otherwise walk item by item: it hung until killed.
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs() + params_text({"  env: []": "  env: *x8"}),
                    encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "medqlora.cli", "validate", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # a hang fails, not blocks
    assert out.returncode == 2
    # x3 (line 4) is the first value over the limit: 1 + 9 x (1 + 9 x (1 + 9 x 10)) = 7,381
    assert out.stderr.splitlines() == [
        f"{path}:4:5: expands to more than 5,000 values once its aliases are expanded (the "
        "limit for a params file); write the values out, or use fewer aliases",
        f"{path}: 1 problem(s)"]


# Line numbers of the appended text: the first line after the shipped params.yaml, and the
# line of runner.env in it.
_SHIPPED = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines()
END = len(_SHIPPED) + 1
ENV_LINE = _SHIPPED.index("  env: []") + 1


@pytest.mark.parametrize("text, problem", [
    (params_text(append="loop: &a [1, *a]\n"),
     f":{END}:7: an alias that contains itself (a recursive structure)"),
    (params_text(append="deep: " + "[" * 40 + "]" * 40 + "\n"),
     f":{END}:39: nested deeper than 32 levels (the limit for a params file)"),
    # the scanner's work grows with the square of the depth: refused while scanning
    (params_text(append="deep: " + "[" * 100_000 + "\n"),
     f":{END}:39: nested deeper than 32 levels (the limit for a params file)"),
    (params_text(append="".join(" " * i + f"k{i}:\n" for i in range(40))),
     f":{END + 32}:36: nested deeper than 32 levels (the limit for a params file)"),
    (params_text(append="deep: &d " + "[" * 20 + "]" * 20 + "\nmore: " + "[" * 15 + "*d"
                 + "]" * 15 + "\n"),
     f":{END}:7: nested deeper than 32 levels once its aliases are expanded (the limit for a "
     "params file)"),  # 15 + 1 + 20 levels: named at the anchor
    (params_text({"  env: []": "  env: [" + ", ".join(["[]"] * 6000) + "]"}),
     f":{ENV_LINE}:COL: more than 5,000 values (the limit for a params file)"),
    (params_text({"seed: 42": "seed: " + "9" * 5000}),
     ": invalid YAML: a value cannot be read (Exceeds the limit (4300 digits) for integer "
     "string conversion)"),
])
def test_costly_documents_get_one_clear_problem(tmp_path, text, problem):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    # COL: the column where the 5,001st value starts moves with the keys params.yaml holds
    assert len(err.value.problems) == 1
    assert re.fullmatch(re.escape(f"{path}{problem}").replace("COL", r"\d+"),
                        err.value.problems[0]), err.value.problems


def test_oversized_params_file_directory_and_device_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(params_text(append="# " + "x" * 300_000 + "\n"), encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    size = path.stat().st_size
    assert err.value.problems == [f"{path}: {size:,} bytes; a params file is limited to "
                                  "262,144 bytes (MAX_PARAMS_BYTES)"]
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path)
    assert err.value.problems == [f"{tmp_path}: is a directory, not a params file"]
    with pytest.raises(ParamsError) as err:
        load_params("/dev/zero")                     # endless: never read
    assert err.value.problems == ["/dev/zero: is not a regular file"]


def test_unique_items_of_unsortable_lists_is_linear(tmp_path):
    # jsonschema's own uniqueItems compares every pair when items do not sort: 4,000 mixed
    # items were 8 million comparisons (minutes); ours hashes them.
    items = ", ".join(["[]", "{}"] * 2000)
    problems = problems_for_text(tmp_path, params_text({"  env: []": f"  env: [{items}]"}))
    assert "runner.env[0]: [] is not of type 'string'" in problems
    assert "runner.env[1]: {} is not of type 'string'" in problems
    assert sum(p.startswith("runner.env: [[], {}") and p.endswith("has non-unique elements")
               for p in problems) == 1
    assert max(map(len, problems)) <= 1000  # the 20 KB list is not quoted whole
    assert validate_document({**yaml.safe_load(params_text()), "runner": {
        **yaml.safe_load(params_text())["runner"], "env": ["A", "B", "A"]}}, ROOT) == [
        "runner.env: ['A', 'B', 'A'] has non-unique elements"]


def problems_for_text(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    return err.value.problems


def test_nan_and_infinities_are_refused_with_their_key_paths(tmp_path):
    problems = problems_for_text(tmp_path, params_text({
        "lora_alpha: 32 ": "lora_alpha: .nan ",
        "learning_rate: 0.003 ": "learning_rate: .inf ",
        "max_grad_norm: 0.3": "max_grad_norm: 1.0e+999",  # overflows to inf
        "max_abs_logit_diff: 0.5": "max_abs_logit_diff: -.inf",
        "seed: 42": "seed: .nan",                          # an integer key: a type error
        "val_fraction: 0.1": "val_fraction: .NaN",
    }))
    assert sorted(problems) == [
        "data.val_fraction: nan is not a finite number (NaN and infinities are refused)",
        "lora.lora_alpha: nan is not a finite number (NaN and infinities are refused)",
        "merge.max_abs_logit_diff: -inf is not a finite number (NaN and infinities are refused)",
        "seed: nan is not of type 'integer'",
        "train.learning_rate: inf is not a finite number (NaN and infinities are refused)",
        "train.max_grad_norm: inf is not a finite number (NaN and infinities are refused)",
    ]


def test_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + params_text().encode("utf-8"))
    assert load_params(path).seed == 42


def _project(tmp_path: Path, with_dvc: bool = True) -> Path:
    """A project folder with data/raw/qa.jsonl and (optionally) the real dvc.yaml."""
    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    (project / "data" / "raw" / "qa.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    if with_dvc:
        shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    return project


def _source_problems(project: Path, path: str) -> list[str]:
    doc = yaml.safe_load(params_text())
    doc["data"]["sources"] = [{"path": path, "format": "alpaca"}]
    return validate_document(doc, project)


def test_data_sources_must_lie_inside_what_dvc_tracks_for_prepare(tmp_path):
    project = _project(tmp_path)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    (project / "notes.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (project / "data" / "raw" / "link.jsonl").symlink_to(outside)
    (project / "data" / "raw" / "inside-link.jsonl").symlink_to(project / "data/raw/qa.jsonl")
    (project / "data" / "raw" / "folder.jsonl").mkdir()
    remedy = ("editing it would not re-run prepare and the package lineage would name data DVC "
              "never versioned; copy it under data/raw/ (`dvc add` it if it is large), or add "
              "its folder to the deps of stage prepare in dvc.yaml")
    assert _source_problems(project, "data/raw/qa.jsonl") == []
    assert _source_problems(project, "data/raw/inside-link.jsonl") == []
    assert _source_problems(project, "data/raw/../raw/qa.jsonl") == []
    assert _source_problems(project, "../elsewhere.jsonl") == [
        "data.sources[0].path: ../elsewhere.jsonl lies outside what DVC tracks for the prepare "
        f"stage (data/raw): {remedy}"]
    assert _source_problems(project, str(outside)) == [
        f"data.sources[0].path: {outside} lies outside what DVC tracks for the prepare stage "
        f"(data/raw): {remedy}"]
    assert _source_problems(project, "notes.jsonl") == [
        "data.sources[0].path: notes.jsonl lies outside what DVC tracks for the prepare stage "
        f"(data/raw): {remedy}"]
    assert _source_problems(project, "data/raw/link.jsonl") == [
        "data.sources[0].path: data/raw/link.jsonl lies outside what DVC tracks for the prepare "
        f"stage (data/raw) (a symlink to {outside.resolve()}): {remedy}"]
    assert _source_problems(project, "data/raw/folder.jsonl") == [
        "data.sources[0].path: data/raw/folder.jsonl is a directory; data.sources takes files: "
        "list each file in it as its own source"]


def test_without_dvc_yaml_data_sources_must_lie_inside_the_project(tmp_path):
    project = _project(tmp_path, with_dvc=False)
    (tmp_path / "elsewhere.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert _source_problems(project, "data/raw/qa.jsonl") == []
    assert _source_problems(project, "../elsewhere.jsonl") == [
        f"data.sources[0].path: ../elsewhere.jsonl lies outside the project folder "
        f"{project.resolve()}: nothing versions it; copy it into the project (e.g. under "
        "data/raw/)"]
