"""Nothing leaked, nothing let in: no pickles in outputs, no remote code by default, no secret
and no record text in any output or log of a small run (tests/small_run.py: HF_TOKEN set to a
fake secret and a distinctive sentence planted in data/raw/qa.jsonl)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.small_run import PLANTED, SECRET, small_run  # noqa: F401 (fixture)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
OUTPUTS = ("models/adapter", "models/merged", "artifacts/package")


def looks_pickled(head: bytes) -> bool:
    """Pickle protocol 2+ opens with 0x80 <protocol>; torch.save's zip container with PK."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or \
        head.startswith(b"PK\x03\x04")


def test_pickle_detector_detects_pickles(tmp_path):
    import pickle
    import torch
    torch.save({"w": torch.zeros(2)}, tmp_path / "t.pt")
    assert looks_pickled(pickle.dumps({"a": 1}, protocol=2))
    assert looks_pickled((tmp_path / "t.pt").read_bytes()[:4])
    assert not looks_pickled(b'{"a": 1}')


@pytest.mark.slow
def test_outputs_hold_no_pickles(small_run):
    checked = 0
    for out in OUTPUTS:
        for path in (small_run.ws / out).rglob("*"):
            if path.is_file():
                assert not path.name.endswith(PICKLE_SUFFIXES), path
                with open(path, "rb") as handle:
                    assert not looks_pickled(handle.read(4)), path
                checked += 1
    assert checked >= 20  # adapter, merged weights and package were all there to check


def test_trust_remote_code_is_false_by_default():
    schema = json.loads((ROOT / "schema/params.schema.json").read_text(encoding="utf-8"))
    assert schema["properties"]["model"]["properties"]["trust_remote_code"]["default"] is False
    assert "trust_remote_code: false" in (ROOT / "params.yaml").read_text(encoding="utf-8")


def test_torch_load_is_weights_only():
    calls = []
    for path in sorted((ROOT / "medqlora").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            end = text.index(")", match.end())
            calls.append((path.name, text[match.start():end + 1]))
    assert calls, "expected checkpoints.py to read Trainer states with torch.load"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


@pytest.mark.slow
def test_secret_in_environment_is_never_written_or_logged(small_run):
    assert SECRET not in small_run.log
    leaked = []
    for path in small_run.ws.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            if SECRET.encode() in path.read_bytes():
                leaked.append(path.relative_to(small_run.ws).as_posix())
    assert leaked == []
    card = (small_run.ws / "artifacts/package/README.md").read_text(encoding="utf-8")
    assert "HF_TOKEN" not in card


@pytest.mark.slow
def test_record_text_never_reaches_the_logs(small_run):
    prepared = pd.concat(pd.read_parquet(small_run.ws / f"data/prepared/{s}.parquet")
                         for s in ("train", "val", "test"))
    assert (prepared["reference"] == PLANTED).sum() == 1  # it was read and used
    assert PLANTED not in small_run.log
    for word in PLANTED.split()[:3]:  # not even a fragment of it
        assert word not in small_run.log
    # nor any other record's answer (first 40 characters of each, long enough to be unique)
    echoed = [t for t in prepared["reference"] if len(t) >= 40 and t[:40] in small_run.log]
    assert echoed == []


def test_dvc_ssh_remotes_check_known_hosts():
    # dvc-ssh turns host key checking off (asyncssh known_hosts=None); the .pth `make setup`
    # installs in the venv turns it back on in every dvc process (medqlora/core/ssh_known_hosts.py).
    # A fresh interpreter of the venv, as `dvc` is: what it would hand asyncssh.
    code = ("import dvc_ssh; fs = dvc_ssh.SSHFileSystem(host='h', user='u', keyfile='/k'); "
            "print(repr(fs.fs_args.get('known_hosts', 'unset')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "()", (
        "dvc's SSH remotes would not check host keys: run `make setup` (it installs "
        "medqlora-ssh-known-hosts.pth into the venv)")
