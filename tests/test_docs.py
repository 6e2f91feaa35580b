"""The README's commands work as written, in a fresh shell after the set-up commands.

The block the README marks (`<!-- tests/test_docs.py runs this block ... -->`) runs in
`bash --noprofile --norc` with a bare environment (system PATH, no venv): its own first line,
`source .venv/bin/activate`, must be all it takes. The fast test runs it without the experiment
lines in the project; the slow one runs all of it, the experiment capped at 12 steps, in the
pipeline workspace (conftest's
`pipeline_workspace`, put back at its baseline afterwards). A stage started by a python
without the project's libraries says so in one line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, restore_baseline, run

MARKER = ("<!-- tests/test_docs.py runs this block in a fresh shell, as written but for "
          "the experiment's length -->")
EXPERIMENT = ("dvc exp ",)
# The experiment as the slow test runs it: the README's line plus a step cap, since a full
# embedded-default training takes about 8 minutes of the suite's budget on 2 cores.
SHORT_EXPERIMENT = ("dvc exp run -S lora.r=8", "dvc exp run -S lora.r=8 -S train.max_steps=12")


def readme_block() -> list[str]:
    """The marked block's command lines (comments stripped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MARKER in text, f"README.md lost the line {MARKER}"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def fresh_shell(lines: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """`lines` in a new bash that has only the system PATH, stopping at the first failure.

    PYTHONPATH keeps this checkout's medqlora first, as the suite's own runs do (a worktree
    shares the venv of another checkout; in a fresh clone it changes nothing)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    return subprocess.run(["bash", "--noprofile", "--norc", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def venv() -> Path:
    """The venv `make setup` made (the suite runs from it)."""
    path = ROOT / ".venv"
    if not (path / "bin" / "activate").is_file():
        pytest.fail(f"{path}/bin/activate missing: run the set-up commands (`make test`)")
    return path


def test_readme_block_starts_with_the_activation_and_shows_the_commands():
    lines = readme_block()
    assert lines[0] == "source .venv/bin/activate"
    assert lines[1:] == ["medqlora validate params.yaml", "medqlora preflight params.yaml",
                         "dvc dag", "dvc exp run -S lora.r=8", "dvc exp show"]


def test_readme_commands_run_in_a_fresh_shell():
    venv()
    lines = [line for line in readme_block() if not line.startswith(EXPERIMENT)]
    proc = fresh_shell(lines, ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preflight: models/tiny-med-llama" in proc.stdout
    for stage in ("prepare", "train", "evaluate", "benchmark", "merge", "package"):
        assert stage in proc.stdout, proc.stdout


def test_a_stage_run_by_a_python_without_the_libraries_says_so_in_one_line():
    # `python -S` has no site-packages: the state of a system python that lacks the venv's
    # libraries, the one DVC runs when the venv is not activated.
    proc = subprocess.run([sys.executable, "-S", "stages/train.py", "--params", "params.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 4
    assert proc.stderr == (
        f"train: {sys.executable} lacks yaml, jsonschema, torch, transformers, peft, pyarrow: run "
        "the stages with the project's venv (`source .venv/bin/activate` first, or `make "
        "repro`)\n")


@pytest.fixture
def workspace(pipeline_workspace):
    yield pipeline_workspace
    restore_baseline(pipeline_workspace)


@pytest.mark.slow
def test_readme_block_with_the_experiment_in_a_reproduced_workspace(workspace):
    (workspace / ".venv").symlink_to(venv().resolve())  # what `make repro` left there
    lines = [line.replace(*SHORT_EXPERIMENT) for line in readme_block()]
    assert SHORT_EXPERIMENT[1] in lines
    proc = fresh_shell(lines, workspace, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = set(re.findall(r"Running stage '([\w-]+)'", proc.stdout))
    assert ran == {"train", "evaluate", "benchmark", "merge", "package"}, proc.stdout[-3000:]
    show = json.loads(run(["dvc", "exp", "show", "--json"], workspace).stdout)
    # [workspace, baseline commit]; the baseline lists its experiments, each with its revs.
    baseline = next(rev for rev in show if rev["rev"] != "workspace")
    assert baseline["data"]["params"]["params.yaml"]["data"]["lora"]["r"] == 16
    assert "metrics/evaluate.json" in baseline["data"]["metrics"]
    experiments = [r for exp in baseline.get("experiments") or [] for r in exp["revs"]]
    (r8,) = [r for r in experiments
             if r["data"]["params"]["params.yaml"]["data"]["lora"]["r"] == 8]
    assert {"metrics/evaluate.json", "metrics/train.json", "metrics/benchmark.json"} <= set(
        r8["data"]["metrics"])
