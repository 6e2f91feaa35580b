"""One small, undisturbed `dvc repro` shared by the fault and security tests (session scope).

Import the fixture into a test module (`from tests.small_run import small_run  # noqa: F401`)
and the pipeline runs once per session however many modules use it. The run is the embedded
default shrunk to seconds, with a distinctive sentence planted in a raw record (it must never
reach a log) and a fake HF_TOKEN in the environment (it must never reach any file or log).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_workspace, run, write_params

SECRET = "hf_test_secret_123"
PLANTED = "Quartzlantern heliotrope marmalade sings beneath the cobalt viaduct"
OVERRIDES = {
    "train.max_steps": 4, "train.save_steps": 2, "train.eval_steps": 2, "train.logging_steps": 1,
    "evaluate.max_examples": 6, "evaluate.max_new_tokens": 8, "evaluate.batch_size": 8,
    "evaluate.bootstrap_samples": 100, "merge.parity_prompts": 4,
    "merge.min_top1_agreement": 0.95,  # 4 prompts of a 4-step adapter: 0.984 measured
}
ENV = {"HF_TOKEN": SECRET, "MEDQLORA_LOG_LEVEL": "INFO"}


@dataclass
class SmallRun:
    ws: Path
    log: str          # stdout + stderr of the whole repro


def small_workspace(dest: Path) -> Path:
    """A fresh workspace with the small params and the planted record."""
    ws = make_workspace(dest)
    write_params(ws / "params.yaml", OVERRIDES)
    with open(ws / "data/raw/qa.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "qa-planted", "instruction": "Which sentence is planted?",
                                 "input": "", "output": PLANTED, "lang": "en"}) + "\n")
    for cmd in (["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "small"]):
        run(cmd, ws)
    return ws


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> SmallRun:
    ws = small_workspace(tmp_path_factory.mktemp("small") / "repo")
    proc = run(["dvc", "repro"], ws, env=ENV)
    return SmallRun(ws, proc.stdout + proc.stderr)
