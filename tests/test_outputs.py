"""Atomic outputs: all or nothing, and what an interrupted write left is cleared next time."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys

import pytest

from medqlora.core import outputs
from medqlora.core.outputs import atomic_dir, atomic_file, read_json, sha256_tree, write_json
from tests.conftest import ROOT


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "one"          # previous output untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp left


def test_leftovers_of_a_killed_write_are_removed_by_the_next(tmp_path):
    out = tmp_path / "prepared"
    # What SIGKILL leaves: a half-written temp folder, an old copy mid-swap, a temp file.
    (tmp_path / ".prepared.tmp-abc123").mkdir()
    (tmp_path / ".prepared.tmp-abc123" / "train.parquet").write_bytes(b"half")
    (tmp_path / ".prepared.old-4242").mkdir()
    (tmp_path / ".prepared_other.tmp-x").mkdir()           # another output's: kept
    (tmp_path / ".m.json.tmp-zz").write_text("{")
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("done")
    write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared_other.tmp-x", "m.json",
                                                          "prepared"]
    assert read_json(tmp_path / "m.json") == {"a": 1}


def test_atomic_file_and_tree_hash(tmp_path):
    with atomic_file(tmp_path / "f.bin", "wb") as handle:
        handle.write(b"abc")
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    # sha256 of a single file is the plain sha256 of its bytes
    assert sha256_tree(tmp_path / "f.bin") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def _strict(text: str):
    """Parse as strict JSON: NaN / Infinity / -Infinity are errors (as jq and JavaScript say)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_never_writes_nan_or_infinity(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    with caplog.at_level(logging.WARNING, logger="medqlora.core.outputs"):
        write_json(path, {"eval_loss": math.inf, "eval_loss_start": math.nan, "steps": 4,
                          "adapter": {"perplexity": -math.inf, "bleu": 1.5},
                          "curve": [1.0, math.nan]})
    assert _strict(path.read_text()) == {
        "eval_loss": None, "eval_loss_start": None, "steps": 4,
        "adapter": {"perplexity": None, "bleu": 1.5}, "curve": [1.0, None],
        "non_finite": {"eval_loss": "inf", "eval_loss_start": "nan",
                       "adapter.perplexity": "-inf", "curve[1]": "nan"}}
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: non-finite values written as null: eval_loss (inf), eval_loss_start (nan), "
        "adapter.perplexity (-inf), curve[1] (nan)"]
    write_json(path, {"eval_loss": 2.5, "curve": (1, 2)})   # finite: as before, no extra key
    assert _strict(path.read_text()) == {"eval_loss": 2.5, "curve": [1, 2]}


def test_meta_json_is_the_same_bytes_at_any_commit(tmp_path, monkeypatch):
    # meta.json is inside DVC-hashed outputs: a commit or a timing in it would change every
    # downstream hash on each re-run. Written from two git repos at different commits, it is
    # byte-identical.
    import subprocess
    from medqlora.core.provenance import write_meta
    (tmp_path / "input.txt").write_text("rows")
    metas = []
    for name in ("one", "two"):
        repo = tmp_path / name
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        (repo / "f").write_text(name)
        subprocess.run(["git", "add", "f"], cwd=repo, check=True)
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm",
                        name], cwd=repo, check=True)
        monkeypatch.chdir(repo)
        meta = write_meta(repo / "out", stage="prepare", params={"seed": 1},
                          inputs={"rows": tmp_path / "input.txt"})
        metas.append((repo / "out" / "meta.json").read_bytes())
    assert metas[0] == metas[1]
    assert set(meta) == {"stage", "params", "inputs", "libraries", "runner"}


# ---------------------------------------------------------------- full disk, quota, ulimit -f

@pytest.mark.parametrize("code, why", [
    (errno.ENOSPC, "No space left on device (the disk holding {folder} is full)"),
    (errno.EDQUOT, "Disk quota exceeded (the disk quota on {folder} is used up)"),
    (errno.EFBIG, "File too large (a file would exceed the largest file this process may "
                  "write (`ulimit -f`) or that the filesystem holding {folder} allows)")])
def test_every_full_disk_errno_names_the_output(tmp_path, code, why):
    def full(*_):
        raise OSError(code, os.strerror(code))
    out = tmp_path / "metrics.json"
    with pytest.raises(outputs.OutputNotWritten) as info:
        with atomic_file(out) as handle:
            handle.write("{")
            full()
    assert info.value.errno == code
    assert info.value.strerror == (f"{out}: cannot write this output: "
                                   f"{why.format(folder=tmp_path)}; the previous output, if "
                                   "any, was left untouched")
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(limit: int):
    """preexec_fn: what `ulimit -f` does, with SIGXFSZ ignored (CPython's own default) so
    the write fails with EFBIG instead of the child being killed."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


WRITE_UNDER_LIMIT = """
import sys
from pathlib import Path
from medqlora.core.outputs import OutputNotWritten, atomic_dir, atomic_file
out = Path(sys.argv[1])
for what in ("file", "dir"):
    try:
        if what == "file":
            with atomic_file(out / "m.json") as handle:
                handle.write("x" * 10_000)
        else:
            with atomic_dir(out / "adapter") as tmp:
                (tmp / "small.txt").write_text("fits")
                (tmp / "weights").write_bytes(b"y" * 10_000)
    except OutputNotWritten as err:
        print(err.strerror)
"""


def test_a_file_size_limit_fails_clearly_and_keeps_the_previous_output(tmp_path):
    # 10,000-byte writes under a 4,096-byte `ulimit -f`: EFBIG in the middle of each.
    write_json(tmp_path / "m.json", {"previous": 1})
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_bytes(b"previous")
    proc = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT, str(tmp_path)],
                          capture_output=True, text=True, preexec_fn=_limit_file_size(4096),
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    why = (f"File too large (a file would exceed the largest file this process may write "
           f"(`ulimit -f`) or that the filesystem holding {tmp_path} allows); the previous "
           "output, if any, was left untouched")
    assert proc.stdout.splitlines() == [
        f"{tmp_path / 'm.json'}: cannot write this output: {why}",
        f"{tmp_path / 'adapter'}: cannot write this output: {why}"], proc.stderr
    assert read_json(tmp_path / "m.json") == {"previous": 1}
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["weights"]
    assert (tmp_path / "adapter" / "weights").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "m.json"]  # no temp left
