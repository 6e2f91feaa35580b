"""DVC's SSH remotes check the server's host key against known_hosts, as `ssh` does.

dvc-ssh (4.3) hands asyncssh no `known_hosts`, and sshfs then passes `known_hosts=None`, which
asyncssh documents as "host key validation is disabled": `dvc push` to a host impersonating
the storage server would hand it the data, and `dvc pull` would take whatever it serves. This
module gives asyncssh its default back (`known_hosts=()`: OpenSSH's files, ~/.ssh/known_hosts,
or UserKnownHostsFile / GlobalKnownHostsFile of ~/.ssh/config), so an unknown or changed host
key stops the transfer before any credential or data moves:

    ERROR: ... Host key is not trusted for host models.example.org

Add the server's key once, after comparing its fingerprint with the one the server's admin
gives you (docs/deploy.md):

    ssh-keyscan -p 22 models.example.org >> ~/.ssh/known_hosts

`make setup` installs a one-line .pth file into the venv (`python -m medqlora.core.ssh_known_hosts
install`), so every `dvc` started from the venv loads this module. The patch is applied only
when dvc_ssh is imported (a meta path hook), so other programs pay nothing for it.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path

MODULE = "dvc_ssh"
PTH = "medqlora-ssh-known-hosts.pth"
# One line, run by `site` at every start of the venv's python; a no-op where medqlora (or this
# module) is not importable.
PTH_LINE = ('import importlib.util as u; u.find_spec("medqlora") and '
            'u.find_spec("medqlora.core.ssh_known_hosts") and '
            '__import__("medqlora.core.ssh_known_hosts", fromlist=["enable"]).enable()\n')


def patch(module) -> None:
    """Make dvc_ssh's SSHFileSystem hand asyncssh `known_hosts=()` (idempotent)."""
    cls = module.SSHFileSystem
    original = cls._prepare_credentials
    if getattr(original, "checks_known_hosts", False):
        return

    def prepare_credentials(self, **config):
        login = original(self, **config)
        login.setdefault("known_hosts", ())  # asyncssh's default: OpenSSH's known_hosts files
        return login

    prepare_credentials.checks_known_hosts = True
    cls._prepare_credentials = prepare_credentials


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds dvc_ssh like the path finder does, and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def enable() -> None:
    """Patch dvc_ssh now if it is loaded, else when it is imported."""
    if MODULE in sys.modules:
        patch(sys.modules[MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def install(site_packages: str | Path | None = None) -> Path:
    """Write the .pth file into this interpreter's site-packages; returns its path."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH
    path.write_text(PTH_LINE, encoding="utf-8")
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m medqlora.core.ssh_known_hosts install")
    print(f"installed {install()}: dvc's SSH remotes check ~/.ssh/known_hosts")
