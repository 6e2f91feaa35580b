"""The stage contract of dvc.yaml, checked against the code (fast: no model, no DVC run).

- deps: each stage's code deps are exactly the module closure of its entrypoint (every
  medqlora module it imports, directly or not, function-level imports included, plus the files
  those modules read: the schema). A module added to an import chain fails here with the line
  to add to dvc.yaml; so does a dep nothing imports any more.
- params: every `params.<section>[.<key>]` read in a stage's modules is declared under the
  stage's `params:` (a static check at section/key level); at run time the stage gets the view
  of medqlora.core.contract, which raises on any undeclared read (enforced in the tests too: conftest
  hands the same view to the library calls of the stage scripts).

Touching a module a stage imports re-runs that stage: tests/test_pipeline.py checks it on a
real DVC workspace.
"""
from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from medqlora.core import contract
from medqlora.core.config import SECTIONS, build_params, load_schema

PIPELINE = contract.load_pipeline()
STAGES = ("prepare", "train", "evaluate", "benchmark", "merge", "package")
# Modules stage.start runs on the whole params file before it makes the view: validation and
# warnings (config), and the runner choice: where a stage runs, not what it computes.
WHOLE_FILE_READERS = {"medqlora/core/stage.py", "medqlora/core/config.py"}


def params():
    return build_params(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))


def code_deps(stage: str) -> set[str]:
    """The deps of a stage that are project code or files code reads (not data)."""
    extra = {f for files in contract.MODULE_FILES.values() for f in files}
    return {d for d in PIPELINE[stage]["deps"] if d.endswith(".py") or d in extra}


def test_dvc_yaml_has_the_six_stages_with_their_scripts():
    assert tuple(PIPELINE) == STAGES
    for stage in STAGES:
        assert contract.stage_script(stage, PIPELINE) == f"stages/{stage}.py"


@pytest.mark.parametrize("stage", STAGES)
def test_deps_are_the_module_closure_of_the_entrypoint(stage):
    closure = contract.module_closure(contract.stage_script(stage, PIPELINE))
    declared = code_deps(stage)
    problems = [f"add `- {path}` to stages.{stage}.deps in dvc.yaml ({importer} imports it)"
                if path != importer and not path.endswith(".json") else
                f"add `- {path}` to stages.{stage}.deps in dvc.yaml ({importer} reads it)"
                for path, importer in sorted(closure.items()) if path not in declared]
    problems += [f"remove `- {path}` from stages.{stage}.deps in dvc.yaml: {stage} does not "
                 "import it" for path in sorted(declared - set(closure))]
    assert not problems, "\n".join(problems)


def _module_constant(tree: ast.Module, name: str) -> tuple[str, ...]:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                 for t in node.targets)):
            value = ast.literal_eval(node.value)
            return tuple(value)
    return ()


def params_reads(path: Path) -> dict[str, int]:
    """{dotted key: line} of the params a module reads through a name `params`:
    `params.data.max_seq_length`, `params.section("seed", "evaluate")`, `params.raw["model"]`,
    `params.section(*SECTIONS)` with SECTIONS a module-level tuple. Keys deeper than
    section.key are cut at the key; a second name that is no params key (a property such as
    model.is_local) leaves the section."""
    schema = load_schema()["properties"]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads: dict[str, int] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "params"):
            continue
        parent = parents.get(id(node))
        if node.attr in SECTIONS:
            key = node.attr
            if isinstance(parent, ast.Attribute) and parent.attr in schema.get(
                    key, {}).get("properties", {}):
                key = f"{key}.{parent.attr}"
            reads.setdefault(key, node.lineno)
        elif node.attr == "section" and isinstance(parent, ast.Call):
            for arg in parent.args:
                if isinstance(arg, ast.Constant):
                    reads.setdefault(arg.value, node.lineno)
                elif isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name):
                    for name in _module_constant(tree, arg.value.id):
                        reads.setdefault(name, node.lineno)
        elif (node.attr == "raw" and isinstance(parent, ast.Subscript)
              and isinstance(parent.slice, ast.Constant)):
            reads.setdefault(parent.slice.value, node.lineno)
    return reads


def _declared(key: str, tree: contract.Allowed) -> bool:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if node is True:
            return True
    return True  # a section some of whose keys are declared: the run-time view checks which


@pytest.mark.parametrize("stage", STAGES)
def test_params_read_by_the_stage_modules_are_declared(stage):
    tree = contract.allowed_tree(contract.declared_keys(stage, PIPELINE))
    problems = []
    for rel in contract.module_closure(contract.stage_script(stage, PIPELINE)):
        if not rel.endswith(".py") or rel in WHOLE_FILE_READERS:
            continue
        for key, line in params_reads(ROOT / rel).items():
            if not _declared(key, tree):
                problems.append(f"add `- {key}` to stages.{stage}.params in dvc.yaml "
                                f"({rel}:{line} reads it)")
    assert not problems, "\n".join(problems)


def test_static_reader_sees_sections_keys_section_calls_and_raw(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(textwrap.dedent('''
        SECTIONS = ("seed", "lora")
        def f(params):
            t = params.train
            n = params.data.max_seq_length + params.data.packing
            local = params.model.is_local
            params.section("evaluate", *SECTIONS)
            return params.raw["merge"]["enabled"], params.runner.distributed.strategy
    '''), encoding="utf-8")
    assert set(params_reads(module)) == {"train", "data.max_seq_length", "data.packing",
                                         "model", "evaluate", "seed", "lora", "merge",
                                         "runner.distributed"}


# ---------------------------------------------------------------- the run-time view

def test_allowed_tree_of_dotted_keys():
    assert contract.allowed_tree(["seed", "model.base", "model.revision", "data",
                                  "data.packing", "runner.distributed"]) == {
        "seed": True, "model": {"base": True, "revision": True}, "data": True,
        "runner": {"distributed": True}}


def test_prepare_view_reads_only_what_dvc_yaml_declares():
    view = contract.restrict(params(), "prepare")
    assert view.data.max_seq_length == 256 and view.model.base == "models/tiny-med-llama"
    assert view.model.is_local is True  # a property runs against the view (reads base)
    with pytest.raises(contract.UndeclaredParams) as err:
        view.seed
    assert str(err.value) == (
        "stage prepare reads params seed, which dvc.yaml does not declare for it: add `- seed` "
        "to stages.prepare.params in dvc.yaml (else changing seed would not re-run prepare)")
    with pytest.raises(contract.UndeclaredParams, match=r"add `- model.attn_implementation`"):
        view.model.attn_implementation
    with pytest.raises(contract.UndeclaredParams, match=r"add `- train` to stages.prepare"):
        view.train
    # raw (what meta.json records) holds the declared part only, and refuses the rest.
    assert set(view.raw) == {"data", "model"}
    assert set(view.raw["model"]) == {"base", "gguf_file", "revision", "trust_remote_code"}
    with pytest.raises(contract.UndeclaredParams, match="model.attn_implementation"):
        view.raw["model"]["attn_implementation"]
    with pytest.raises(contract.UndeclaredParams, match="lora"):
        view.raw.get("lora")
    assert json.loads(json.dumps(view.raw))["model"] == {
        "base": "models/tiny-med-llama", "gguf_file": None, "revision": None,
        "trust_remote_code": False}
    with pytest.raises(contract.UndeclaredParams, match="quantization"):
        view.section("data", "quantization")
    with pytest.raises(KeyError):  # not a params key at all: an ordinary KeyError
        view.raw["nonsense"]


def test_train_and_package_views():
    full = params()
    train = contract.restrict(full, "train")
    assert train.data.max_seq_length == 256 and train.runner.distributed.num_processes == 1
    assert train.section("seed", "lora") == full.section("seed", "lora")
    with pytest.raises(contract.UndeclaredParams, match="data.packing"):
        train.data.packing
    with pytest.raises(contract.UndeclaredParams, match="runner.backend"):
        train.runner.backend
    package = contract.restrict(full, "package")
    assert (package.evaluate.max_new_tokens, package.package.name) == (64, "medqlora-tiny-med")
    with pytest.raises(contract.UndeclaredParams, match="evaluate.max_examples"):
        package.evaluate.max_examples
    assert contract.restrict(package, "package") is package
    with pytest.raises(Exception):  # read-only, like the frozen dataclass
        package.seed = 1


def test_every_stage_script_hands_params_to_the_library():
    calls = {stage: contract.library_calls(f"stages/{stage}.py") for stage in STAGES}
    assert calls == {"prepare": [("medqlora.data.dataset", "run")],
                     "train": [("medqlora.train.launch", "relaunch"), ("medqlora.train.training", "run")],
                     "evaluate": [("medqlora.evaluate.evaluation", "evaluate")],
                     "benchmark": [("medqlora.evaluate.benchmarks", "benchmark")],
                     "merge": [("medqlora.ship.merging", "run_merge")],
                     "package": [("medqlora.ship.packaging", "build_package")]}


def test_closure_follows_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "medqlora"
    pkg.mkdir()
    (tmp_path / "stages").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from medqlora import c\n"
                              "def f():\n    from medqlora.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import d\ndef g():\n    pass\n")
    (pkg / "c.py").write_text("")
    (pkg / "d.py").write_text("import os\n")
    (tmp_path / "stages" / "s.py").write_text("import medqlora.a\n")
    assert contract.module_closure("stages/s.py", tmp_path) == {
        "stages/s.py": "stages/s.py", "medqlora/__init__.py": "stages/s.py",
        "medqlora/a.py": "stages/s.py", "medqlora/b.py": "medqlora/a.py",
        "medqlora/d.py": "medqlora/b.py"}
