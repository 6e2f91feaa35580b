"""Adapter files in and out: peft's save, and FSDP's LoRA tensors gathered, written and loaded.

Under FSDP-QLoRA (runner.distributed.strategy fsdp) peft cannot find the LoRA tensors: its
key filter (peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes) strips only a
leading `_fsdp_wrapped_module.` from module names, while the decoder layers are wrapped
inside the root, so every key is dropped. Seen on 2 H100s (torch 2.11, transformers 5.17,
peft 0.21, accelerate 1.15): the final adapter (gathered through FULL_STATE_DICT, as the
Trainer's save_model does) held no tensor, and the Trainer's adapter-only sharded checkpoints
hold no LoRA weight either, so a resumed run would silently restart the adapter from its init.

So under FSDP medqlora itself
- gathers the LoRA parameters whole on rank 0 inside FSDP.summon_full_params (`gather_lora`),
- writes them in peft's format: the final adapter, and `adapter_model.safetensors` in every
  checkpoint (`SaveLoraInCheckpoints`; medqlora.train.checkpoints requires it in an FSDP
  checkpoint),
- on resume loads that file into the peft model before the Trainer wraps it (`load_lora`).
Every written adapter is read back (`check`): no LoRA tensor, or a sharded one, is an error.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medqlora.train.launch import is_main

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean(name: str) -> str:
    """A parameter name without the wrappers' prefixes (FSDP, activation checkpointing)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def peft_model(model):
    """The PeftModel inside an FSDP (or DDP) wrapper."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def gather_lora(fsdp_model) -> dict:
    """The LoRA tensors of an FSDP model, whole and on the CPU, on rank 0 ({} elsewhere).

    A collective: every rank must call it. Names are the peft model's (`...lora_A.default.weight`).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    lora: dict = {}
    with FSDP.summon_full_params(fsdp_model, writeback=False, rank0_only=True,
                                 offload_to_cpu=True):
        if is_main():
            for name, param in fsdp_model.named_parameters():
                if "lora_" in name:
                    lora[_clean(name)] = param.detach().to("cpu", copy=True)
    return lora


def write_adapter(model, folder: str | Path, lora: dict) -> None:
    """adapter_config.json + adapter_model.safetensors from gathered LoRA tensors (peft format:
    the adapter name taken out of the keys, inference_mode true in the config)."""
    import copy

    from safetensors.torch import save_file
    folder = Path(folder)
    model = peft_model(model)
    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(folder))
    canonical_config(folder)
    tensors = {key.replace(f".{name}.", "."): value.contiguous() for key, value in lora.items()
               if f".{name}." in key}
    tmp = folder / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)  # a checkpoint never shows a half-written file


def canonical_config(folder: str | Path) -> None:
    """Rewrite adapter_config.json with target_modules sorted.

    peft keeps target_modules as a set and writes list(set): the order follows the string
    hashes, which PYTHONHASHSEED randomises per process (7 projections: 191 orders in 200
    seeds). Sorted, equal adapters give equal bytes in every process (DVC hashes, manifests).
    """
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_lora(model, folder: str | Path) -> int:
    """Load adapter_model.safetensors of `folder` into a (not yet wrapped) peft model; returns
    the number of LoRA tensors loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"{folder}/{ADAPTER_WEIGHTS} lacks {len(missing)} LoRA tensors "
                           f"of the model (first: {missing[0]})")
    return len(weights)


def save(trainer, folder: str | Path, lora: dict | None) -> None:
    """The trained adapter into `folder`: peft's save_pretrained, or under FSDP (`lora` holds
    the gathered tensors) write_adapter; config canonical (`canonical_config`); then `check`."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora is None:
        model.save_pretrained(str(folder), safe_serialization=True)
        canonical_config(folder)
    else:
        write_adapter(model, folder, lora)
    check(folder)


def check(folder: str | Path) -> None:
    """Raise unless `folder` holds at least one LoRA tensor and each is a whole 2-D matrix."""
    from safetensors import safe_open
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    lora = {k: v for k, v in shapes.items() if ".lora_A" in k or ".lora_B" in k}
    bad = [k for k, shape in lora.items() if len(shape) != 2 or 0 in shape]
    if not lora or bad:
        raise RuntimeError(
            f"the adapter written to {folder} is incomplete: {len(lora)} LoRA tensors"
            + (f", {len(bad)} not 2-D (first: {bad[0]} {lora[bad[0]]})" if bad else "")
            + ". Please report it with the versions of torch, transformers, peft and accelerate")


class SaveLoraInCheckpoints:
    """Under FSDP: after the Trainer saves checkpoint-N, write the whole LoRA tensors into it.

    `trainer` is set once the Trainer exists: its `model` is the FSDP root after wrapping
    (callbacks are handed the unwrapped model).
    """

    trainer = None

    def on_save(self, args, state, control, **kwargs):
        lora = gather_lora(self.trainer.model)  # every rank joins
        if is_main():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_adapter(self.trainer.model, folder, lora)
            log.info("FSDP: %d LoRA tensors written to %s", len(lora), folder)
