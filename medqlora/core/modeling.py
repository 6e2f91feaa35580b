"""Loading models: the base (4-bit through bitsandbytes, or plain), its tokenizer, LoRA.

The same functions serve train, evaluate, merge and `medqlora generate`, so every stage sees
the base exactly as training did. GPU-only libraries are imported lazily; on a CPU the base is
still really quantized (bitsandbytes runs NF4 on CPU).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from medqlora.core import cpu_numerics
from medqlora.core.config import LoraParams, ModelParams, QuantizationParams

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The dtypes a run actually uses on this device, after documented fallbacks."""
    device: str              # "cuda" or "cpu"
    compute_dtype: torch.dtype
    bf16: bool               # Trainer mixed precision flags
    fp16: bool
    notes: tuple[str, ...]   # every fallback taken, for the log and meta.json


def device_name() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(quant: QuantizationParams, mixed_precision: str = "auto",
                      device: str | None = None) -> Precision:
    """Pick compute dtype and mixed precision the device can run.

    Fallbacks (documented in the schema): bfloat16 on a GPU without bf16 support (before
    Ampere) becomes float16; fp16 mixed precision on CPU becomes none (CPU autocast is bf16
    only); `auto` means bf16 where supported, else fp16 on GPU, else none.
    """
    device = device or device_name()
    notes = []
    compute = DTYPES[quant.bnb_4bit_compute_dtype]
    bf16_ok = device == "cpu" or torch.cuda.is_bf16_supported()
    if compute is torch.bfloat16 and not bf16_ok:
        compute = torch.float16
        notes.append("quantization.bnb_4bit_compute_dtype: bfloat16 unsupported on this GPU; "
                     "using float16")
    mode = mixed_precision
    if mode == "auto":
        mode = "bf16" if compute is torch.bfloat16 else ("fp16" if device == "cuda" and
                                                          compute is torch.float16 else "no")
    if mode == "bf16" and not bf16_ok:
        mode = "fp16"
        notes.append("train.mixed_precision: bf16 unsupported on this GPU; using fp16")
    if mode == "fp16" and device == "cpu":
        mode = "no"
        notes.append("train.mixed_precision: fp16 needs CUDA; running without mixed precision")
    for note in notes:
        log.warning(note)
    return Precision(device, compute, mode == "bf16", mode == "fp16", tuple(notes))


def bnb_config(quant: QuantizationParams, compute_dtype: torch.dtype):
    """BitsAndBytesConfig from the `quantization` section (None for plain LoRA)."""
    if not quant.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig
    storage = DTYPES.get(quant.bnb_4bit_quant_storage, torch.uint8)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


def base_source(model: ModelParams) -> str:
    """What from_pretrained loads for `model.base`: the folder or hub id itself, or, with
    model.gguf_file, the checkpoint materialised from that GGUF (medqlora.core.gguf)."""
    if model.gguf_file:
        from medqlora.core.gguf import materialise
        return str(materialise(model.base, model.gguf_file))
    return model.base


def _source(model: ModelParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision and not model.is_local:
        kwargs["revision"] = model.revision
    return kwargs


# How a tokenizer was loaded, not what it is: transformers keeps these in init_kwargs and
# save_pretrained writes them into tokenizer_config.json, so a tokenizer loaded with
# HF_HUB_OFFLINE=1 (make repro) would be saved differently from one loaded without it
# (a bare `dvc repro`), and the same inputs would give different adapter bytes.
LOAD_ONLY_KWARGS = ("local_files_only", "cache_dir", "force_download", "proxies", "token")


def _with_pad(tokenizer):
    """The tokenizer with a pad token (eos when it has none) and no load-time options."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for key in LOAD_ONLY_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def load_tokenizer(model: ModelParams):
    """The base's tokenizer, with a pad token (eos when the base has none)."""
    from transformers import AutoTokenizer
    return _with_pad(AutoTokenizer.from_pretrained(base_source(model), **_source(model)))


def saved_tokenizer(folder: str | Path, model: ModelParams):
    """The tokenizer train saved beside an adapter (or a package holds), else the base's;
    pad falls back to eos as in load_tokenizer."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return load_tokenizer(model)
    from transformers import AutoTokenizer
    return _with_pad(AutoTokenizer.from_pretrained(str(folder)))


def device_map(precision: Precision) -> dict[str, int | str]:
    """Whole model on one device: this process's GPU (LOCAL_RANK, set by accelerate/torchrun;
    0 when alone), else the CPU."""
    if precision.device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_base(model: ModelParams, quant: QuantizationParams, precision: Precision):
    """The frozen base: NF4 through bitsandbytes when load_in_4bit, else the compute dtype."""
    from transformers import AutoModelForCausalLM
    if precision.device == "cpu":  # threads and attention kernel: same bytes on any CPU
        cpu_numerics.pin_torch()
    config = bnb_config(quant, precision.compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(
        base_source(model),
        quantization_config=config,
        dtype=precision.compute_dtype,
        device_map=device_map(precision),
        attn_implementation=model.attn_implementation,
        **_source(model),
    )
    base.config.use_cache = False
    log.info("loaded base %s%s (%s, %s on %s)", model.base,
             f"/{model.gguf_file}" if model.gguf_file else "",
             f"4-bit {quant.bnb_4bit_quant_type}" if config else "not quantized",
             str(precision.compute_dtype).removeprefix("torch."), precision.device)
    return base


def keep_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns layers changed.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a Linear4bit's weights to a CPU
    inference layout on the first forward in eval mode, and never converts them back: after
    the Trainer's first evaluation every training step would run through `gemv_4bit`, which
    has no autograd kernel (PyTorch warns "may lead to silently incorrect behavior"), so
    gradients flowing through the frozen base to earlier LoRA layers would be wrong. Training
    turns the repacking off; weights already repacked are converted back.
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = (
                    _convert_weight_packed_for_cpu_inverse(module.weight.data, state))
            changed += 1
    return changed


def lora_config(lora: LoraParams):
    """peft LoraConfig from the `lora` section."""
    from peft import LoraConfig
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(
        lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )


class WeightsFileError(ValueError):
    """A weights file that is not a valid safetensors file (truncated or corrupt); the message
    is one line naming the file."""


def check_safetensors(path: str | Path) -> None:
    """Raise WeightsFileError unless `path` opens as a safetensors file.

    Opening reads only the header, and checks that it parses and that the tensors it declares
    cover the file exactly: a truncated copy fails here in one line, before anything loads,
    instead of as a bare SafetensorError traceback from peft or transformers after the base.
    """
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise WeightsFileError(f"{path}: not a valid safetensors file, truncated or corrupt "
                               f"({reason}); copy it again or rebuild it") from None


def load_adapter(base, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved adapter (safetensors only) to a loaded base; WeightsFileError when its
    weights file is truncated or corrupt."""
    from peft import PeftModel
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_model.safetensors is missing: "
                                "not a medqlora/peft adapter folder")
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements x 2."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        # bitsandbytes packs two 4-bit values per uint8 element.
        if param.dtype == torch.uint8:
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


class LoadSettings(NamedTuple):
    """How to load the base an adapter was trained on (unpacks as model, quant, precision)."""
    model: ModelParams
    quant: QuantizationParams
    precision: Precision


def settings_from_meta(meta: dict[str, Any]) -> LoadSettings:
    """The ModelParams, QuantizationParams and Precision an adapter was trained with, from its
    meta.json.

    Downstream stages load the base exactly as train did: same id/revision, same 4-bit
    settings, same compute dtype (meta["precision"]["compute_dtype"], which already includes
    train's fallbacks). The precision is re-resolved for *this* device, so an adapter trained
    with bf16 on an Ampere GPU still loads on an older GPU (float16, noted) or a CPU.
    """
    from dataclasses import fields, replace
    params = meta["params"]
    recorded = params["model"]
    model = ModelParams(**{"gguf_file": None,   # meta.json written before GGUF bases existed
                           **{f.name: recorded[f.name] for f in fields(ModelParams)
                              if f.name in recorded}})
    quant = QuantizationParams(**{f.name: params["quantization"][f.name]
                                  for f in fields(QuantizationParams)})
    trained = meta.get("precision", {})
    compute = trained.get("compute_dtype", quant.bnb_4bit_compute_dtype)
    mixed = "bf16" if trained.get("bf16") else ("fp16" if trained.get("fp16") else "no")
    precision = resolve_precision(replace(quant, bnb_4bit_compute_dtype=compute), mixed)
    return LoadSettings(model, quant, precision)


def load_shipped(adapter_dir: str | Path):
    """(peft model, tokenizer, adapter meta): the base rebuilt from the adapter's meta.json, as
    train loaded it (4-bit, same compute dtype), with the adapter attached: what a package ships
    and what evaluate and the benchmarks score."""
    from medqlora.core.provenance import read_meta
    meta = read_meta(adapter_dir)
    model_params, quant, precision = settings_from_meta(meta)
    tokenizer = saved_tokenizer(adapter_dir, model_params)
    model = load_adapter(load_base(model_params, quant, precision), adapter_dir)
    model.eval()
    return model, tokenizer, meta
