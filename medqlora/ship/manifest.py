"""The package manifest: sha256 and size of every file, lineage, and a digest of both.

    manifest = write_manifest(package_dir, lineage)   # the last step of packaging.build_package
    problems = verify(package_dir)                    # `medqlora verify`; serve and export first

The digest covers the file table and the lineage, so the manifest's own bytes are checked too.

A package holds folders and regular files only. A symbolic link (to a folder, to nothing, to
/dev/zero, or to an identical copy outside the package, which verifies today and can change
tomorrow), a FIFO, a device or a socket is refused by name, never followed or read: reading a
FIFO or /dev/zero never ends, and a link makes the package depend on what lies outside it.
The folder named on the command line may itself be a link; nothing inside it may.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
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


def scan(root: Path) -> tuple[list[Path], dict[str, str]]:
    """(the regular files under `root`, {relative posix path: what it is} of every entry that is
    neither a folder nor a regular file). Links are listed, never followed."""
    files, special, folders = [], {}, [root]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_file(follow_symlinks=False):
                    files.append(path)
                else:
                    special[path.relative_to(root).as_posix()] = describe_special(path)
    return sorted(files), special


def describe_special(path: Path) -> str:
    """'a FIFO', 'a symbolic link to /dev/zero (a character device)', ... for a path that is
    neither a folder nor a regular file."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        try:
            target = _kind(path.stat().st_mode)
        except OSError:  # dangling, or a loop of links
            target = "which does not exist"
        return f"a symbolic link to {os.readlink(path)} ({target})"
    return _kind(mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"of file type {stat.S_IFMT(mode):o}"


def file_table(root: Path, files: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "size"}} of every regular file under `root` (`files`,
    when already scanned) but the manifest."""
    table = {}
    for path in scan(root)[0] if files is None else files:
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def _special_problems(special: dict[str, str]) -> list[str]:
    return [f"not a regular file: {rel} is {what}" for rel, what in sorted(special.items())]


def write_manifest(root: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """manifest.json: the file table, lineage, and a digest of both (so the manifest's own
    bytes are checked too). Raises ValueError when `root` holds anything but folders and
    regular files: `verify` would refuse the package."""
    files, special = scan(root)
    if special:
        raise ValueError(f"{root}: a package holds regular files only; "
                         + "; ".join(_special_problems(special)))
    body = {"format": MANIFEST_FORMAT, "files": file_table(root, files), "lineage": lineage}
    manifest = {**body, "digest": _digest(body)}
    (root / MANIFEST).write_text(canonical(manifest), encoding="utf-8")
    return manifest


def verify(root: str | Path) -> list[str]:
    """Every problem of a package folder, one line each ([] when intact).

    "not a regular file: F is ..." for links, FIFOs, devices and sockets (never followed or
    read), "missing: F", "extra: F", "altered: F (...)" for files, and "altered: manifest.json"
    when the manifest's own bytes differ from what was written.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        return [f"{root}: not a folder"]
    files, special = scan(root)
    problems = _special_problems(special)
    if MANIFEST in special:
        return problems  # a manifest reached through a link vouches for nothing
    if not path.is_file():
        return problems + [f"missing: {MANIFEST} (not a medqlora package, or an incomplete copy)"]
    try:
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
        body = {k: manifest[k] for k in ("format", "files", "lineage")}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return problems + [f"altered: {MANIFEST} (unreadable: {err})"]
    if text != canonical(manifest) or manifest.get("digest") != _digest(body):
        # The file table itself is untrustworthy: comparing files against it would mislead.
        return problems + [f"altered: {MANIFEST} (its digest does not match its contents)"]
    actual = file_table(root, files)
    for rel, want in sorted(body["files"].items()):
        if any(rel == odd or rel.startswith(f"{odd}/") for odd in special):
            continue  # said above: "missing" too would be noise
        have = actual.get(rel)
        if have is None:
            problems.append(f"missing: {rel}")
        elif have != want:
            problems.append(f"altered: {rel} (sha256 {have['sha256'][:12]}…, size {have['size']};"
                            f" manifest says {want['sha256'][:12]}…, size {want['size']})")
    problems.extend(f"extra: {rel}" for rel in sorted(set(actual) - set(body["files"])))
    return problems
