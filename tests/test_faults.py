"""Faults: SIGKILL in every stage, a full disk; nothing half-written is ever accepted.

One undisturbed small `dvc repro` (tests/small_run.py) is the reference. A second workspace
runs `dvc repro` five times, each time SIGKILLing the whole process group (dvc and the stage)
once a stage is visibly mid-work, checking that stage left no output that looks complete; a
last `dvc repro` finishes and its outputs are compared with the reference.

No tolerance: training on CPU is bitwise deterministic and resumes bitwise
(tests/test_train.py), so losses, adapter, merged weights, predictions and every package
file are equal, the model card and meta.json files included (they hold no git commit, no
measured speed or memory, and no trace of the resume: those go to metrics/measured/train.json,
medqlora.train.training.MEASURED).

Detected elsewhere, not duplicated here: a corrupted checkpoint is skipped on resume
(tests/test_train.py), an altered package file fails `medqlora verify` (tests/test_package.py).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medqlora.core import outputs
from medqlora.train import checkpoints
from tests.conftest import run, write_params
from tests.small_run import ENV, small_run, small_workspace  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
VENV_PATH = f"{Path(sys.executable).parent}:{os.environ['PATH']}"


def tmp_sibling(ws: Path, out: str) -> bool:
    out = Path(out)
    return any((ws / out.parent).glob(f".{out.name}.tmp-*"))


# (stage, sign it is mid-work, what it writes)
KILLS = [
    ("prepare", lambda ws, log: tmp_sibling(ws, "data/prepared"),
     ["data/prepared", "metrics/prepare.json"]),
    ("train", lambda ws, log: any(checkpoints.problem(c) is None
                                  for c in (ws / "checkpoints/train").glob("*/checkpoint-2")),
     ["models/adapter", "metrics/train.json"]),
    # The model is loaded and four scoring runs are still ahead (a later sign raced the end).
    ("evaluate", lambda ws, log: "loaded base" in log.split("Running stage 'evaluate'")[-1]
     and "Running stage 'evaluate'" in log,
     ["predictions", "metrics/evaluate.json"]),
    ("merge", lambda ws, log: "not quantized" in log, ["models/merged", "metrics/merge.json"]),
    ("package", lambda ws, log: tmp_sibling(ws, "artifacts/package"), ["artifacts/package"]),
]


def repro_killed_when(ws: Path, stage: str, sign) -> str:
    """Start `dvc repro`; SIGKILL its process group once `sign` holds; return the log."""
    log_path = ws.parent / f"killed-{stage}.log"
    env = {**os.environ, **ENV, "PATH": VENV_PATH}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["dvc", "repro"], cwd=ws, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if sign(ws, log_path.read_text(encoding="utf-8", errors="replace")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return log_path.read_text(encoding="utf-8", errors="replace")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"{stage}: no sign of progress seen before the repro ended:\n"
                f"{log_path.read_text(errors='replace')[-3000:]}")


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_in_every_stage_then_repro_equals_undisturbed(small_run, tmp_path):
    ref = small_run.ws
    ws = small_workspace(tmp_path / "repo")
    for stage, sign, outs in KILLS:
        log = repro_killed_when(ws, stage, sign)
        assert f"Running stage '{stage}'" in log
        for out in outs:  # first run of this stage here: nothing may look complete
            assert not (ws / out).exists(), f"{out} exists after SIGKILL during {stage}"
    done = run(["dvc", "repro"], ws, env=ENV)
    assert "Running stage 'package'" in done.stdout

    for split in ("train", "val", "test"):
        name = f"data/prepared/{split}.parquet"
        assert (ws / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = (json.loads((w / "metrics/train.json").read_text()) for w in (ws, ref))
    for key in ("train_loss", "eval_loss", "eval_loss_start"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["global_step"] == want["global_step"] == 4
    measured = json.loads((ws / "metrics/measured/train.json").read_text())
    assert measured["resumed_from_step"] == 2  # train really resumed from the killed run's save
    for name in ("models/adapter/adapter_model.safetensors", "models/merged/model.safetensors",
                 "predictions/predictions.jsonl", "metrics/evaluate.json", "metrics/merge.json"):
        assert (ws / name).read_bytes() == (ref / name).read_bytes(), name
    manifest = [json.loads((w / "artifacts/package/manifest.json").read_text())["files"]
                for w in (ws, ref)]
    assert set(manifest[0]) == set(manifest[1])
    # Every package file, card and meta.json included: another workspace, another commit,
    # other timings, a resumed run, yet the same bytes.
    differ = {name for name in manifest[1] if manifest[0][name] != manifest[1][name]}
    assert differ == set(), differ
    assert (ws / "artifacts/package/manifest.json").read_bytes() == (
        ref / "artifacts/package/manifest.json").read_bytes()
    assert run(["medqlora", "verify", "artifacts/package"], ws).returncode == 0


def test_injected_full_disk_names_output_and_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "models" / "adapter"
    with outputs.atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"previous")

    def full(_path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(outputs, "_fsync_tree", full)
    with pytest.raises(OSError) as info:
        with outputs.atomic_dir(out) as tmp:
            (tmp / "weights").write_bytes(b"half")
    assert info.value.errno == errno.ENOSPC
    assert str(out) in str(info.value) and "No space left on device" in str(info.value)
    assert (out / "weights").read_bytes() == b"previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no temp left behind


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 200 KiB tmpfs (prepare writes ~320 KiB); skipped, saying why, where mount is refused."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the injected-failure test covers a full disk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused ({proc.stderr.strip()}): the injected-"
                    "failure test covers a full disk")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_prepare_on_a_full_tmpfs_fails_clearly_and_writes_nothing(small_run, tiny_tmpfs):
    proc = run([sys.executable, "stages/prepare.py", "--params", "params.yaml",
                "--out", str(tiny_tmpfs / "prepared"), "--metrics", str(tiny_tmpfs / "m.json")],
               small_run.ws, check=False)
    assert proc.returncode != 0
    assert f"{tiny_tmpfs / 'prepared'}: cannot write this output: No space left on device" \
        in proc.stderr, proc.stderr[-2000:]
    assert list(tiny_tmpfs.iterdir()) == []  # neither the output nor its temp sibling


# ---------------------------------------------------------------- hostile and degenerate input

def test_repro_stops_on_a_diverging_run_and_on_an_empty_split(small_run, tmp_path):
    """Through DVC: no stage exits 0 after a non-finite loss or with an empty split, and nothing
    downstream runs. (Before running a stage DVC itself deletes that stage's outputs, which stay
    in its cache: `dvc checkout` brings them back. The stage-level "left as it was" is tested
    in tests/test_train.py and tests/test_prepare.py.)"""
    ws = Path(shutil.copytree(small_run.ws, tmp_path / "repo", symlinks=True))
    lock = (ws / "dvc.lock").read_bytes()
    adapter = files(ws / "models/adapter")
    train_metrics = (ws / "metrics/train.json").read_bytes()
    # lora_alpha 4096 / r 1 at learning rate 1 in float16: the gradient overflows (as
    # tests/test_train.py), whatever the CPU kernels
    write_params(ws / "params.yaml", {"lora.r": 1, "lora.lora_alpha": 4096,
                                      "train.learning_rate": 1.0, "train.warmup_ratio": 0.0,
                                      "quantization.bnb_4bit_compute_dtype": "float16"},
                 base=ws / "params.yaml")
    proc = run(["dvc", "repro"], ws, check=False, env=ENV)
    assert proc.returncode != 0
    assert re.search(r"train: diverged at step \d+: the gradient is not finite in 56 of 56 "
                     "trainable tensors", proc.stderr), proc.stderr[-3000:]
    step = int(re.search(r"diverged at step (\d+)", proc.stderr).group(1))
    assert ("last good checkpoint: checkpoints/train/" if step > 2 else   # save_steps 2
            "no checkpoint had been saved yet (train.save_steps: 2)") in proc.stderr
    assert "Running stage 'evaluate'" not in proc.stdout + proc.stderr
    assert (ws / "dvc.lock").read_bytes() == lock
    assert unchanged_or_removed(ws / "metrics/train.json", train_metrics)
    assert not (ws / "models/adapter").exists() or files(ws / "models/adapter") == adapter

    run(["git", "checkout", "params.yaml"], ws)
    run(["dvc", "checkout"], ws)
    assert files(ws / "models/adapter") == adapter
    prepared = (ws / "metrics/prepare.json").read_bytes()
    data = files(ws / "data/prepared")
    # 1,003 records, none with a bucket in [0.1, 0.1001): the val split comes out empty
    write_params(ws / "params.yaml", {"data.val_fraction": 0.0001}, base=ws / "params.yaml")
    proc = run(["dvc", "repro"], ws, check=False, env=ENV)
    assert proc.returncode != 0
    assert ("data/prepared/val.parquet: the val split would be empty: none of the 1003 unique "
            "records fell in it (data.val_fraction: 0.0001, about 0.1 expected); raise "
            "data.val_fraction or add records") in proc.stderr, proc.stderr[-3000:]
    assert "Running stage 'train'" not in proc.stdout + proc.stderr
    assert (ws / "dvc.lock").read_bytes() == lock
    assert unchanged_or_removed(ws / "metrics/prepare.json", prepared)
    assert not (ws / "data/prepared").exists() or files(ws / "data/prepared") == data


def unchanged_or_removed(path: Path, before: bytes) -> bool:
    """DVC deletes a stage's outputs before running it: a failed stage leaves them absent (or,
    where DVC kept them, as they were), never rewritten."""
    return not path.exists() or path.read_bytes() == before


def test_package_lineage_names_every_data_source_and_its_hash(small_run):
    ws = small_run.ws
    manifest = json.loads((ws / "artifacts/package/manifest.json").read_text())
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    want = {name: outputs.sha256_file(ws / name)
            for name in ("data/raw/labs.jsonl", "data/raw/mcq.jsonl", "data/raw/qa.jsonl")}
    assert manifest["lineage"]["data_sources"] == want
    assert {name: entry["sha256"] for name, entry in meta["inputs"].items()} == want
