"""Stages in the project image through a real Docker engine, compared with local runs.

Needs an engine (DOCKER_HOST; scripts/ci_docker.sh starts one in CI) and the image
`medqlora:<hash>` built from containers/Dockerfile (containers/README.md says how).
Skipped with a visible reason only when no engine answers, and never in CI (CI=true or
MEDQLORA_REQUIRE_DOCKER, which scripts/ci_docker.sh sets, turn the skip into a failure).

Tolerance: train runs the same wheels on the same CPU in and out of the container, so losses
agree to float rounding; we allow 1e-4 absolute on each loss (a real difference, e.g. another
torch build or seed, moves them by > 1e-2 after 2 steps).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_workspace, run, write_params
from medqlora.core import runner

pytestmark = [pytest.mark.docker, pytest.mark.slow]
LOSS_TOL = 1e-4
# 2 optimizer steps of 4 sequences of <= 128 tokens, ~20 validation examples: the two evals
# and the steps take seconds, not minutes, on 2 shared cores.
SMALL = {"runner.gpus": "none", "train.max_steps": 2, "train.logging_steps": 1,
         "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
         "data.max_seq_length": 128, "data.val_fraction": 0.02}
PARQUETS = ("train.parquet", "val.parquet", "test.parquet")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def engine():
    """A docker client and the image tag; skip (fail in CI) when no engine answers."""
    docker = pytest.importorskip("docker")
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure to reach the engine means "no engine"
        reason = f"no Docker engine answers at {where}: {type(err).__name__}: {err}"
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("MEDQLORA_REQUIRE_DOCKER"):
            pytest.fail(f"CI / MEDQLORA_REQUIRE_DOCKER set but {reason} "
                        "(scripts/ci_docker.sh should have started one)")
        pytest.skip(reason)
    tag = runner.image_tag()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {tag} is missing from the engine at {where}; build it:\n"
                    f"  {runner.BUILD_HINT}")
    return client, tag


@pytest.fixture(scope="module")
def workspace(engine, tmp_path_factory):
    """One workspace, params for both backends; prepare+train run once each way."""
    ws = make_workspace(tmp_path_factory.mktemp("container"))
    write_params(ws / "params.local.yaml", SMALL)
    write_params(ws / "params.docker.yaml", {**SMALL, "runner.backend": "docker"})
    timings = {}
    for backend in ("local", "docker"):
        t0 = time.monotonic()
        run([sys.executable, "stages/prepare.py", "--params", f"params.{backend}.yaml",
             "--out", f"{backend}/prepared", "--metrics", f"{backend}/metrics/prepare.json"], ws)
        t1 = time.monotonic()
        run([sys.executable, "stages/train.py", "--params", f"params.{backend}.yaml",
             "--data", f"{backend}/prepared", "--out", f"{backend}/adapter",
             "--checkpoints", f"{backend}/checkpoints", "--live", f"{backend}/dvclive",
             "--metrics", f"{backend}/metrics/train.json"], ws)
        timings[backend] = (round(t1 - t0, 1), round(time.monotonic() - t1, 1))
    print(f"\nprepare/train seconds (local, docker): {timings}")
    return ws


def test_prepare_outputs_equal_by_hash(workspace, engine):
    local, docker = workspace / "local", workspace / "docker"
    for name in PARQUETS:
        assert sha256(docker / "prepared" / name) == sha256(local / "prepared" / name), name
    assert sha256(docker / "metrics/prepare.json") == sha256(local / "metrics/prepare.json")
    meta_l = json.loads((local / "prepared/meta.json").read_text())
    meta_d = json.loads((docker / "prepared/meta.json").read_text())
    # the same libraries, code, inputs and git commit: only the runner fields differ
    # (the Python patch level is the image's, e.g. Debian's 3.11.2 against the host's 3.11.x)
    run_d, run_l = meta_d.pop("runner"), meta_l.pop("runner")
    assert (run_d["backend"], run_d["image"], run_d["machine"]) == ("docker", engine[1], run_l["machine"])
    assert (run_l["backend"], run_l["image"]) == ("local", None)
    assert run_d["python"].rsplit(".", 1)[0] == run_l["python"].rsplit(".", 1)[0]  # 3.11 both
    assert meta_d == meta_l


def test_train_metrics_equal_within_tolerance(workspace, engine):
    local = json.loads((workspace / "local/metrics/train.json").read_text())
    docker = json.loads((workspace / "docker/metrics/train.json").read_text())
    assert docker["global_step"] == local["global_step"] == 2
    for key in ("tokens_seen", "trainable_params", "total_params", "effective_batch",
                "warmup_steps", "total_steps_planned"):
        assert docker[key] == local[key], key
    for key in ("train_loss", "eval_loss"):
        assert docker[key] == pytest.approx(local[key], abs=LOSS_TOL), key
    meta = json.loads((workspace / "docker/adapter/meta.json").read_text())
    assert meta["runner"]["image"] == engine[1] and meta["runner"]["backend"] == "docker"


def test_outputs_belong_to_the_invoking_user(workspace, engine):
    files = [p for p in (workspace / "docker").rglob("*")]
    assert len(files) > 10
    wrong = [str(p) for p in files if (p.lstat().st_uid, p.lstat().st_gid) != (os.getuid(), os.getgid())]
    assert wrong == []


def test_container_runs_as_the_callers_uid(engine, tmp_path, monkeypatch):
    """A caller other than root: the file the container writes is owned by that uid:gid."""
    ws = tmp_path / "ws"
    (ws / "out").mkdir(parents=True)
    (ws / "out").chmod(0o777)  # uid 4321 must be able to write here
    (ws / "write.py").write_text("import os, pathlib\n"
                                 "pathlib.Path('out/who').write_text(f'{os.getuid()}:{os.getgid()}')\n")
    for name in runner.TAG_FILES:  # the workspace defines the tag it needs
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes((runner.ROOT / name).read_bytes())
    params = write_params(tmp_path / "p.yaml", {"runner.backend": "docker", "runner.gpus": "none"})
    from medqlora.core.config import load_params
    rp = load_params(params).runner
    monkeypatch.chdir(ws)
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    monkeypatch.setattr(os, "getgid", lambda: 4322)
    assert runner.run_in_container(rp, "probe", ["write.py"]) == 0
    who = ws / "out" / "who"
    assert who.read_text() == "4321:4322"
    assert (who.stat().st_uid, who.stat().st_gid) == (4321, 4322)


def test_failure_inside_fails_the_dvc_stage_with_exit_code_and_log_tail(engine, tmp_path):
    ws = make_workspace(tmp_path / "broken")
    write_params(ws / "params.yaml", {**SMALL, "runner.backend": "docker"}, base=ws / "params.yaml")
    with open(ws / "data/raw/qa.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")  # params stay valid; the input is broken
    proc = run(["dvc", "repro", "prepare"], ws, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"prepare: failed in container (image {engine[1]}) with exit code 1" in out
    assert "  | " in out and "qa.jsonl" in out.split("last ")[-1]  # the tail names the bad file
    assert "exited with 1" in out  # DVC reports the container's code as the stage's
    assert not (ws / "data/prepared").exists()
    assert engine[0].containers.list(all=True, filters={"label": f"medqlora.workspace={ws}"}) == []


def test_ctrl_c_stops_and_removes_the_container(engine, tmp_path):
    ws = make_workspace(tmp_path / "sigint")
    write_params(ws / "params.yaml", {"runner.backend": "docker", "runner.gpus": "none"},
                 base=ws / "params.yaml")
    (ws / "stages/sleep.py").write_text(
        "import time\nfrom medqlora.core import stage\n"  # a stage dvc.yaml declares (contract)
        "args, params = stage.start('prepare', stage.parser('sleep'))\n"
        "print('sleeping', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "stages/sleep.py"], cwd=ws, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "sleeping"  # the container is running
    label = {"label": f"medqlora.workspace={ws}"}
    assert len(engine[0].containers.list(filters=label)) == 1
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < runner.STOP_GRACE_S + 5
    assert "SIGINT received, stopping container" in err
    assert engine[0].containers.list(all=True, filters=label) == []
