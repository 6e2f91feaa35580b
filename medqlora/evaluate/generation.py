"""Generation with the `evaluate` settings, through the continuous-batching Decoder.

    settings = GenerationSettings.from_params(params.evaluate, params.seed)
    texts = generate_from_ids(model, tokenizer, prompt_ids, settings)

Every prompt becomes a Request of medqlora/evaluate/decoding.py: rows decode together, each
stops at its own eos or end-of-turn token, and its slot takes the next prompt. Greedy decoding
(do_sample false, the default) gives the same text on every run and in any batch; sampling
draws from a generator seeded per prompt. Used by the evaluate stage and, from a built package
(`load_for_generation`, `generate`), by `medqlora generate`, serve and export: one decoding
path. A package whose evaluate kept the dequantized decode copy (meta.json "decoding") is
decoded on that copy here too, where it fits.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from medqlora.core.config import EvaluateParams
from medqlora.core.outputs import read_json
from medqlora.data.templates import stop_ids
from medqlora.evaluate.decoding import Decoder, Request, left_pad  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How outputs are generated (recorded in metrics/evaluate.json under "generation")."""
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    batch_size: int
    seed: int

    @classmethod
    def from_params(cls, evaluate: EvaluateParams, seed: int) -> "GenerationSettings":
        return cls(evaluate.max_new_tokens, evaluate.do_sample, evaluate.temperature,
                   evaluate.top_p, evaluate.batch_size, seed)

    def as_dict(self) -> dict[str, Any]:
        """The settings that shaped the outputs; temperature/top_p only when sampling."""
        out = asdict(self)
        out["decoding"] = "sample" if self.do_sample else "greedy"
        if not self.do_sample:
            del out["temperature"], out["top_p"]
        return out


def generation_config(settings: GenerationSettings, tokenizer):
    """A GenerationConfig built from scratch, so the base's own defaults don't leak in."""
    from transformers import GenerationConfig
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "eos_token_id": stop_ids(tokenizer),   # eos and the chat template's end of turn
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,  # load_base turns the cache off for training; decoding wants it
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return GenerationConfig(**kwargs)


def generate_tokens(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                    settings: GenerationSettings, config=None) -> list[list[int]]:
    """New token ids (up to the first eos or end of turn) of each tokenised prompt, in the input
    order, through the continuous-batching Decoder (medqlora/evaluate/decoding.py).

    Up to settings.batch_size rows decode together (fewer where their KV cache would not fit:
    rows_that_fit); a row leaves at its stop token and the next prompt takes its slot. Longest
    prompts go first. Sampling draws from a generator seeded with settings.seed + the prompt's
    index, so the base and the adapter sample with the same seeds, whatever the batching.
    `config` overrides the GenerationConfig built from `settings` (a package's
    generation_config.json).
    """
    if not prompt_ids:
        return []
    config = config or generation_config(settings, tokenizer)
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [
        config.eos_token_id]
    columns = max(map(len, prompt_ids)) + config.max_new_tokens
    device = next(model.parameters()).device
    rows = min(len(prompt_ids), rows_that_fit(model, device, settings.batch_size, columns))
    decoder = Decoder(model, stops, rows=rows, columns=columns,
                      pad_id=tokenizer.pad_token_id or 0)
    sample = bool(config.do_sample)
    requests = [Request(list(ids), config.max_new_tokens, do_sample=sample,
                        temperature=config.temperature or 1.0, top_p=config.top_p or 1.0,
                        seed=settings.seed + i) for i, ids in enumerate(prompt_ids)]
    decoder.run(sorted(requests, key=lambda r: -len(r.prompt_ids)))
    return [r.tokens for r in requests]


def rows_that_fit(model, device, rows: int, width: int) -> int:
    """The Decoder's slots: at most `rows`, fewer when their KV cache (width positions each)
    would take more than half the GPU's free memory; the rest is left for weights'
    dequantization and prefill. Mistral-7B at 800 positions: 100 MiB a row.

    More slots mean fewer decode steps for a set of prompts, each step a little slower (the
    previous, static-batch engine on an H200: 0.11 s a step at 43 rows, 0.20 s at 355).
    """
    if device.type != "cuda":
        return rows
    from medqlora.core.memory import Arch, kv_cache_bytes
    try:
        arch = Arch.from_config(model.config.to_dict())
    except (KeyError, TypeError, ValueError):  # not a Llama/Mistral-style config: trust rows
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    dtype = getattr(model, "dtype", torch.bfloat16)
    per_row = kv_cache_bytes(arch, width, dtype.itemsize if dtype.is_floating_point else 2)
    return max(1, min(rows, int(free // 2 // per_row)))


def generate_from_ids(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                      settings: GenerationSettings, config=None) -> list[str]:
    """Decoded continuations (special tokens dropped, stripped) of tokenised prompts."""
    return [tokenizer.decode(new, skip_special_tokens=True).strip()
            for new in generate_tokens(model, tokenizer, prompt_ids, settings, config)]


# ---------------------------------------------------------------- from a package
# `medqlora generate`, serve and export load a verified package the same way.

def package_settings(package_dir: str | Path):
    """(ModelParams, QuantizationParams, Precision) of the base, from the package's meta.json."""
    from medqlora.core.modeling import settings_from_meta
    meta = read_json(Path(package_dir) / "meta.json")
    return settings_from_meta(meta["adapter"])


def check_weights(package_dir: str | Path, adapter: bool = True, merged: bool = True) -> None:
    """Raise modeling.WeightsFileError for the first safetensors file of a package that does
    not open (adapter_model.safetensors, merged/'s shards): the header check, before any load."""
    from medqlora.core.modeling import check_safetensors
    package_dir = Path(package_dir)
    files = ([package_dir / "adapter_model.safetensors"] if adapter else []) + (
        sorted((package_dir / "merged").glob("*.safetensors")) if merged else [])
    for path in files:
        check_safetensors(path)


def load_for_generation(package_dir: str | Path, merged: bool = False):
    """(model, tokenizer) of a package: the 4-bit base + adapter, or the merged weights.

    The base is the adapter_config's base_model_name_or_path (as the reference loading code
    resolves it), loaded with the quantization and compute dtype recorded at training. The
    weights it will read are checked first (`check_weights`: WeightsFileError).
    """
    import dataclasses

    from transformers import AutoModelForCausalLM

    from medqlora.core import modeling
    package_dir = Path(package_dir)
    check_weights(package_dir, adapter=not merged, merged=merged)
    model_params, quant, precision = package_settings(package_dir)
    tokenizer = modeling.saved_tokenizer(package_dir, model_params)
    if merged:
        if not (package_dir / "merged" / "config.json").is_file():
            raise FileNotFoundError(f"{package_dir}/merged is missing: the package was built with "
                                    "package.include_merged: false (drop --merged)")
        model = AutoModelForCausalLM.from_pretrained(
            str(package_dir / "merged"), dtype=precision.compute_dtype,
            device_map=modeling.device_map(precision))
    else:
        base = read_json(package_dir / "adapter_config.json")["base_model_name_or_path"]
        model_params = dataclasses.replace(model_params, base=base)
        model = modeling.load_adapter(modeling.load_base(model_params, quant, precision),
                                      package_dir)
        use_decode_copy(model, read_json(package_dir / "meta.json").get("decoding"))
    model.eval()
    return model, tokenizer


def use_decode_copy(model, decided: dict | None) -> bool:
    """Swap in the dequantized copy when evaluate kept it for this adapter (its agreement with
    the 4-bit weights is in the package's meta.json "decoding") and it fits here."""
    from medqlora.evaluate import decode_copy
    if not (decided or {}).get("weights", "").startswith("dequantized"):
        return False
    ok, why = decode_copy.fits(model)
    if not ok:
        log.warning("decoding on the 4-bit weights: %s", why)
        return False
    decode_copy.DecodeCopy.make(model).keep()
    log.info("decoding on the dequantized copy evaluate measured (%s)", why)
    return True


def read_prompts(prompt: str | None, file: str | Path | None) -> list[str]:
    """User texts from --prompt, or from a JSONL file ("prompt", "question" or "instruction"
    [+ "input"] per line)."""
    if prompt is not None:
        return [prompt]
    texts = []
    for number, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: not JSON ({err.msg})") from None
        rec = rec if isinstance(rec, dict) else {}
        text = rec.get("prompt") or rec.get("question") or rec.get("instruction")
        if not isinstance(text, str) or not text:
            raise ValueError(f"{file}:{number}: needs a \"prompt\" (or \"question\", "
                             "\"instruction\") text field")
        if rec.get("instruction") and rec.get("input"):
            text = f"{text}\n\n{rec['input']}"
        texts.append(text)
    return texts


def generate(package_dir: str | Path, texts: list[str], merged: bool = False,
             batch_size: int | None = None) -> dict[str, Any]:
    """Answers to `texts` with the package's generation settings (generation.generate_tokens,
    the path evaluate scored), plus speed and memory."""
    import resource
    import time

    from transformers import GenerationConfig

    from medqlora.data.templates import format_prompt
    package_dir = Path(package_dir)
    model, tokenizer = load_for_generation(package_dir, merged)
    meta = read_json(package_dir / "meta.json")
    system = meta.get("prompt", {}).get("system", "")
    recorded = meta.get("params", {}).get("generation", {})
    config = GenerationConfig.from_pretrained(str(package_dir))
    settings = GenerationSettings(config.max_new_tokens, bool(config.do_sample),
                                  config.temperature or 1.0, config.top_p or 1.0,
                                  batch_size or recorded.get("batch_size", 8),
                                  recorded.get("seed", 0))
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ids = [tokenizer(format_prompt(tokenizer, text, system))["input_ids"] for text in texts]
    start = time.perf_counter()
    new = generate_tokens(model, tokenizer, ids, settings, config)
    seconds = time.perf_counter() - start
    answers = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
    new_tokens = sum(len(tokens) for tokens in new)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {"answers": answers, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds else 0.0,
            "peak_memory_bytes": int(peak), "device": device.type}
