"""The package manifest: sha256 and size of every file, lineage, and a digest of both.

    manifest = write_manifest(package_dir, lineage)   # the last step of packaging.build_package
    problems = verify(package_dir)                    # `medqlora verify`; serve and export first

The digest covers the file table and the lineage, so the manifest's own bytes are checked too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medqlora.core.outputs import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


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
