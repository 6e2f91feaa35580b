"""DVC remotes end to end: push the tagged baseline, pull it into fresh clones, fetch the package.

Starts from conftest's `pipeline_workspace` (one `dvc repro`, tagged v1.0.0) and never runs the
pipeline again. A publisher clone checked out at the tag shares the workspace's cache and pushes
what dvc.lock names at v1.0.0 to

1. a local-directory remote, and
2. an SSH remote served by a real OpenSSH sshd on 127.0.0.1 (public-key auth only: an
   unauthorized key is refused; and the client checks the server: a host key that
   ~/.ssh/known_hosts does not list, or lists differently, stops `dvc pull` before any
   transfer, see medqlora/core/ssh_known_hosts.py);

fresh `git clone` + `git checkout v1.0.0` + `dvc pull` from each must restore every pipeline
output with the package bit for bit (manifest bytes equal to the baseline's). Then
3. `dvc get` and `dvc artifacts get` fetch the package at the tag into clean folders, which
   verify and generate, as docs/deploy.md tells a deployment to do.

    pytest tests/test_remotes.py        # needs /usr/sbin/sshd (Debian: openssh-server)
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BASELINE_TAG, run

pytestmark = pytest.mark.slow
ARTIFACT = "medqlora-tiny-med"
PROMPT = "Analysez les résultats suivants: Hémoglobine: 9.1 g/dL (N: 12.0-16.0)"
SSHD = Path("/usr/sbin/sshd")


def clone_at_tag(ws: Path, dest: Path) -> Path:
    """A fresh clone of the workspace, detached at the baseline tag: git files only, no DVC cache."""
    run(["git", "clone", "-q", str(ws), str(dest)], dest.parent)
    run(["git", "checkout", "-q", BASELINE_TAG], dest)
    return dest


def cached_objects(root: Path) -> list[Path]:
    """Object files under a DVC cache or remote (DVC 3 layout: files/md5/ab/cdef...)."""
    return [p for p in (root / "files" / "md5").rglob("*") if p.is_file()] if root.exists() else []


def pushed_count(output: str) -> int:
    """N from DVC's `N files pushed` (0 on `Everything is up to date`)."""
    match = re.search(r"(\d+) files? pushed", output)
    return int(match.group(1)) if match else 0


def assert_reproduced(clone: Path, baseline: bytes) -> None:
    """The clone holds every output dvc.lock names at the tag, hash for hash, and the package
    bit for bit: its manifest (sha256 + size of every file) equals the published one."""
    assert (clone / "artifacts/package/manifest.json").read_bytes() == baseline
    run(["medqlora", "verify", "artifacts/package"], clone)
    status = run(["dvc", "status"], clone, timeout=300)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


@pytest.fixture(scope="module")
def workspace(pipeline_workspace) -> Path:
    return pipeline_workspace


@pytest.fixture(scope="module")
def baseline(workspace) -> bytes:
    return (workspace.parent / "baseline_manifest.json").read_bytes()


@pytest.fixture(scope="module")
def publisher(workspace, tmp_path_factory) -> Path:
    """A clone at v1.0.0 whose cache is the workspace's: it pushes exactly the tag's outputs.

    The workspace itself may have moved on (test_pipeline runs experiments in it), and its git
    state stays untouched: remotes are configured here, in .dvc/config.local.
    """
    pub = clone_at_tag(workspace, tmp_path_factory.mktemp("publisher") / "repo")
    run(["dvc", "cache", "dir", "--local", str(workspace / ".dvc" / "cache")], pub)
    return pub


@pytest.fixture(scope="module")
def local_remote(publisher, tmp_path_factory) -> Path:
    """A local-directory remote (the default of the publisher) holding the tag's outputs."""
    url = tmp_path_factory.mktemp("remotes") / "local"
    run(["dvc", "remote", "add", "--local", "-d", "local", str(url)], publisher)
    out = run(["dvc", "push", "-r", "local"], publisher, timeout=300)
    # Every object pushed is on the remote, and nothing else is.
    assert pushed_count(out.stdout) == len(cached_objects(url)) > 0, out.stdout
    return url


@pytest.fixture(scope="module")
def local_clone(workspace, local_remote, baseline, tmp_path_factory) -> Path:
    """git clone + checkout v1.0.0 + dvc pull from the local-directory remote."""
    clone = clone_at_tag(workspace, tmp_path_factory.mktemp("local-clone") / "repo")
    assert not cached_objects(clone / ".dvc" / "cache")     # a clone brings no data of its own
    run(["dvc", "remote", "add", "--local", "-d", "local", str(local_remote)], clone)
    run(["dvc", "pull"], clone, timeout=300)
    return clone


def test_local_remote_pull_reproduces_package(local_clone, local_remote, baseline):
    assert_reproduced(local_clone, baseline)
    # Everything the clone's cache holds came from the remote (same object names).
    names = {p.relative_to(local_clone / ".dvc/cache") for p in cached_objects(local_clone / ".dvc/cache")}
    assert names and names <= {p.relative_to(local_remote) for p in cached_objects(local_remote)}


# ------------------------------------------------------------------------------ SSH


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel picks it; sshd binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_sshd_config(folder: Path, port: int) -> Path:
    """sshd_config for a private daemon: loopback only, public-key auth only, files in `folder`.

    StrictModes no: pytest's temp folders are not the 0700 ~/.ssh sshd insists on otherwise.
    UsePAM no: no system login stack is needed (or present in CI images) for key auth.
    internal-sftp: DVC talks SFTP, and the in-process server needs no sftp-server binary.
    """
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1",
        f"HostKey {folder / 'host_ed25519'}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "Subsystem sftp internal-sftp", "LogLevel VERBOSE", "",
    ]), encoding="utf-8")
    return config


def wait_listening(proc: subprocess.Popen, port: int, log: Path, seconds: float = 15.0) -> None:
    """Block until sshd accepts connections; fail with its log if it exits or never listens."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"sshd not listening on 127.0.0.1:{port} after {seconds} s:\n"
                f"{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH sshd on 127.0.0.1:<free port>, stopped at the end of the module.

    Yields (URL prefix `ssh://<user>@127.0.0.1:<port>`, folder of the keys): `client_ed25519`
    is authorized, `stranger_ed25519` is not; `host_ed25519` is the server's host key, and
    `home/` a HOME whose ~/.ssh/known_hosts lists it (what `ssh-keyscan` would add).
    """
    if not SSHD.is_file():
        message = f"{SSHD} missing: apt-get install openssh-server openssh-client"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_ed25519", "client_ed25519", "stranger_ed25519"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(folder / name)],
            folder)
    shutil.copy(folder / "client_ed25519.pub", folder / "authorized_keys")
    # sshd refuses to start without its privilege-separation folder (made by the Debian service
    # script, which never ran here).
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    except PermissionError:
        pytest.fail("/run/sshd is missing and only root can make it: `sudo mkdir -p /run/sshd`")
    port = free_port()
    trusted_home(folder / "home", port, folder / "host_ed25519.pub")
    log = folder / "sshd.log"
    with open(log, "wb") as log_file:
        # -D: stay in the foreground (our child, stopped below); -e: log to stderr (the log file).
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(write_sshd_config(folder, port))],
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, port, log)
        yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}", folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def trusted_home(home: Path, port: int, host_key: Path | None) -> Path:
    """A HOME whose ~/.ssh/known_hosts lists `host_key` for 127.0.0.1:`port` (empty: None)."""
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    line = f"[127.0.0.1]:{port} {' '.join(host_key.read_text().split()[:2])}\n" if host_key else ""
    (home / ".ssh" / "known_hosts").write_text(line, encoding="utf-8")
    return home


def ssh_env(keys: Path) -> dict[str, str]:
    """The environment of a dvc that trusts the test server's host key."""
    return {"HOME": str(keys / "home")}


def set_ssh_remote(repo: Path, url: str, key: Path, default: bool = False) -> None:
    """Add (or re-key) the `ssh` remote in the repo's .dvc/config.local, where credentials go."""
    if "ssh" not in run(["dvc", "remote", "list"], repo).stdout.split():
        run(["dvc", "remote", "add", "--local", *(["-d"] if default else []), "ssh", url], repo)
    run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(key)], repo)


@pytest.fixture(scope="module")
def ssh_remote(publisher, sshd, tmp_path_factory) -> str:
    """The tag's outputs pushed over SFTP to <tmp>/sshremote on the private sshd."""
    prefix, keys = sshd
    folder = tmp_path_factory.mktemp("remotes") / "sshremote"
    set_ssh_remote(publisher, f"{prefix}{folder}", keys / "client_ed25519")
    out = run(["dvc", "push", "-r", "ssh"], publisher, timeout=300, env=ssh_env(keys))
    assert pushed_count(out.stdout) == len(cached_objects(folder)) > 0, out.stdout
    return f"{prefix}{folder}"


def test_ssh_remote_pull_reproduces_package(workspace, sshd, ssh_remote, baseline,
                                            tmp_path_factory):
    _, keys = sshd
    clone = clone_at_tag(workspace, tmp_path_factory.mktemp("ssh-clone") / "repo")
    # The server authenticates: a key it does not list in authorized_keys gets nothing.
    set_ssh_remote(clone, ssh_remote, keys / "stranger_ed25519", default=True)
    refused = run(["dvc", "pull"], clone, check=False, timeout=120, env=ssh_env(keys))
    assert refused.returncode != 0
    assert "Permission denied" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    assert not (clone / "artifacts/package").exists()

    set_ssh_remote(clone, ssh_remote, keys / "client_ed25519")
    run(["dvc", "pull"], clone, timeout=300, env=ssh_env(keys))
    assert_reproduced(clone, baseline)


def test_ssh_remote_refuses_an_unknown_or_changed_host_key(workspace, sshd, ssh_remote,
                                                            tmp_path_factory):
    # The client authenticates the server too, before sending a key or taking any data: with
    # the server's key missing from known_hosts, or listed as another key (a server that
    # changed, or one impersonating it), `dvc pull` stops.
    _, keys = sshd
    port = int(ssh_remote.split(":")[2].split("/")[0])
    clone = clone_at_tag(workspace, tmp_path_factory.mktemp("untrusted-clone") / "repo")
    set_ssh_remote(clone, ssh_remote, keys / "client_ed25519", default=True)
    homes = tmp_path_factory.mktemp("homes")
    for name, key in (("unknown", None), ("changed", keys / "stranger_ed25519.pub")):
        home = trusted_home(homes / name, port, key)
        refused = run(["dvc", "pull"], clone, check=False, timeout=120, env={"HOME": str(home)})
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, (name, output[-2000:])
        assert "Host key is not trusted" in output, (name, output[-2000:])
        assert not (clone / "artifacts/package").exists() and not cached_objects(
            clone / ".dvc" / "cache"), name


# ------------------------------------------------------------------------------ dvc get


def generate(package: Path, cwd: Path) -> str:
    out = run(["medqlora", "generate", "--package", str(package), "--prompt", PROMPT], cwd,
              timeout=300)
    return out.stdout.strip()


def test_get_package_at_tag_verifies_and_generates(publisher, local_clone, baseline,
                                                   tmp_path_factory):
    # The publisher's default remote is the local-directory one: `dvc get` downloads from it,
    # not from any cache, exactly as a server pulls from the team's storage.
    url = run(["dvc", "get", "--show-url", str(publisher), "artifacts/package/manifest.json",
               "--rev", BASELINE_TAG], publisher).stdout.strip()
    local_url = run(["dvc", "remote", "list"], publisher).stdout
    assert url.startswith(re.search(r"^local\s+(\S+)", local_url, re.M).group(1)), url

    # A deployment folder laid out as docs/deploy.md says: the package plus the base at the
    # relative path adapter_config.json names (models/tiny-med-llama, git-tracked).
    deploy = tmp_path_factory.mktemp("deploy")
    run(["dvc", "get", str(publisher), "artifacts/package", "--rev", BASELINE_TAG,
         "-o", "artifacts/package"], deploy)
    run(["dvc", "get", str(publisher), "models/tiny-med-llama", "--rev", BASELINE_TAG,
         "-o", "models/tiny-med-llama"], deploy)
    # By artifact name and version: --rev v1.0.0 resolves the tag medqlora-tiny-med@v1.0.0.
    run(["dvc", "artifacts", "get", str(publisher), ARTIFACT, "--rev", BASELINE_TAG,
         "-o", "by-artifact"], deploy)
    for package in (deploy / "artifacts/package", deploy / "by-artifact"):
        assert (package / "manifest.json").read_bytes() == baseline, package
        run(["medqlora", "verify", str(package)], deploy)

    answer = generate(Path("artifacts/package"), deploy)
    assert answer
    # Greedy decoding with the packaged settings: the pulled folder answers exactly as the
    # package does inside a full clone of the project at the tag.
    assert answer == generate(Path("artifacts/package"), local_clone)
