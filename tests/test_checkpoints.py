"""Which checkpoint a run resumes from, and what happens to the incomplete ones
(medqlora/train/checkpoints.py), on fake checkpoint folders: small torch.save files and a
tiny safetensors file, no model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from medqlora.train import checkpoints

STAMP = 1_700_000_123  # time.time() during the tests, so the skipped names are known


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(checkpoints.time, "time", lambda: STAMP + 0.7)


def complete(run_dir: Path, step: int) -> Path:
    """checkpoint-<step> as the Trainer writes it for one process."""
    from safetensors.torch import save_file
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)},
              str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, ckpt / "rng_state.pth")
    return ckpt


def incomplete(run_dir: Path, step: int) -> Path:
    """checkpoint-<step> of a run killed while writing it: optimizer.pt cut short."""
    ckpt = complete(run_dir, step)
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:20])
    return ckpt


def messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_every_checkpoint_incomplete_says_the_run_starts_fresh(tmp_path, caplog):
    run_dir = tmp_path / "run"
    incomplete(run_dir, 2), incomplete(run_dir, 4)
    with caplog.at_level(logging.INFO, logger="medqlora.train.checkpoints"):
        assert checkpoints.latest_complete(run_dir) is None
    lines = messages(caplog)
    assert len(lines) == 3 and lines[0].startswith(
        f"skipping incomplete checkpoint {run_dir}/checkpoint-4 (RuntimeError: PytorchStreamReader "
        "failed reading zip archive")
    assert lines[2] == (f"no complete checkpoint in {run_dir}: starting fresh (2 skipped, moved "
                        f"to {run_dir}/skipped)")
    assert sorted(p.name for p in run_dir.iterdir()) == ["skipped"]
    assert sorted(p.name for p in (run_dir / "skipped").iterdir()) == [
        f"checkpoint-2-{STAMP}", f"checkpoint-4-{STAMP}"]


def test_moving_new_ones_aside_deletes_the_ones_skipped_earlier(tmp_path, caplog):
    run_dir = tmp_path / "run"
    good, _ = complete(run_dir, 3), incomplete(run_dir, 5)
    for name in ("checkpoint-1-1600000000", "checkpoint-2-1600000000"):  # an earlier resume's
        (run_dir / "skipped" / name).mkdir(parents=True)
        (run_dir / "skipped" / name / "optimizer.pt").write_bytes(b"x" * 100)
    (run_dir / "skipped" / "NOTES.txt").write_text("mine")  # not medqlora's: left alone
    with caplog.at_level(logging.INFO, logger="medqlora.train.checkpoints"):
        assert checkpoints.latest_complete(run_dir) == good
    assert sorted(p.name for p in (run_dir / "skipped").iterdir()) == [
        "NOTES.txt", f"checkpoint-5-{STAMP}"]
    assert messages(caplog, logging.INFO) == [
        f"deleted 2 checkpoint(s) skipped by an earlier resume from {run_dir}/skipped: "
        "checkpoint-1-1600000000, checkpoint-2-1600000000"]
    assert not any("starting fresh" in line for line in messages(caplog))


def test_a_resume_that_skips_nothing_leaves_the_skipped_ones(tmp_path):
    run_dir = tmp_path / "run"
    good = complete(run_dir, 3)
    (run_dir / "skipped" / "checkpoint-5-1600000000").mkdir(parents=True)
    assert checkpoints.latest_complete(run_dir) == good
    assert [p.name for p in (run_dir / "skipped").iterdir()] == ["checkpoint-5-1600000000"]


def test_other_ranks_skip_the_same_folders_but_move_and_log_nothing(tmp_path, caplog):
    run_dir = tmp_path / "run"
    incomplete(run_dir, 2)
    with caplog.at_level(logging.INFO, logger="medqlora.train.checkpoints"):
        assert checkpoints.latest_complete(run_dir, is_main=False) is None
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint-2"] and caplog.records == []


def test_no_checkpoint_at_all_is_a_fresh_run_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="medqlora.train.checkpoints"):
        assert checkpoints.latest_complete(tmp_path / "run") is None
    assert caplog.records == []
