"""The stage contract, declared once in dvc.yaml and enforced by the machine.

A stage's `params:` list in dvc.yaml names the settings whose change re-runs it; its `deps:`
list names its entrypoint and every medqlora module it imports. Both are kept honest here:

- params: `stage.start` hands the library `restrict(params, stage)`, a view of params.yaml
  with only what dvc.yaml declares for that stage. Reading anything else raises
  UndeclaredParams, naming the line to add to dvc.yaml (an undeclared read would let the cache
  go stale without a word: change the value, DVC re-runs nothing).

      prepare:
        params: [data, model.base]      # params.data.* and params.model.base; nothing else

- deps: `module_closure(script)` follows every import of an entrypoint (function-level ones
  too) through the medqlora package; tests/test_contract.py compares it with dvc.yaml.

`runner` (except `runner.distributed`, which train declares) is read by `stage.start` before
the view is made: it chooses where a stage runs (host or container), not what it computes.
"""
from __future__ import annotations

import ast
import dataclasses
import types
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "dvc.yaml"
PARAMS_FILE = "params.yaml"
# Project files a module reads by itself (not through a path argument): deps of every stage
# that imports the module. The schema fills in defaults, so it shapes the resolved params;
# task_data.py is copied into the benchmark stage's task folder.
MODULE_FILES = {"medqlora/core/config.py": ("schema/params.schema.json",),
                "medqlora/evaluate/benchmarks.py": ("medqlora/evaluate/task_data.py",)}

Allowed = dict[str, Any]  # key -> True (all of it) or a nested Allowed (some of its keys)


class UndeclaredParams(RuntimeError):
    """A stage read a setting that dvc.yaml does not list under its `params:`."""

    def __init__(self, stage: str, key: str):
        self.stage, self.key = stage, key
        super().__init__(
            f"stage {stage} reads params {key}, which dvc.yaml does not declare for it: add "
            f"`- {key}` to stages.{stage}.params in dvc.yaml (else changing {key} would not "
            f"re-run {stage})")


# ---------------------------------------------------------------- dvc.yaml

def load_pipeline(path: str | Path = PIPELINE) -> dict[str, Any]:
    """dvc.yaml's `stages` mapping."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))["stages"]


def declared_keys(stage: str, pipeline: dict[str, Any] | None = None) -> list[str]:
    """The dotted params.yaml keys a stage declares (`seed`, `data`, `model.base`, ...)."""
    pipeline = load_pipeline() if pipeline is None else pipeline
    if stage not in pipeline:
        raise KeyError(f"dvc.yaml has no stage {stage!r} (stages: {', '.join(pipeline)})")
    keys: list[str] = []
    for entry in pipeline[stage].get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # `- other.yaml: [a, b]`: only params.yaml is ours
            keys.extend(entry.get(PARAMS_FILE) or [])
    return keys


def allowed_tree(keys: list[str]) -> Allowed:
    """['data', 'model.base'] -> {'data': True, 'model': {'base': True}}."""
    tree: Allowed = {}
    for key in keys:
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            if node.get(part) is True:
                break
            node = node.setdefault(part, {})
        else:
            node[last] = True
    return tree


# ---------------------------------------------------------------- the params view

class _Mapping(dict):
    """The declared part of a params mapping (`params.raw`); undeclared keys raise."""

    def __init__(self, full: dict, allowed: Allowed, stage: str, path: str):
        super().__init__()
        self._known, self._stage, self._path = set(full), stage, path
        for key, sub in allowed.items():
            if key in full:
                value = full[key]
                dict.__setitem__(self, key, value if sub is True or not isinstance(value, dict)
                                 else _Mapping(value, sub, stage, _join(path, key)))

    def _check(self, key) -> None:
        if key in self._known and not dict.__contains__(self, key):
            raise UndeclaredParams(self._stage, _join(self._path, key))

    def __getitem__(self, key):
        self._check(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._check(key)
        return dict.get(self, key, default)


class _View:
    """A params dataclass (Params or one of its sections) restricted to the declared fields.

    Methods and properties run against the view (`params.section(...)` reads the restricted
    `raw`; `model.is_local` reads the view's `base`), so they cannot read around it.
    """

    def __init__(self, value: Any, allowed: Allowed, stage: str, path: str = ""):
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_fields", {f.name for f in dataclasses.fields(value)})

    def __getattr__(self, name: str):
        value, allowed = self._value, self._allowed
        if name == "raw" and isinstance(getattr(value, "raw", None), dict):
            return _Mapping(value.raw, allowed, self._stage, self._path)
        if name in self._fields:
            sub = allowed.get(name)
            if sub is None:
                raise UndeclaredParams(self._stage, _join(self._path, name))
            field = getattr(value, name)
            if sub is True or not dataclasses.is_dataclass(field):
                return field
            return _View(field, sub, self._stage, _join(self._path, name))
        attr = getattr(type(value), name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        return getattr(value, name)

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __repr__(self) -> str:
        return f"<{type(self._value).__name__} of stage {self._stage}: {sorted(self._allowed)}>"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def restrict(params, stage: str, pipeline: dict[str, Any] | None = None):
    """`params` (config.Params) as stage `stage` may read it: what dvc.yaml declares, no more."""
    if isinstance(params, _View):
        return params
    return _View(params, allowed_tree(declared_keys(stage, pipeline)), stage)


# ---------------------------------------------------------------- module closure

def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_modules(path: Path, root: Path = ROOT, package: str = "medqlora") -> set[str]:
    """Dotted names of the `package` modules a file imports anywhere (functions included;
    `if TYPE_CHECKING:` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skip.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = path.with_suffix("").relative_to(root).parts[:-node.level]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] == package:
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # maybe submodules
    return found


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """medqlora.x -> medqlora/x.py (or x/__init__.py); None when `name` is not a module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_closure(script: str | Path, root: Path = ROOT) -> dict[str, str]:
    """Every project file a stage script runs: {relative path: the file that imports it}.

    The script, each medqlora module reached through imports (and the package __init__ every
    import runs), and the files those modules read by themselves (MODULE_FILES).
    """
    script = Path(script)
    start = script.relative_to(root).as_posix() if script.is_absolute() else script.as_posix()
    seen: dict[str, str] = {start: start}
    todo = [root / start]
    while todo:
        current = todo.pop()
        importer = current.relative_to(root).as_posix()
        names = set()
        for name in imported_modules(current, root):
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for name in sorted(names):
            path = module_file(name, root)
            if path is None:
                continue
            rel = path.relative_to(root).as_posix()
            if rel not in seen:
                seen[rel] = importer
                todo.append(path)
                for extra in MODULE_FILES.get(rel, ()):
                    seen.setdefault(extra, rel)
    return seen


def stage_script(stage: str, pipeline: dict[str, Any] | None = None) -> str:
    """The entrypoint a stage's cmd runs (`python stages/train.py ...` -> stages/train.py)."""
    pipeline = load_pipeline() if pipeline is None else pipeline
    words = pipeline[stage]["cmd"].split()
    scripts = [w for w in words if w.endswith(".py")]
    if not scripts:
        raise ValueError(f"stages.{stage}.cmd runs no .py script: {pipeline[stage]['cmd']}")
    return scripts[0]


def library_calls(script: str | Path, root: Path = ROOT) -> list[tuple[str, str]]:
    """(module, function) of each medqlora call a stage script hands `params` to, e.g.
    [("medqlora.train.training", "run")]: where the library takes over (tests enforce the view there
    too, for the tests that call the library without the entrypoint)."""
    path = root / script
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medqlora"):
            for alias in node.names:
                name = alias.asname or alias.name
                if module_file(f"{node.module}.{alias.name}", root):
                    bound[name] = (f"{node.module}.{alias.name}", None)
                else:
                    bound[name] = (node.module, alias.name)
    calls = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "params"):
            continue
        func = node.func
        if isinstance(func, ast.Name) and bound.get(func.id, (None, None))[1]:
            calls.append(bound[func.id])
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id in bound and bound[func.value.id][1] is None):
            calls.append((bound[func.value.id][0], func.attr))
    return sorted(set(calls))
