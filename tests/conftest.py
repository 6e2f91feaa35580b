"""Shared fixtures and the suite's rules. Everything runs offline on CPU; nothing touches a
model or dataset hub.

Rules enforced here, for every test:
- a test that builds or runs a torch model (or a fixture it uses does), or uses a pipeline run,
  is marked `slow`: the unmarked tier is `make test-fast`, the edit loop, and runs none
  (`_guard`);
- the library calls of each stage script (medqlora.train.training.run, ...) get the params view of
  the stage contract, also when a test calls them directly: reading a key that dvc.yaml does
  not declare for the stage fails the test (medqlora/core/contract.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medqlora.core import cpu_numerics

# As every stage does first (stage.start): torch's, oneDNN's and MKL's AVX2 code paths, asked
# for before torch loads, so the in-process runs here give the bytes `dvc repro` gives.
cpu_numerics.pin_environment()

import torch  # after the pin: torch reads it when it first picks a kernel
import yaml

from medqlora.core import contract

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
    # as the project's .gitignore: resumable checkpoints, the train stage's measured speed
    (dest / ".gitignore").write_text("/checkpoints/\n/metrics/measured/\n", encoding="utf-8")
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


SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = ROOT / ".cache" / "medqlora"   # the project's own cache: materialised once


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real small base (SmolLM2-135M-Instruct) materialised from its GGUF, in the project's
    own cache (.cache/medqlora/gguf: made once, about 20 s, then reused by every run)."""
    from unittest import mock

    from medqlora.core.gguf import materialise
    if not (SMOLLM2 / SMOLLM2_GGUF).is_file():
        pytest.fail(f"{SMOLLM2 / SMOLLM2_GGUF} missing: run `make smollm2` (`make test` does)")
    with mock.patch.dict(os.environ, {"MEDQLORA_CACHE": str(SMOLLM2_CACHE)}):  # not for others
        return materialise(SMOLLM2, SMOLLM2_GGUF)


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


def restore_baseline(ws: Path) -> None:
    """Put a pipeline workspace back at its baseline commit: tracked files (params, dvc.lock,
    metrics) from git, DVC outputs from the cache, anything else new removed. Tests that change
    the workspace call it after themselves, so none depends on another's leftovers."""
    run(["git", "reset", "-q", "--hard", BASELINE_TAG], ws)
    run(["git", "clean", "-q", "-fd"], ws)  # untracked, not ignored: DVC outputs stay
    run(["dvc", "checkout", "--force"], ws)


# ---------------------------------------------------------------- rules

# What counts as a model: a transformers or peft model built, or any module run forward.
# (transformers builds small activation modules when it is imported: those are no model.)
MODEL_CLASSES = {"PreTrainedModel", "PeftModel", "BaseTunerLayer"}


@contextlib.contextmanager
def _no_models(nodeid: str):
    """Building a model or running any module fails the test: the unmarked tier runs none."""
    init, call = torch.nn.Module.__init__, torch.nn.Module.__call__

    def refuse(what: str):
        pytest.fail(f"{nodeid} {what} but is not marked slow: add @pytest.mark.slow (the "
                    "unmarked tier, `make test-fast`, runs no model)", pytrace=False)

    def guarded_init(self, *args, **kwargs):
        if any(cls.__name__ in MODEL_CLASSES for cls in type(self).__mro__):
            refuse(f"builds a model ({type(self).__name__})")
        init(self, *args, **kwargs)

    def guarded_call(self, *args, **kwargs):
        refuse(f"runs a torch module ({type(self).__name__})")

    torch.nn.Module.__init__, torch.nn.Module.__call__ = guarded_init, guarded_call
    try:
        yield
    finally:
        torch.nn.Module.__init__, torch.nn.Module.__call__ = init, call


# Fixtures that run the pipeline (in subprocesses, out of reach of _no_models).
PIPELINE_FIXTURES = {"pipeline_workspace", "small_run"}


def _guard(item):
    if item.get_closest_marker("slow"):
        return contextlib.nullcontext()
    runs = sorted(PIPELINE_FIXTURES & set(item.fixturenames))
    if runs:
        pytest.fail(f"{item.nodeid} uses {', '.join(runs)} (a pipeline run) but is not marked "
                    "slow: add @pytest.mark.slow", pytrace=False)
    return _no_models(item.nodeid)


# (module, function) -> stage: where each stage script hands params to the library.
_LIBRARY_CALLS = {call: stage for stage in contract.load_pipeline()
                  for call in contract.library_calls(contract.stage_script(stage))}


def _restricted(function, stage: str):
    @functools.wraps(function)
    def call(params, *args, **kwargs):
        if dataclasses.is_dataclass(params):  # a test's stand-in (SimpleNamespace) passes as is
            params = contract.restrict(params, stage)
        return function(params, *args, **kwargs)
    call.contract_stage = stage
    return call


def _enforce_contract() -> None:
    """Wrap the stage library calls of every medqlora module imported so far (idempotent)."""
    for (module, name), stage in _LIBRARY_CALLS.items():
        loaded = sys.modules.get(module)
        function = getattr(loaded, name, None)
        if function is not None and not hasattr(function, "contract_stage"):
            setattr(loaded, name, _restricted(function, stage))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _enforce_contract()
    with _guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _enforce_contract()
    with _guard(item):
        yield
