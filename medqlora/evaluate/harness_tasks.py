"""lm-evaluation-harness task files made self-contained, so that a generated task folder's bytes
do not depend on where the checkout or the venv lies.

A harness task file names its prompt functions (`doc_to_text: !function
preprocess_medqa.doc_to_text`), which lm_eval resolves next to the file, and may `include`
other files by path. `flatten` merges the includes as lm_eval does (lm_eval/tasks/
_yaml_loader.py `load_yaml`: included keys first, the file's own keys win, `task_list`
dropped) and keeps every `!function` as written; `write` dumps the merged task and copies the
modules those functions live in beside it. Nothing in the folder then points outside it:
neither at the harness's install path (inside the venv) nor at the checkout.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml


class Function(str):
    """A `!function module.name` reference of a task file, kept as written."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `!function` as a Function instead of refusing it."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes a Function back as `!function module.name`."""


_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
_Dumper.add_representer(Function, lambda dumper, ref: dumper.represent_scalar("!function", ref))


def functions(node: Any) -> list[Function]:
    """Every `!function` reference in a config, nested ones (filters, metrics) included."""
    if isinstance(node, Function):
        return [node]
    if isinstance(node, dict):
        return [ref for value in node.values() for ref in functions(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in functions(value)]
    return []


def _modules(config: dict[str, Any], folder: Path) -> dict[str, Path]:
    """{module file relative to the task file: its path} for each function defined next to the
    task file (lm_eval looks there first; a function it imports by module name needs no copy)."""
    found = {}
    for ref in functions(config):
        rel = f"{ref.rpartition('.')[0].replace('.', '/')}.py"
        if (folder / rel).is_file():
            found[rel] = folder / rel
    return found


def flatten(path: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(the task config with its includes merged, the module files its functions need)."""
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    includes = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    modules: dict[str, Path] = {}
    for name in includes if isinstance(includes, list) else [includes]:
        included, needed = flatten(Path(name) if Path(name).is_absolute() else path.parent / name)
        included.pop("task_list", None)
        merged.update(included)
        for rel, source in needed.items():
            _add_module(modules, rel, source)
    merged.update(config)
    for rel, source in _modules(config, path.parent).items():
        _add_module(modules, rel, source)
    return merged, modules


def _add_module(modules: dict[str, Path], rel: str, source: Path) -> None:
    # After flattening every function resolves next to the one task file: two modules of one
    # name from different folders could not both be there.
    if rel in modules and modules[rel].read_bytes() != source.read_bytes():
        raise ValueError(f"{rel}: {modules[rel]} and {source} differ; one task folder cannot "
                         "hold both")
    modules[rel] = source


def write(path: Path, config: dict[str, Any], modules: dict[str, Path], header: str) -> None:
    """`path` (a task YAML, keys in the order given) and a copy of each module beside it."""
    for rel, source in sorted(modules.items()):
        target = path.parent / rel
        if target.is_file() and target.read_bytes() != source.read_bytes():
            raise ValueError(f"{target}: two tasks need different modules of this name")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    path.write_text(header + yaml.dump(config, Dumper=_Dumper, sort_keys=False,
                                       allow_unicode=True), encoding="utf-8")
