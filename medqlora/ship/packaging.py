"""Building the deployable package: adapter (+ merged weights), tokenizer, generation settings,
model card, provenance and a checksummed manifest (medqlora/ship/manifest.py, which also verifies
one; medqlora/evaluate/generation.py loads a package and generates from it).

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

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from medqlora.core.config import Params
from medqlora.core.outputs import atomic_dir, read_json, sha256_tree
from medqlora.core.provenance import library_versions, read_meta, runner_info, write_meta
from medqlora.ship.manifest import canonical, write_manifest

log = logging.getLogger(__name__)
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files of the adapter folder that are not copied: provenance moves into the package's own
# meta.json, and peft's README stub is replaced by the model card.
ADAPTER_SKIP = {"meta.json", "README.md"}


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
    """The metrics and plots files dvc.yaml declares: reports, not inputs of the package; their
    hashes stay out of its lineage."""
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


def link_tree(src: Path, dst: Path) -> None:
    """Every file of `src` at the same place under `dst`, hard-linked where the filesystem
    allows (link_or_copy). Stops at the first failure with its own error: shutil.copytree
    would gather failures into one shutil.Error without an errno, and a full disk or
    `ulimit -f` (EFBIG) in a copy would then not read as one (outputs.OutputNotWritten)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            link_or_copy(str(path), str(target))


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
    from medqlora.evaluate.generation import GenerationSettings, generation_config
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

    from medqlora.ship import modelcard
    adapter_dir, merged_dir, metrics_dir = Path(adapter_dir), Path(merged_dir), Path(metrics_dir)
    adapter_meta = read_meta(adapter_dir)
    # metrics/measured/ (speed, memory: they differ per machine) is never read: no timings
    metrics = {name: _optional_json(metrics_dir / f"{name}.json")
               for name in ("prepare", "train", "evaluate", "benchmark", "merge")}
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
            link_tree(merged_dir, tmp / "merged")
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
                          "merged_weights": merged, "prompt": prompt_format(data_meta),
                          # which weights evaluate decoded, and their measured agreement
                          "decoding": (metrics["evaluate"] or {}).get("decoding")})
        manifest = write_manifest(tmp, lineage(params, adapter_meta, merged_meta, merged,
                                               data_meta))
    log.info("package %s: %d files, verified by `medqlora verify %s`", out_dir,
             len(manifest["files"]), out_dir)
    return manifest
