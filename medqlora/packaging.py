"""The deployable package: adapter (+ merged weights), tokenizer, generation settings, model
card, provenance and a checksummed manifest; and `verify`, which checks one.

    python stages/package.py --params params.yaml --adapter models/adapter --merged models/merged \
        --metrics-dir metrics --plots dvclive/train --out artifacts/package
    medqlora verify artifacts/package

Layout of artifacts/package/:
    adapter_config.json, adapter_model.safetensors   peft adapter (loads with peft alone)
    tokenizer.json, tokenizer_config.json, ...        the tokenizer train used
    generation_config.json                            the evaluated decoding settings
    merged/                                           merged weights (package.include_merged)
    README.md, images/*.png                           model card
    meta.json                                         provenance, incl. the adapter's meta.json
    manifest.json                                     sha256 + size of every other file, lineage

adapter_config.json's base_model_name_or_path is the base as `model.base` names it: a hub id, or
for a local base its path relative to the project root (models/tiny-med-llama). transformers
resolves a relative path against the working directory, so the loading code runs from the
project root, or from a deployment folder that holds the base at that same relative path
(`dvc get <repo> models/tiny-med-llama -o models/tiny-med-llama`). docs/deploy.md shows both.

Bytes are deterministic (no timestamps, commit or measured speed; sorted JSON; PNGs without a
date): rebuilding from the same inputs gives identical files, at any commit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from medqlora.config import Params
from medqlora.outputs import atomic_dir, read_json, sha256_file, sha256_tree, write_json
from medqlora.provenance import (library_versions, read_meta, reproducible, runner_info,
                                 write_meta)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files of the adapter folder that are not copied: provenance moves into the package's own
# meta.json, and peft's README stub is replaced by the model card.
ADAPTER_SKIP = {"meta.json", "README.md"}


# ---------------------------------------------------------------- manifest

def canonical(obj: Any) -> str:
    """The one JSON text a manifest is written as (sorted keys, 2-space indent, newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "size"}} of every file under `root` but the manifest."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def write_manifest(root: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """manifest.json: the file table, lineage, and a digest of both (so the manifest's own
    bytes are checked too)."""
    body = {"format": MANIFEST_FORMAT, "files": file_table(root), "lineage": lineage}
    manifest = {**body, "digest": _digest(body)}
    (root / MANIFEST).write_text(canonical(manifest), encoding="utf-8")
    return manifest


def verify(root: str | Path) -> list[str]:
    """Every problem of a package folder, one line each ([] when intact).

    "missing: F", "extra: F", "altered: F (...)" for files, and "altered: manifest.json" when
    the manifest's own bytes differ from what was written.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        return [f"{root}: not a folder"]
    if not path.is_file():
        return [f"missing: {MANIFEST} (not a medqlora package, or an incomplete copy)"]
    try:
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
        body = {k: manifest[k] for k in ("format", "files", "lineage")}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return [f"altered: {MANIFEST} (unreadable: {err})"]
    if text != canonical(manifest) or manifest.get("digest") != _digest(body):
        # The file table itself is untrustworthy: comparing files against it would mislead.
        return [f"altered: {MANIFEST} (its digest does not match its contents)"]
    problems = []
    actual = file_table(root)
    for rel, want in sorted(body["files"].items()):
        have = actual.get(rel)
        if have is None:
            problems.append(f"missing: {rel}")
        elif have != want:
            problems.append(f"altered: {rel} (sha256 {have['sha256'][:12]}…, size {have['size']};"
                            f" manifest says {want['sha256'][:12]}…, size {want['size']})")
    problems.extend(f"extra: {rel}" for rel in sorted(set(actual) - set(body["files"])))
    return problems


# ---------------------------------------------------------------- lineage

def dvc_lock_hashes(lock_path: Path = Path("dvc.lock"), skip: str = "package") -> dict | None:
    """Per upstream stage: deps/outs hashes and params, as recorded in dvc.lock (None if absent).

    The package stage's own entry is left out: it describes an earlier package build.
    """
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    reports = report_paths(lock_path.with_name("dvc.yaml"))
    out = {}
    for name, entry in sorted((lock.get("stages") or {}).items()):
        if name == skip:
            continue
        out[name] = {
            kind: {item["path"]: item.get("md5") or item.get("hash") for item in entry.get(kind, [])
                   if item["path"] not in reports}
            for kind in ("deps", "outs")
        }
        out[name]["params"] = entry.get("params", {})
    return out


def report_paths(pipeline: Path) -> set[str]:
    """The metrics and plots files dvc.yaml declares: reports (metrics/train.json holds measured
    speed), not inputs of the package; their hashes stay out of its lineage."""
    if not pipeline.is_file():
        return set()
    stages = (yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}).get("stages") or {}
    return {next(iter(item)) if isinstance(item, dict) else item
            for stage in stages.values() for kind in ("metrics", "plots")
            for item in stage.get(kind) or []}


def lineage(params: Params, adapter_meta: dict, merged_meta: dict | None,
            merged: dict[str, Any], data_meta: dict | None = None) -> dict[str, Any]:
    """Where the package came from: dvc.lock hashes, data sources, base, libraries, runner,
    and whether merged weights are included (and why not). No commit: the tag that names the
    package names it; equal inputs give an equal manifest.

    `data_sources`: sha256 of each raw file prepare read (data/prepared/meta.json), so the
    package names the exact data even when a source is one file of a DVC-tracked folder.
    """
    return {
        "name": params.package.name,
        "dvc_lock": dvc_lock_hashes(),
        "data_sources": None if data_meta is None else {
            name: entry.get("sha256") for name, entry in sorted(
                (data_meta.get("inputs") or {}).items())},
        "base": adapter_meta.get("base"),
        "quantization": adapter_meta.get("params", {}).get("quantization"),
        "merged": {**merged, **({} if merged_meta is None else {
            "into": merged_meta.get("into"), "dtype": merged_meta.get("dtype"),
            "parity": merged_meta.get("parity")})},
        "libraries": library_versions(),
        "runner": runner_info(),
    }


# ---------------------------------------------------------------- building

def portable_base(base: str) -> str:
    """The base as users will name it: a hub id as is, a local folder inside the project
    relative to the project root (the working directory of every stage)."""
    path = Path(base)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            log.warning("model.base %s is outside the project: the package's "
                        "base_model_name_or_path only resolves on this machine", base)
    return base


def copy_adapter(adapter_dir: Path, out: Path, base: str, revision: str | None) -> None:
    """Adapter weights and tokenizer, with base_model_name_or_path pointing at the base."""
    for path in sorted(adapter_dir.iterdir()):
        if not path.is_file() or path.name in ADAPTER_SKIP:
            continue
        if path.suffix in PICKLED:
            raise ValueError(f"{path}: pickled weights are not packaged (safetensors only)")
        shutil.copyfile(path, out / path.name)
    config = read_json(adapter_dir / "adapter_config.json")
    config["base_model_name_or_path"] = base
    config["revision"] = revision
    (out / "adapter_config.json").write_text(canonical(config), encoding="utf-8")


def check_merged(merged_dir: Path, adapter_dir: Path, merge_metrics: dict | None) -> dict:
    """The merged folder's meta.json, after checking it was merged from *this* adapter.

    A merge whose parity gate failed left a folder without weights (meta.json "merged":
    false and the reason): the package then ships the adapter alone and says so.
    """
    meta = read_meta(merged_dir)
    if meta.get("skipped"):
        raise ValueError(f"package.include_merged: true, but {merged_dir} is empty "
                         "(merge.enabled: false); set package.include_merged: false")
    made_from = meta.get("inputs", {}).get("adapter", {}).get("sha256")
    if made_from != sha256_tree(adapter_dir):
        raise ValueError(f"{merged_dir} was merged from another adapter than {adapter_dir}: "
                         "re-run the merge stage (dvc repro merge)")
    if meta.get("merged") is False:
        return meta
    if merge_metrics is not None and merge_metrics.get("passed") is not True:
        raise ValueError("metrics/merge.json does not say passed: the merged model is not "
                         "packaged without parity")
    return meta


def link_or_copy(src: str, dst: str) -> str:
    """Hard-link `src` at `dst` (same filesystem), else copy it with its metadata."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def merged_status(merged_meta: dict | None, include_merged: bool) -> dict[str, Any]:
    """{"included": bool, "reason": str | None} for the manifest, meta.json and model card."""
    if not include_merged:
        return {"included": False, "reason": "package.include_merged is false"}
    if merged_meta is None or merged_meta.get("merged") is False:
        return {"included": False, "reason": (merged_meta or {}).get("reason")
                or "the merge stage published no weights"}
    return {"included": True, "reason": None}


def write_generation_config(out: Path, params: Params, evaluate_metrics: dict | None,
                            tokenizer) -> dict[str, Any]:
    """generation_config.json from the settings evaluate recorded (params when absent)."""
    from medqlora.generation import GenerationSettings, generation_config
    settings = GenerationSettings.from_params(params.evaluate, params.seed)
    recorded = (evaluate_metrics or {}).get("generation") or {}
    settings = GenerationSettings(**{
        name: recorded.get(name, getattr(settings, name))
        for name in ("max_new_tokens", "do_sample", "temperature", "top_p", "batch_size", "seed")})
    generation_config(settings, tokenizer).save_pretrained(str(out))
    return settings.as_dict()


def prompt_format(data_meta: dict | None) -> dict[str, Any]:
    """How prepare templated prompts (template name, system text), so generate does the same."""
    data = (data_meta or {}).get("params", {}).get("data", {})
    return {"template": (data_meta or {}).get("template"),
            "system": data.get("system_prompt") or ""}


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def build_package(params: Params, adapter_dir: str | Path, merged_dir: str | Path,
                  metrics_dir: str | Path, plots_dir: str | Path, out_dir: str | Path,
                  data_meta_path: str | Path = "data/prepared/meta.json") -> dict:
    """Write artifacts/package atomically; return its manifest."""
    from transformers import AutoTokenizer
    from medqlora import modelcard
    adapter_dir, merged_dir, metrics_dir = Path(adapter_dir), Path(merged_dir), Path(metrics_dir)
    adapter_meta = read_meta(adapter_dir)
    metrics = {name: reproducible(_optional_json(metrics_dir / f"{name}.json"))
               for name in ("prepare", "train", "evaluate", "benchmark", "merge")}  # no timings in the card
    merged_meta = (check_merged(merged_dir, adapter_dir, metrics["merge"])
                   if params.package.include_merged else None)
    merged = merged_status(merged_meta, params.package.include_merged)
    if params.package.include_merged and not merged["included"]:
        log.warning("package without merged weights: %s; the adapter is packaged and loads on "
                    "the 4-bit base", merged["reason"])
    data_meta = _optional_json(Path(data_meta_path))
    model = adapter_meta.get("params", {}).get("model", {})
    base = portable_base(model.get("base") or adapter_meta["base"]["id"])
    with atomic_dir(out_dir) as tmp:
        copy_adapter(adapter_dir, tmp, base, model.get("revision"))
        tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        generation = write_generation_config(tmp, params, metrics["evaluate"], tokenizer)
        if merged["included"]:
            # Hard links where the filesystem allows: a 7B float32 merge is 28 GB, and the
            # package would otherwise hold a second copy of it (the bytes are identical).
            shutil.copytree(merged_dir, tmp / "merged", copy_function=link_or_copy)
        images = modelcard.write_charts(tmp / "images", Path(plots_dir), metrics["evaluate"])
        card = modelcard.Card(name=params.package.name, license=params.package.license,
                              base=base, adapter_meta=adapter_meta, metrics=metrics,
                              generation=generation, images=images,
                              merged=merged,
                              data_meta=data_meta)
        (tmp / "README.md").write_text(modelcard.render(card), encoding="utf-8")
        write_meta(tmp, stage="package",
                   params=params.section("package") | {"generation": generation},
                   inputs={"adapter": adapter_dir,
                           **({"merged": merged_dir} if merged["included"] else {})},
                   extra={"adapter": adapter_meta, "merged": merged_meta,
                          "merged_weights": merged, "prompt": prompt_format(data_meta)})
        manifest = write_manifest(tmp, lineage(params, adapter_meta, merged_meta, merged,
                                               data_meta))
    log.info("package %s: %d files, verified by `medqlora verify %s`", out_dir,
             len(manifest["files"]), out_dir)
    return manifest


def package_settings(package_dir: str | Path):
    """(ModelParams, QuantizationParams, Precision) of the base, from the package's meta.json."""
    from medqlora.modeling import settings_from_meta
    meta = read_json(Path(package_dir) / "meta.json")
    return settings_from_meta(meta["adapter"])


# ---------------------------------------------------------------- generate

def load_for_generation(package_dir: str | Path, merged: bool = False):
    """(model, tokenizer) of a package: the 4-bit base + adapter, or the merged weights.

    The base is the adapter_config's base_model_name_or_path (as the reference loading code
    resolves it), loaded with the quantization and compute dtype recorded at training.
    """
    import dataclasses
    from transformers import AutoModelForCausalLM
    from medqlora import modeling
    package_dir = Path(package_dir)
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
    model.eval()
    return model, tokenizer


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
    import torch
    from transformers import GenerationConfig
    from medqlora.generation import GenerationSettings, generate_tokens
    from medqlora.templates import format_prompt
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
