"""The whole pipeline through real DVC, in a fresh-clone-like workspace.

One workspace (conftest's session fixture `pipeline_workspace`) runs `dvc repro` once: all
six stages on the embedded default. The tests here check its results, caching (a second repro
runs nothing), which stages a params change re-runs, and `dvc exp run`, in file order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import run, set_key

pytestmark = pytest.mark.slow
STAGES = ("prepare", "train", "evaluate", "benchmark", "merge", "package")


def ran(output: str) -> set[str]:
    """Stages DVC reports as run in a repro's output."""
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def edit_params(ws: Path, key: str, value) -> None:
    path = ws / "params.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    set_key(doc, key, value)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(pipeline_workspace):
    return pipeline_workspace


def test_repro_runs_all_five_stages(workspace):
    log = (workspace.parent / "first_repro.log").read_text(encoding="utf-8")
    assert ran(log) == set(STAGES)
    for out in ("data/prepared/train.parquet", "models/adapter/adapter_model.safetensors",
                "metrics/evaluate.json", "models/merged/meta.json", "artifacts/package/manifest.json"):
        assert (workspace / out).is_file(), out


def test_adapter_beats_base_perplexity(workspace):
    metrics = json.loads((workspace / "metrics/evaluate.json").read_text(encoding="utf-8"))
    assert metrics["adapter"]["perplexity"] < metrics["base"]["perplexity"]
    assert metrics["delta"]["perplexity"] < 0


def test_merge_parity_passed(workspace):
    merge = json.loads((workspace / "metrics/merge.json").read_text(encoding="utf-8"))
    assert merge["passed"] is True
    assert merge["max_abs_logit_diff"] <= merge["tolerance"]["max_abs_logit_diff"]


def test_packaged_files_verify(workspace):
    out = run(["medqlora", "verify", "artifacts/package"], workspace)
    assert out.returncode == 0


def test_second_repro_runs_nothing(workspace):
    out = run(["dvc", "repro"], workspace)
    assert ran(out.stdout) == set()
    assert "Data and pipelines are up to date" in out.stdout


def test_train_key_change_does_not_rerun_prepare(workspace):
    edit_params(workspace, "train.learning_rate", 0.001)
    status = json.loads(run(["dvc", "status", "--json"], workspace).stdout)
    assert "train" in status and "prepare" not in status
    run(["git", "checkout", "params.yaml"], workspace)


def test_exp_run_lora_r_reruns_train_not_prepare(workspace):
    out = run(["dvc", "exp", "run", "-S", "lora.r=8", "--name", "r8"], workspace)
    assert "prepare" not in ran(out.stdout)
    assert {"train", "evaluate", "merge", "package"} <= ran(out.stdout)
    show = json.loads(run(["dvc", "exp", "show", "--json"], workspace).stdout)
    # [workspace, baseline commit]; the baseline lists its experiments, each with its revs.
    baseline = next(rev for rev in show if rev["rev"] != "workspace")
    experiments = [r for exp in baseline.get("experiments") or [] for r in exp["revs"]]
    r8 = next(r for r in experiments if r["name"] == "r8")
    base_params = baseline["data"]["params"]["params.yaml"]["data"]
    assert base_params["lora"]["r"] == 16
    assert "metrics/evaluate.json" in baseline["data"]["metrics"]
    params = r8["data"]["params"]["params.yaml"]["data"]
    assert params["lora"]["r"] == 8
    metrics = r8["data"]["metrics"]
    assert "metrics/evaluate.json" in metrics and "metrics/train.json" in metrics


def test_evaluate_key_reruns_evaluate_and_package_only(workspace):
    # Runs last: it starts from the r8 experiment that `dvc exp run` left in the workspace.
    edit_params(workspace, "evaluate.max_new_tokens", 24)
    out = run(["dvc", "repro"], workspace)
    assert ran(out.stdout) == {"evaluate", "package"}


def test_medqa_file_placed_per_readme_is_scored_by_dvc_repro_as_lm_eval_scores_it(workspace,
                                                                                  tmp_path):
    # Runs last. What the README tells a user: put the public MedQA-4 test file at
    # data/benchmarks/medqa/test.jsonl, list it under evaluate.benchmarks, `dvc repro`.
    import shutil
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from make_benchmark_samples import write_samples
    from medqlora.benchmarks import save_quantized_base, task_scores
    from tests.test_benchmarks import lm_eval_cli
    sample = write_samples(tmp_path / "samples")["medqa_4options"]["path"]
    (workspace / "data/benchmarks/medqa").mkdir(parents=True)
    shutil.copy2(sample, workspace / "data/benchmarks/medqa/test.jsonl")
    edit_params(workspace, "evaluate.benchmarks",
                [{"task": "medqa_4options", "path": "data/benchmarks/medqa/test.jsonl"}])
    out = run(["dvc", "repro"], workspace)
    assert ran(out.stdout) == {"benchmark", "package"}
    medqa = json.loads((workspace / "metrics/benchmark.json").read_text())["tasks"][
        "medqa_4options"]
    assert (medqa["n"], medqa["num_fewshot"], medqa["items_in_file"]) == (8, 0, 8)
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], workspace).stdout)
    metrics = shown[""]["data"]["metrics/benchmark.json"]["data"]["tasks"]["medqa_4options"]
    assert metrics["adapter"]["acc"] == medqa["adapter"]["acc"]
    card = (workspace / "artifacts/package/README.md").read_text(encoding="utf-8")
    assert f"| medqa_4options | {medqa['n']} | 0 | acc |" in card

    base_nf4 = save_quantized_base(workspace / "models/adapter", tmp_path / "base-nf4")
    batch = yaml.safe_load((workspace / "params.yaml").read_text())["evaluate"]["batch_size"]
    cli, _ = lm_eval_cli(workspace, base_nf4, workspace / "models/adapter",
                         workspace / "benchmarks/tasks", ["medqa_4options"], tmp_path / "cli",
                         batch_size=batch)
    assert task_scores(cli, "medqa_4options") == medqa["adapter"]
