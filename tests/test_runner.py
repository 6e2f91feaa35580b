"""The docker runner without an engine: the container spec built from runner params, the
content-addressed tag, env pass-through that never logs values, and the run loop (exit code,
tail of the logs, Ctrl-C, removal) against a fake client."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import docker
import pytest

from conftest import ROOT, write_params
from medqlora.core import runner
from medqlora.core.config import load_params

SECRET = "hf_s3cr3t-value-never-logged"


def runner_params(tmp_path: Path, **overrides):
    """RunnerParams from a params copy with runner.<key> overrides, through the real loader."""
    path = write_params(tmp_path / "params.yaml",
                        {"runner.backend": "docker", **{f"runner.{k}": v for k, v in overrides.items()}})
    return load_params(path).runner


def spec_for(tmp_path: Path, rp, environ=None, argv=None):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    environ = {"HOME": str(tmp_path / "home"), **(environ or {})}
    return runner.container_spec(rp, "prepare", argv or ["stages/prepare.py", "--params", "params.yaml"],
                                 image="medqlora:0123456789ab", cwd=ws, environ=environ,
                                 uid=1234, gid=5678)


def test_image_tag_hashes_dockerfile_lock_and_pyproject(tmp_path):
    tag = runner.image_tag()
    digest = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in
                                     ("containers/Dockerfile", "requirements.lock", "pyproject.toml")))
    assert re.fullmatch(r"medqlora:[0-9a-f]{12}", tag)
    assert tag == f"medqlora:{digest.hexdigest()[:12]}"
    # any change to one of the three files makes another tag; other files do not matter
    for name in runner.TAG_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    assert runner.image_tag(tmp_path) == tag
    (tmp_path / "README.md").write_text("unrelated")
    assert runner.image_tag(tmp_path) == tag
    with open(tmp_path / "requirements.lock", "a") as fh:
        fh.write("extra==1.0\n")
    assert runner.image_tag(tmp_path) != tag


def test_spec_mounts_workspace_at_same_path_as_caller(tmp_path):
    spec = spec_for(tmp_path, runner_params(tmp_path, gpus="none"))
    ws = str((tmp_path / "ws").resolve())
    assert spec["image"] == "medqlora:0123456789ab"
    assert spec["working_dir"] == ws
    assert spec["volumes"][ws] == {"bind": ws, "mode": "rw"}
    assert spec["user"] == "1234:5678"
    assert spec["command"] == ["python", "stages/prepare.py", "--params", "params.yaml"]
    assert spec["network_mode"] == "none"
    assert spec["shm_size"] == "8g"
    assert spec["device_requests"] == []
    assert spec["init"] is True
    # the host HF cache is created and mounted where HF_HOME points inside
    cache = str((tmp_path / "home" / ".cache" / "huggingface").resolve())
    assert spec["volumes"][cache] == {"bind": "/cache/huggingface", "mode": "rw"}
    env = spec["environment"]
    assert env["MEDQLORA_IN_CONTAINER"] == "1"
    assert env["MEDQLORA_IMAGE"] == "medqlora:0123456789ab"
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["HOME"] == "/tmp"
    assert env["PYTHONPATH"] == ws
    assert env["HF_HUB_OFFLINE"] == "1"  # network none: nothing could be downloaded anyway


@pytest.mark.parametrize("gpus, count, ids", [("all", -1, []), (2, 2, []), (["0", "3"], 0, ["0", "3"])])
def test_device_requests_for_gpus(tmp_path, gpus, count, ids):
    (req,) = spec_for(tmp_path, runner_params(tmp_path, gpus=gpus))["device_requests"]
    assert req["Count"] == count
    assert req["DeviceIDs"] == ids
    assert req["Capabilities"] == [["gpu"]]


def test_env_passes_named_values_and_logs_names_only(tmp_path, caplog):
    rp = runner_params(tmp_path, env=["HF_TOKEN", "NOT_SET_ANYWHERE"], network="bridge")
    with caplog.at_level(logging.INFO, logger="medqlora.core.runner"):
        spec = spec_for(tmp_path, rp, environ={"HF_TOKEN": SECRET, "AWS_SECRET": "other",
                                               "TRANSFORMERS_OFFLINE": "1"})
    env = spec["environment"]
    assert env["HF_TOKEN"] == SECRET
    assert "AWS_SECRET" not in env and "NOT_SET_ANYWHERE" not in env
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in env  # bridge network: the hub may be used
    assert spec["network_mode"] == "bridge"
    assert "HF_TOKEN" in caplog.text and "NOT_SET_ANYWHERE" in caplog.text
    assert SECRET not in caplog.text


def test_extra_mounts(tmp_path):
    data = tmp_path / "models"
    data.mkdir()
    rp = runner_params(tmp_path, mounts=[str(data), f"{data}:/models:ro"])
    volumes = spec_for(tmp_path, rp)["volumes"]
    # the same host folder twice: the later spec wins (a dict keyed by host path)
    assert volumes[str(data.resolve())] == {"bind": "/models", "mode": "ro"}
    rp = runner_params(tmp_path, mounts=[str(data)])
    assert spec_for(tmp_path, rp)["volumes"][str(data.resolve())] == \
        {"bind": str(data.resolve()), "mode": "rw"}
    with pytest.raises(runner.RunnerError, match=r"runner.mounts: .*does not exist"):
        spec_for(tmp_path, runner_params(tmp_path, mounts=[str(tmp_path / "absent")]))


def test_script_outside_workspace_is_refused(tmp_path):
    with pytest.raises(runner.RunnerError, match="outside the workspace"):
        spec_for(tmp_path, runner_params(tmp_path), argv=["/usr/bin/true"])


class FakeImages:
    def __init__(self, present):
        self.present = present

    def get(self, name):
        if name not in self.present:
            raise docker.errors.ImageNotFound(f"no such image: {name}")


class FakeContainer:
    name = "medqlora-prepare-1"

    def __init__(self, chunks, code=0, interrupt=False):
        self.chunks, self.code, self.interrupt = chunks, code, interrupt
        self.calls: list = []

    def start(self):
        self.calls.append("start")

    def attach(self, **kwargs):
        assert kwargs["demux"] and kwargs["stream"] and kwargs["logs"]
        for chunk in self.chunks:
            yield chunk
        if self.interrupt:  # what Ctrl-C does while the logs stream
            os.kill(os.getpid(), signal.SIGINT)

    def wait(self, timeout=None):
        self.calls.append("wait")
        return {"StatusCode": self.code}

    def kill(self, signal=None):
        self.calls.append(("kill", signal))

    def remove(self, force=False):
        self.calls.append(("remove", force))


class FakeClient:
    def __init__(self, container, images=("medqlora:0123456789ab",)):
        self.images = FakeImages(images)
        self.container = container
        self.containers = self
        self.created: dict = {}

    def create(self, **spec):
        self.created = spec
        return self.container


def test_missing_image_names_tag_and_build_command():
    with pytest.raises(runner.RunnerError) as err:
        runner.require_image(FakeClient(None, images=()), "medqlora:feedfacecafe")
    assert "medqlora:feedfacecafe" in str(err.value)
    assert "containers/build.sh image" in str(err.value)


def test_run_streams_logs_and_propagates_exit_code(tmp_path, capfd):
    lines = [(f"out {i}\n".encode(), None) for i in range(30)] + [(None, b"Traceback: boom\n")]
    container = FakeContainer(lines, code=3)
    spec = spec_for(tmp_path, runner_params(tmp_path, gpus="none"))
    assert runner._run(FakeClient(container), spec, "prepare") == 3
    out, err = capfd.readouterr()
    assert out.count("out ") >= 30 and "out 0\n" in out  # streamed live, in order
    assert "failed in container (image medqlora:0123456789ab) with exit code 3" in err
    assert "  | Traceback: boom" in err and "  | out 29" in err
    assert "  | out 10" not in err  # only the last 20 lines are repeated
    assert container.calls[-1] == ("remove", True)


def test_ctrl_c_stops_and_removes_the_container(tmp_path):
    container = FakeContainer([(b"step 1\n", None)], code=0, interrupt=True)
    spec = spec_for(tmp_path, runner_params(tmp_path, gpus="none"))
    before = signal.getsignal(signal.SIGINT)
    assert runner._run(FakeClient(container), spec, "train") == 130
    assert ("kill", "SIGINT") in container.calls
    assert container.calls[-1] == ("remove", True)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_no_engine_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")
    rp = runner_params(tmp_path, gpus="none")
    assert runner.run_in_container(rp, "prepare", ["stages/prepare.py"]) == runner.EXIT_ENGINE
    err = capsys.readouterr().err
    assert f"no Docker engine answers at unix://{tmp_path}/absent.sock" in err
    assert "runner.backend: local" in err
