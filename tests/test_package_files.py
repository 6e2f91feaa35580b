"""What the commands that read a package (verify, generate, serve, export) check before any
work: only folders and regular files inside it, and weights files that open as safetensors.

The packages here are fakes (no model): a few small files, a real but tiny safetensors file,
and a manifest written by the library's own writer, which is all these checks read. The
commands run in-process through `medqlora.cli.main`, as `python -m medqlora.cli ...` runs
them, and once in a subprocess.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medqlora import cli
from medqlora.ship.manifest import MANIFEST, verify, write_manifest
from tests.conftest import ROOT


def fake_package(folder: Path) -> Path:
    """A package folder with a manifest that matches it: an adapter and merged/ weights (one
    2 x 4 tensor each), and the JSON files serve reads before the weights."""
    from safetensors.torch import save_file
    (folder / "merged").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}\n', encoding="utf-8")
    (folder / "meta.json").write_text("{}\n", encoding="utf-8")
    (folder / "merged" / "config.json").write_text("{}\n", encoding="utf-8")
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_file({"model.q_proj.weight": torch.zeros(2, 4)},
              str(folder / "merged" / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(folder, {"built_by": "tests/test_package_files.py"})
    return folder


def _moved_out(pkg: Path, rel: str, outside: Path) -> Path:
    """Move `rel` out of the package and leave a symlink to it: the bytes are identical."""
    target = outside / rel
    shutil.move(pkg / rel, target)
    (pkg / rel).symlink_to(target)
    return target


def _unix_socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))  # leaves the socket file behind once closed
    server.close()


# name -> (how the package copy is changed, the one problem verify reports)
CASES = {
    "fifo": (lambda pkg, out: os.mkfifo(pkg / "pipe"),
             lambda out: "not a regular file: pipe is a FIFO (named pipe)"),
    "link to /dev/zero": (lambda pkg, out: (pkg / "zero").symlink_to("/dev/zero"),
                          lambda out: "not a regular file: zero is a symbolic link to /dev/zero "
                                      "(a character device)"),
    "dangling link": (lambda pkg, out: (pkg / "gone").symlink_to(out / "nowhere"),
                      lambda out: f"not a regular file: gone is a symbolic link to {out}/nowhere "
                                  "(which does not exist)"),
    "link to a folder": (lambda pkg, out: _moved_out(pkg, "merged", out),
                         lambda out: f"not a regular file: merged is a symbolic link to "
                                     f"{out}/merged (a folder)"),
    "manifest swapped for a link to a copy": (
        lambda pkg, out: _moved_out(pkg, MANIFEST, out),
        lambda out: f"not a regular file: {MANIFEST} is a symbolic link to {out}/{MANIFEST} "
                    "(a regular file)"),
    "adapter swapped for a link to a copy": (
        lambda pkg, out: _moved_out(pkg, "adapter_model.safetensors", out),
        lambda out: "not a regular file: adapter_model.safetensors is a symbolic link to "
                    f"{out}/adapter_model.safetensors (a regular file)"),
    "socket": (lambda pkg, out: _unix_socket(pkg / "merged" / "s"),
               lambda out: "not a regular file: merged/s is a socket"),
}
# Each command that reads a package, and the line that says it refused.
COMMANDS = {
    "verify": (lambda pkg: ["verify", str(pkg)], "FAILED verification (1 problem(s))"),
    "generate": (lambda pkg: ["generate", "--package", str(pkg), "--prompt", "x"],
                 "fails `medqlora verify`; refusing to load it"),
    "serve": (lambda pkg: ["serve", str(pkg)], "fails `medqlora verify`; refusing to load it"),
    "export": (lambda pkg: ["export", str(pkg), "--out", str(pkg.parent / "export"),
                            "--targets", "vllm"], "fails `medqlora verify`; refusing to load it"),
}


def test_an_intact_fake_package_verifies(tmp_path, capsys):
    pkg = fake_package(tmp_path / "package")
    assert verify(pkg) == []
    assert cli.main(["verify", str(pkg)]) == 0
    assert capsys.readouterr().out == f"{pkg}: verified\n"


@pytest.mark.parametrize("case", CASES)
def test_verify_and_every_package_command_refuse_what_is_not_a_regular_file(case, tmp_path,
                                                                           capsys):
    pkg, outside = fake_package(tmp_path / "package"), tmp_path / "outside"
    outside.mkdir()
    change, expected = CASES[case]
    change(pkg, outside)
    assert verify(pkg) == [expected(outside)]
    for name, (argv, refusal) in COMMANDS.items():
        assert cli.main(argv(pkg)) == 1, name
        err = capsys.readouterr().err
        assert err.splitlines() == [expected(outside), f"{pkg}: {refusal}"], name
    assert not (tmp_path / "export").exists()


def test_a_package_is_never_written_around_a_link(tmp_path):
    folder = tmp_path / "package"
    folder.mkdir()
    (folder / "zero").symlink_to("/dev/zero")
    with pytest.raises(ValueError) as err:
        write_manifest(folder, {})
    assert str(err.value) == (f"{folder}: a package holds regular files only; not a regular "
                              "file: zero is a symbolic link to /dev/zero (a character device)")
    assert not (folder / MANIFEST).exists()


# ---------------------------------------------------------------- truncated weights

def _truncated(pkg: Path, rel: str) -> str:
    """Cut the last 16 bytes off `rel` and rewrite the manifest to match, so verify passes."""
    data = (pkg / rel).read_bytes()
    (pkg / rel).write_bytes(data[:-16])
    write_manifest(pkg, {"built_by": "tests/test_package_files.py"})
    assert verify(pkg) == []
    return (f"{pkg / rel}: not a valid safetensors file, truncated or corrupt (incomplete "
            "metadata, file not fully covered); copy it again or rebuild it")


@pytest.mark.parametrize("rel, argv", [
    ("adapter_model.safetensors", ["generate", "--package", "{pkg}", "--prompt", "x"]),
    ("adapter_model.safetensors", ["serve", "{pkg}"]),
    ("adapter_model.safetensors", ["export", "{pkg}", "--out", "{out}", "--targets", "vllm"]),
    ("merged/model.safetensors", ["generate", "--package", "{pkg}", "--prompt", "x", "--merged"]),
    ("merged/model.safetensors", ["serve", "{pkg}", "--merged"]),
    ("merged/model.safetensors", ["export", "{pkg}", "--out", "{out}", "--targets", "vllm"]),
], ids=["generate", "serve", "export", "generate-merged", "serve-merged", "export-merged"])
def test_a_truncated_weights_file_is_one_line_before_any_load(rel, argv, tmp_path, capsys):
    pkg = fake_package(tmp_path / "package")
    expected = _truncated(pkg, rel)
    out = tmp_path / "export"
    assert cli.main([a.format(pkg=pkg, out=out) for a in argv]) == 1
    assert capsys.readouterr().err.splitlines() == [expected]
    assert not out.exists()


def test_generate_command_names_a_truncated_adapter_without_a_traceback(tmp_path):
    pkg = fake_package(tmp_path / "package")
    expected = _truncated(pkg, "adapter_model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "medqlora.cli", "generate", "--package",
                           str(pkg), "--prompt", "What is anaemia?"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", expected + "\n")


@pytest.mark.parametrize("data, reason", [
    (b"", "header too small"),
    (b"\xff" * 64, "header too large"),  # the first 8 bytes are the header's length
    (b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "invalid JSON in header"),
], ids=["empty", "huge header length", "header not JSON"])
def test_weights_that_are_not_safetensors_are_named(data, reason, tmp_path):
    from medqlora.core.modeling import WeightsFileError, check_safetensors
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    with pytest.raises(WeightsFileError) as err:
        check_safetensors(path)
    assert str(err.value).startswith(f"{path}: not a valid safetensors file, truncated or "
                                     f"corrupt ({reason}")
