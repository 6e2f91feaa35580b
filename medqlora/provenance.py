"""meta.json: how an output was made, written beside it and read back downstream.

Downstream stages read their input's meta.json (not params.yaml) to learn how it was made:
merge reads the adapter's quantization settings, package the whole chain.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from medqlora.outputs import read_json, sha256_tree, write_json

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
             "tokenizers", "safetensors", "dvc", "medqlora")
META = "meta.json"


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape a result (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: str | Path = ".") -> str | None:
    """HEAD commit of the project (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def runner_info() -> dict[str, Any]:
    """Where the stage ran: host or container image (set by the docker runner)."""
    return {
        "backend": "docker" if os.environ.get("MEDQLORA_IMAGE") else "local",
        "image": os.environ.get("MEDQLORA_IMAGE"),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def write_meta(out_dir: str | Path, *, stage: str, params: dict[str, Any],
               inputs: dict[str, str | Path], extra: dict[str, Any] | None = None) -> dict:
    """Write `out_dir/meta.json`: resolved params, input hashes, versions, runner."""
    meta = {
        "stage": stage,
        "params": params,
        "inputs": {name: {"path": str(path), "sha256": sha256_tree(path)}
                   for name, path in inputs.items()},
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "runner": runner_info(),
        **(extra or {}),
    }
    write_json(Path(out_dir) / META, meta)
    return meta


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The meta.json of an earlier stage's output, with a clear error when absent."""
    path = Path(out_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {out_dir} was not made by medqlora "
                                "(run the stage that produces it, e.g. `dvc repro`)")
    return read_json(path)
