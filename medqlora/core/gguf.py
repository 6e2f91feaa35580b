"""A GGUF file as a base model: materialised once as a transformers checkpoint.

    folder = materialise("models/smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # -> .cache/medqlora/gguf/<sha256[:16]>/ with model.safetensors, config.json, the tokenizer
    #    (chat template included) and gguf.json {"file", "sha256", "bytes"}

Many community models exist only as GGUF. transformers reads one with
`from_pretrained(folder, gguf_file=...)`: it dequantizes every tensor (Q4_1, Q8_0, ...) to float
and rebuilds the tokenizer and chat template from the file's metadata. A model loaded that way
carries a GGUF "quantizer" and refuses save_pretrained, and loading it takes ~20 s on a CPU, so
it is done once: the weights are moved into a model built from the same config and saved as
safetensors in float32, the dtype the dequantization produces (lossless: a Q4_1 value is
d * q + m with d and m float16; bfloat16 would round it). Every later load (train, evaluate,
merge, serve, export) reads that folder like any checkpoint, then quantizes it to NF4 as usual.

The folder is named by the GGUF's sha256, so a changed file gets a new folder and a folder is
never half-written (atomic rename). It lives under $MEDQLORA_CACHE, else .cache/medqlora in the
working directory (git-ignored), never in a home-directory cache.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medqlora.core.outputs import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)
RECORD = "gguf.json"
# Bumped whenever the conversion changes, so a folder made by an older one is made again.
FORMAT = 2   # 2: special tokens from the file's metadata


def cache_root() -> Path:
    """Where materialised bases live: $MEDQLORA_CACHE/gguf, else ./.cache/medqlora/gguf."""
    return Path(os.environ.get("MEDQLORA_CACHE") or Path(".cache") / "medqlora") / "gguf"


def gguf_path(folder: str | Path, gguf_file: str) -> Path:
    """folder/gguf_file, or FileNotFoundError naming the params to change."""
    path = Path(folder) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: {path} is not a file (model.base: {folder}); "
                                "`make smollm2` extracts the example's GGUF")
    return path


def describe(folder: str | Path, gguf_file: str) -> dict[str, Any]:
    """What meta.json and the package lineage record of a GGUF base."""
    path = gguf_path(folder, gguf_file)
    return {"file": gguf_file, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def materialise(folder: str | Path, gguf_file: str) -> Path:
    """The checkpoint folder of a GGUF base, written on first use (about 20 s for 135M
    parameters on one CPU core), then reused."""
    record = describe(folder, gguf_file)
    out = cache_root() / record["sha256"][:16]
    if (out / RECORD).is_file() and read_json(out / RECORD) == {**record, "format": FORMAT}:
        return out
    log.info("materialising %s/%s (sha256 %s) as safetensors in %s", folder, gguf_file,
             record["sha256"][:16], out)
    with atomic_dir(out) as tmp:
        _convert(Path(folder), gguf_file, tmp)
        write_json(tmp / RECORD, {**record, "format": FORMAT})
    return out


def _convert(folder: Path, gguf_file: str, dest: Path) -> None:
    """Dequantized weights into a plain model of the same config; saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):   # the GGUF "quantizer": the copy is plain
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are one tensor under two names; anything else missing is a bug.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{folder / gguf_file}: the dequantized weights do not fit the "
                           f"model built from its config (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    plain.generation_config = loaded.generation_config
    _special_tokens_from_metadata(folder / gguf_file, tokenizer, plain)
    plain.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


SPECIAL = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
           "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}


def special_token_ids(path: Path) -> dict[str, int]:
    """{"bos": 1, "eos": 2, ...}: the special-token ids the GGUF file itself declares."""
    from gguf import GGUFReader
    fields = GGUFReader(str(path)).fields
    return {name: int(fields[key].parts[fields[key].data[0]][0])
            for name, key in SPECIAL.items() if key in fields}


def _special_tokens_from_metadata(path: Path, tokenizer, model) -> None:
    """The file's own bos/eos/pad/unk, whatever the transformers version's GGUF conversion
    guessed: transformers 5.17 gave SmolLM2's tokenizer eos <|im_start|> (id 1) where the
    file says 2 (<|im_end|>), so every answer would have been trained to end on the token
    that opens a turn."""
    ids = special_token_ids(path)
    for name, token_id in ids.items():
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    for config in (model.config, model.generation_config):
        for name, token_id in ids.items():
            if name != "unk":
                setattr(config, f"{name}_token_id", token_id)
