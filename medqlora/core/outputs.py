"""Atomic outputs: a stage writes into a temporary sibling and renames it on success.

An interrupted stage (Ctrl-C, kill -9, full disk) therefore never leaves an output that looks
complete: either the previous output is still there untouched, or nothing is.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


# errno -> why the write failed, in words that say what to free or raise. EFBIG is what a
# `ulimit -f` (RLIMIT_FSIZE) gives: CPython ignores SIGXFSZ, so the write fails instead of
# the process being killed; a filesystem's largest file (4 GiB on FAT32) gives it too.
FULL_DISK = {
    errno.ENOSPC: "the disk holding {folder} is full",
    errno.EDQUOT: "the disk quota on {folder} is used up",
    errno.EFBIG: "a file would exceed the largest file this process may write (`ulimit -f`) "
                 "or that the filesystem holding {folder} allows",
}


class OutputNotWritten(OSError):
    """A full disk, quota or file-size limit stopped an output; the message names the output.

    Nothing of the attempt is left (see atomic_dir, atomic_file); the stages print the message
    alone, without a traceback (medqlora.core.stage.start)."""


@contextlib.contextmanager
def _named_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a full disk, quota or file-size limit as an error that names the output."""
    try:
        yield
    except OutputNotWritten:
        raise  # an inner output (a file inside a folder output) was already named
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        why = FULL_DISK[err.errno].format(folder=path.parent.resolve())
        raise OutputNotWritten(err.errno, f"{path}: cannot write this output: "
                               f"{os.strerror(err.errno)} ({why}); the previous output, if "
                               "any, was left untouched") from err


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temporary siblings an interrupted write of `path` left (`.name.tmp-*`,
    `.name.old-*`). Only one writer per output runs at a time (DVC locks the repo)."""
    found = sorted(path.parent.glob(f".{path.name}.tmp-*")) + sorted(
        path.parent.glob(f".{path.name}.old-*"))
    for leftover in found:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    with _named_full_disk(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _named_full_disk(path):
            yield tmp
            _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    with _named_full_disk(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    encoding = {} if "b" in mode else {"encoding": "utf-8"}
    try:
        # the handle closes inside _named_full_disk: a close that flushes can hit the limit too
        with _named_full_disk(path), os.fdopen(fd, mode, **encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def finite(obj: Any) -> tuple[Any, dict[str, str]]:
    """A copy of `obj` with every NaN or infinity replaced by None, and {where: "nan" | "inf" |
    "-inf"} for each one (`where` as `a.b[2]`). Python's json writes them as NaN/Infinity,
    which is not JSON: strict parsers (jq, JavaScript, DVC's plots) reject the whole file."""
    found: dict[str, str] = {}

    def clean(node: Any, where: str) -> Any:
        if isinstance(node, float) and not math.isfinite(node):
            found[where or "(top level)"] = str(node)
            return None
        if isinstance(node, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    return clean(obj, ""), found


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted, strict JSON, atomically.

    A non-finite number is written as null, and a mapping gets a "non_finite" entry saying
    which values were and what they were ({"eval.perplexity": "inf"}), with a warning.
    """
    obj, found = finite(obj)
    if found:
        log.warning("%s: non-finite values written as null: %s", path,
                    ", ".join(f"{k} ({v})" for k, v in found.items()))
        if isinstance(obj, dict):
            obj = {**obj, "non_finite": found}
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """One sha256 over a file, or over a folder's relative paths and file contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
