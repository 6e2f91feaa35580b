"""Atomic outputs: all or nothing, and what an interrupted write left is cleared next time."""
from __future__ import annotations

import json
import logging
import math

import pytest

from medqlora.core.outputs import atomic_dir, atomic_file, read_json, sha256_tree, write_json


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
