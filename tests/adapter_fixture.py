"""A small trained QLoRA adapter on a tiny base, for merge and package tests.

LoRA's B starts at zero, so an untrained adapter merges to exactly the base and proves nothing;
`make_adapter` takes a few SGD steps so B·A is non-zero, then writes the folder train writes:
peft files, tokenizer, and the meta.json train writes (params, precision, base), through the same
writer (medqlora.core.provenance.write_meta).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from medqlora.core import modeling
from medqlora.core.config import build_params
from medqlora.core.provenance import write_meta
from medqlora.train import training

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["### Instruction:\nWhat is anemia?\n\n### Response:\nA low hemoglobin level.",
         "### Instruction:\nFirst-line treatment of hypertension?\n\n### Response:\nThiazide."]


def adapter_params(base: str, **overrides):
    """Typed params of the shipped params.yaml with `model.base` and dotted overrides."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["model"]["base"] = base
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        doc[section][key] = value
    return build_params(doc)


def make_adapter(base: str, out: Path, steps: int = 8, lr: float = 0.05, **overrides) -> Path:
    """Train a LoRA adapter on the 4-bit `base` for `steps` SGD steps; save it like train does."""
    from peft import get_peft_model
    params = adapter_params(base, **overrides)
    precision = modeling.resolve_precision(params.quantization, "no")
    torch.manual_seed(0)
    tokenizer = modeling.load_tokenizer(params.model)
    model = get_peft_model(modeling.load_base(params.model, params.quantization, precision),
                           modeling.lora_config(params.lora))
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    adapter_meta(out, params, precision, base)
    return out


def adapter_meta(out: Path, params, precision, base: str) -> dict:
    """The adapter's meta.json, through the writer train uses (medqlora.core.provenance)."""
    return write_meta(out, stage="train", params=params.section(*training.SECTIONS), inputs={},
                      extra={"precision": {"device": precision.device,
                                           "compute_dtype": str(precision.compute_dtype)
                                           .removeprefix("torch."),
                                           "bf16": precision.bf16, "fp16": precision.fp16,
                                           "notes": list(precision.notes)},
                             "base": {"id": base, "revision": None, "sha256": None}})


def write_test_split(data_dir: Path, prompts: list[str]) -> Path:
    """A minimal data/prepared/test.parquet holding the `prompt` column merge reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts}), data_dir / "test.parquet")
    return data_dir
