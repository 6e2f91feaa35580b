"""meta.json: how an output was made, written beside it and read back downstream.

Downstream stages read their input's meta.json (not params.yaml) to learn how it was made:
merge reads the adapter's quantization settings, package the whole chain.

meta.json is part of a DVC-hashed output, so it holds only facts that the same inputs always
reproduce: no git commit (any commit, even one touching only the README, would change every
output's hash and re-run everything downstream; the commit that holds dvc.lock already names
the run) and no timings. Measured speed and memory are not in metrics/*.json either: the train
stage writes them to metrics/measured/train.json (git-ignored, not a DVC output;
medqlora/train/training.py MEASURED), so no output, dvc.lock entry or package depends on them.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from medqlora.core.outputs import read_json, sha256_tree, write_json

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
    """Write `out_dir/meta.json`: resolved params, input hashes, versions, runner (equal
    inputs give equal bytes)."""
    meta = {
        "stage": stage,
        "params": params,
        "inputs": {name: {"path": str(path), "sha256": sha256_tree(path)}
                   for name, path in inputs.items()},
        "libraries": library_versions(),
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
