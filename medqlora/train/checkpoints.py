"""Training checkpoints: where a run keeps them, and which one it may resume from.

Checkpoints live outside the stage's DVC outputs (`checkpoints/train/`, git-ignored), in a
subfolder named by a fingerprint of everything that shapes the weights (the train-relevant
params and the prepared data's hash). A changed config or dataset therefore gets a fresh
folder and never resumes a stale run.

A checkpoint counts as *complete* when its trainer_state.json parses, its adapter weights
load (safetensors) and its optimizer, scheduler and RNG states load. A run killed while
writing one (kill -9, full disk) leaves a partial folder; it is moved aside with a warning
naming it, and the newest complete one is used instead. When none is complete, one line says
the run starts fresh.

Skipped folders go to `<run>/skipped/checkpoint-N-<unix time>`, kept for a post-mortem (what
was half-written, by which save), but only the latest lot: moving new ones aside deletes those
an earlier resume had moved. A checkpoint of the reference recipe (Mistral-7B, r 64 on 7
projections: 168M LoRA parameters x (4 bytes fp32 + 8 bytes of AdamW states)) is about 2 GB,
and each crash-and-resume would otherwise add one for good; the newest failure is the one
worth reading, and none is ever resumed from.

Several processes (medqlora/train/launch.py) write other layouts, accepted too: DDP writes one
rng_state_<rank>.pth per process; FSDP (SHARDED_STATE_DICT) writes the adapter and the
optimizer as torch.distributed.checkpoint folders `pytorch_model_fsdp_0/` and `optimizer_0/`
(shards `*.distcp` + `.metadata`), and medqlora then adds the whole LoRA tensors as
adapter_model.safetensors (medqlora/train/adapter_io.py: the Trainer's model shards come out empty
under FSDP-QLoRA, so that file is required and the model shards may be empty). DCP writes
`.metadata` last (a temp file renamed once every rank's shards are written), so its presence
with the shards means the save finished; it is pickled, so we check its presence, not its
contents. Only rank 0 moves incomplete folders.

Pickle containment: the Trainer writes optimizer.pt / scheduler.pt / rng_state.pth with
torch.save. transformers 5 reads them back with `torch.load(weights_only=True)` (inside its
`safe_globals()` allow-list for the numpy RNG state), i.e. PyTorch's restricted unpickler
that only rebuilds tensors and plain containers; we check them the same way. They are this
run's own local files and are never shipped: the adapter output holds safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SKIPPED = "skipped"
FSDP_MODEL = "pytorch_model_fsdp"  # transformers.trainer.FSDP_MODEL_NAME
# Keys that change how a run is saved, logged or scheduled on this machine, not its weights:
# changing them keeps resuming the same run.
NOT_FINGERPRINTED = ("save_total_limit", "adaptive_batch_size", "memory_budget_gib",
                     "per_device_eval_batch_size", "divergence_factor", "divergence_steps")


def fingerprint(params: dict[str, Any], data_hash: str) -> str:
    """Short hash of the weight-shaping params (seed, model, quantization, lora, train) + data."""
    train = {k: v for k, v in params.get("train", {}).items() if k not in NOT_FINGERPRINTED}
    doc = {**params, "train": train, "data_sha256": data_hash}
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders of a run, newest (highest N) first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _torch_state_loads(path: Path) -> None:
    import torch
    from transformers.trainer_pt_utils import safe_globals
    with safe_globals():
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _dcp_complete(folder: Path, may_be_empty: bool = False) -> None:
    """A torch.distributed.checkpoint folder whose save finished (see the module docstring).

    `may_be_empty`: the Trainer's adapter-only FSDP model folder, whose shards hold nothing
    (peft finds no LoRA key under FSDP; the tensors are in adapter_model.safetensors).
    """
    shards = list(folder.glob("*.distcp"))
    if not (folder / ".metadata").is_file() or not shards:
        raise FileNotFoundError(2, "no .metadata or shards", str(folder))
    empty = [p.name for p in shards if p.stat().st_size == 0]
    if empty and not may_be_empty:
        raise ValueError(f"{folder.name}: empty shard(s) {', '.join(empty)}")


def _weights_load(ckpt: Path) -> None:
    """The adapter weights: safetensors, and under FSDP also the sharded model folder (the
    safetensors are the whole LoRA tensors medqlora writes after it, see adapter_io)."""
    from safetensors import safe_open
    sharded = ckpt / f"{FSDP_MODEL}_0"
    if sharded.is_dir():
        _dcp_complete(sharded, may_be_empty=True)
    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(2, "No such file", str(weights))
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)


def _optimizer_loads(ckpt: Path) -> None:
    """optimizer.pt (one process, DDP), FSDP's optimizer_0/ folder or optimizer.bin (full)."""
    if (ckpt / "optimizer_0").is_dir():
        _dcp_complete(ckpt / "optimizer_0")
    elif (ckpt / "optimizer.bin").is_file():
        _torch_state_loads(ckpt / "optimizer.bin")
    else:
        _torch_state_loads(ckpt / "optimizer.pt")


def _rng_states_load(ckpt: Path) -> None:
    """rng_state.pth (one process) or rng_state_<rank>.pth for every rank (several)."""
    per_rank = sorted(ckpt.glob("rng_state_*.pth"))
    for path in per_rank or [ckpt / "rng_state.pth"]:
        _torch_state_loads(path)


def problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if "global_step" not in state:
            return "trainer_state.json has no global_step"
        _weights_load(ckpt)
        _optimizer_loads(ckpt)
        _torch_state_loads(ckpt / "scheduler.pt")
        _rng_states_load(ckpt)
    except FileNotFoundError as err:
        return f"missing {Path(err.filename).name if err.filename else err}"
    except Exception as err:  # noqa: BLE001 - any failure to load means "not resumable"
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def latest_complete(run_dir: Path, is_main: bool = True) -> Path | None:
    """The newest complete checkpoint of a run; incomplete newer ones are moved aside.

    `is_main`: this process is rank 0 (RunContext.is_main), the one that moves them and logs.
    """
    found, bad = None, []
    for ckpt in checkpoints(run_dir):
        why = problem(ckpt)
        if why is None:
            found = ckpt
            break
        bad.append((ckpt, why))  # every rank skips the same folders; rank 0 moves them
    if is_main and bad:
        _set_aside(run_dir, bad)
        if found is None:
            log.warning("no complete checkpoint in %s: starting fresh (%d skipped, moved to %s)",
                        run_dir, len(bad), run_dir / SKIPPED)
    return found


SKIPPED_NAME = re.compile(r"^checkpoint-\d+-\d+$")  # what _set_aside names them


def _set_aside(run_dir: Path, bad: list[tuple[Path, str]]) -> None:
    """Move incomplete checkpoints to run_dir/skipped/, deleting the ones moved there earlier
    (the module docstring says why only the latest lot is kept)."""
    skipped = run_dir / SKIPPED
    old = sorted(p for p in skipped.iterdir() if SKIPPED_NAME.match(p.name) and p.is_dir()
                 and not p.is_symlink()) if skipped.is_dir() else []
    for folder in old:
        shutil.rmtree(folder)
    if old:
        log.info("deleted %d checkpoint(s) skipped by an earlier resume from %s: %s", len(old),
                 skipped, ", ".join(p.name for p in old))
    skipped.mkdir(exist_ok=True)
    stamp = int(time.time())
    for ckpt, why in bad:
        # Moved out of the checkpoint-N namespace so the Trainer's rotation (which counts
        # checkpoint-* folders) can neither pick it nor delete a good one because of it.
        dest = skipped / f"{ckpt.name}-{stamp}"
        ckpt.rename(dest)
        log.warning("skipping incomplete checkpoint %s (%s); moved to %s", ckpt, why, dest)
