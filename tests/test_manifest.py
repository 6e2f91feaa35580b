"""`medqlora verify`, and the commands that load a package (generate, serve, export), on package
folders that hold something other than folders and regular files.

The packages here are fakes (no model): a few small files and a manifest written by the
library's own writer, which is all verify reads. Every command runs in-process through
`medqlora.cli.main`, as `python -m medqlora.cli ...` runs it.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from medqlora import cli
from medqlora.ship.manifest import MANIFEST, verify, write_manifest


def fake_package(folder: Path) -> Path:
    """A package folder with a manifest that matches it (a subfolder included)."""
    (folder / "merged").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}\n', encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"not read by verify")
    (folder / "merged" / "config.json").write_text("{}\n", encoding="utf-8")
    write_manifest(folder, {"built_by": "tests/test_manifest.py"})
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
