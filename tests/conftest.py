"""Shared fixtures. Everything runs offline on CPU; nothing touches a model or dataset hub."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-med-llama"
# What a fresh clone holds: copied into temp workspaces for pipeline tests.
WORKSPACE_ITEMS = ("params.yaml", "dvc.yaml", "schema", "stages", "medqlora", "data/raw",
                   "data/DATA_CARD.md", "data/benchmarks/README.md", "data/benchmarks/.gitignore",
                   "models/tiny-med-llama", "examples", "containers", "pyproject.toml",
                   "requirements.lock", ".dvc/config", ".dvcignore")


def set_key(doc: dict, dotted: str, value) -> None:
    """Set `a.b.c` in a nested mapping (list indices as digits: data.sources.0.path)."""
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def write_params(path: Path, overrides: dict | None = None, base: Path = ROOT / "params.yaml") -> Path:
    """Write a copy of params.yaml with dotted-key overrides applied; returns the path."""
    doc = yaml.safe_load(base.read_text(encoding="utf-8"))
    for key, value in (overrides or {}).items():
        set_key(doc, key, value)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def make_workspace(dest: Path) -> Path:
    """A fresh-clone-like copy of the project in `dest`, as its own git + DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in WORKSPACE_ITEMS:
        src = ROOT / item
        if not src.exists():
            continue
        target = dest / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)
    (dest / ".gitignore").write_text("/checkpoints/\n", encoding="utf-8")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None,
        timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; output captured as text."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY_MODEL / "config.json").is_file():
        pytest.fail(f"{TINY_MODEL} missing: run `make model`")
    return TINY_MODEL


BASELINE_TAG = "v1.0.0"


@pytest.fixture(scope="session")
def pipeline_workspace(tmp_path_factory) -> Path:
    """A fresh-clone-like workspace after one full `dvc repro`, committed and tagged.

    The baseline commit is tagged `v1.0.0` (and `medqlora-tiny-med@v1.0.0`, the artifact
    version tag `dvc artifacts get` understands); its package manifest is kept in
    `baseline_manifest.json` beside the workspace, since later tests run experiments in it.
    """
    ws = make_workspace(tmp_path_factory.mktemp("pipeline") / "repo")
    first = run(["dvc", "repro"], ws)
    (ws.parent / "first_repro.log").write_text(first.stdout + first.stderr, encoding="utf-8")
    run(["git", "add", "-A"], ws)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], ws)
    run(["git", "tag", BASELINE_TAG], ws)
    # `dvc artifacts get` only sees annotated tags.
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "tag", "-a",
         f"medqlora-tiny-med@{BASELINE_TAG}", "-m", f"medqlora-tiny-med {BASELINE_TAG}"], ws)
    shutil.copy2(ws / "artifacts/package/manifest.json", ws.parent / "baseline_manifest.json")
    return ws
