"""Where `data.sources` files may live: inside the inputs DVC tracks for the prepare stage.

    problem = path_problem("data/raw/qa.jsonl", Path.cwd())   # None, or what is wrong

DVC re-runs prepare when one of its `deps` in dvc.yaml changes, and records their hashes in
dvc.lock. A source outside those deps (`../elsewhere.jsonl`, an absolute path, a symlink in
data/raw/ pointing out of it) would be read and trained on, but editing it would never re-run
prepare, and the package's lineage would name data DVC never versioned. So every source must
resolve (symlinks followed) inside one of prepare's deps; without a dvc.yaml (the library used
on its own) it must resolve inside the project folder. Each source's sha256 is recorded in
data/prepared/meta.json (`inputs`) and carried into the package manifest's lineage.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

DVC_FILE = "dvc.yaml"
STAGE = "prepare"


def tracked_inputs(root: Path) -> list[str] | None:
    """The `deps` of the prepare stage in root/dvc.yaml (None when there is no such stage)."""
    try:
        pipeline = yaml.safe_load((root / DVC_FILE).read_text(encoding="utf-8"))
        deps = pipeline["stages"][STAGE]["deps"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    return [dep for dep in deps if isinstance(dep, str)] if isinstance(deps, list) else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


_UNSET = object()


def path_problem(path: str, root: Path, deps: list[str] | None | object = _UNSET) -> str | None:
    """Why `path` (relative to the project root) cannot be a data source, or None.

    `deps`: tracked_inputs(root), when the caller checks several paths (read once).
    """
    root = root.resolve()
    full = root / path
    try:
        if full.is_dir():
            return (f"{path} is a directory; data.sources takes files: list each file in it "
                    "as its own source")
        if not full.is_file():
            return f"{path} not found (relative to {root})"
        resolved = full.resolve()
    except OSError as err:  # e.g. a name longer than the file system allows
        return f"cannot be read as a path ({err.strerror})"
    via = f" (a symlink to {resolved})" if str(resolved) != os.path.normpath(full) else ""
    deps = tracked_inputs(root) if deps is _UNSET else deps
    if deps is None:
        if _inside(resolved, root):
            return None
        return (f"{path} lies outside the project folder {root}{via}: nothing versions it; "
                "copy it into the project (e.g. under data/raw/)")
    if any(_inside(resolved, (root / dep).resolve()) for dep in deps):
        return None
    folders = [dep for dep in deps if (root / dep).is_dir()]
    copy = f"copy it under {folders[0]}/ (`dvc add` it if it is large), or " if folders else ""
    return (f"{path} lies outside what DVC tracks for the prepare stage "
            f"({', '.join(folders or deps) or 'no deps'}){via}: editing it would not re-run "
            "prepare and the package lineage would name data DVC never versioned; "
            f"{copy}add its folder to the deps of stage {STAGE} in {DVC_FILE}")
