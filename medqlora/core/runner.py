"""The docker runner: a stage re-executes itself inside the project image.

With `runner.backend: docker`, `stage.start` calls `run_in_container(params.runner, name, argv)`
on the host, which runs `python <stage script> <same args>` in the image through the Docker SDK
and returns the container's exit code; DVC stays on the host and sees the same outputs.

    python -m medqlora.core.runner tag      # the image this checkout expects: medqlora:<12 hex>

What the container gets, and why:
- the workspace (cwd, the DVC repo root) bind-mounted at the same path and used as working dir,
  so every relative and absolute path in dvc.yaml means the same thing inside;
- PYTHONPATH=<workspace>: the stage runs the workspace's medqlora code on the image's pinned
  libraries (the image tag hashes the environment, not the code; DVC tracks the code);
- user = the caller's uid:gid, so outputs belong to the caller; HOME=/tmp (writable by any uid);
- GPUs through device_requests (runner.gpus: all | count | device ids | none);
- the host HF cache at /cache/huggingface (HF_HOME), runner.env names passed by value (only the
  names are logged), runner.mounts at the same path, network runner.network (none by default);
- MEDQLORA_IN_CONTAINER=1 (the stage then runs instead of re-executing) and MEDQLORA_IMAGE=<tag>
  (medqlora.core.provenance records it in every meta.json).
Logs stream live, Ctrl-C / SIGTERM stop the container, and the container is always removed.
A missing image is an error naming the build command: this never pulls.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # keep this module importable with the stdlib only (build.sh runs `tag`)
    from medqlora.core.config import RunnerParams

ROOT = Path(__file__).resolve().parents[2]
TAG_FILES = ("containers/Dockerfile", "requirements.lock", "pyproject.toml")
IMAGE_REPO = "medqlora"
CONTAINER_HF_HOME = "/cache/huggingface"
CONTAINER_HOME = "/tmp"
# Passed through when set on the host: they change behaviour, never carry secrets.
BEHAVIOUR_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK",
                 "DVC_NO_ANALYTICS", "MEDQLORA_LOG_LEVEL", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM",
                 "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
BUILD_HINT = ("containers/build.sh image            # GPU image, online\n"
              "  containers/build.sh image --base medqlora-base:bookworm "
              "--wheelhouse .cache/containers/wheelhouse   # offline (see containers/README.md)")
STOP_GRACE_S = 10  # SIGINT first (the stage cleans its temp outputs), SIGKILL after this
TAIL_LINES = 20
EXIT_ENGINE = 125  # docker's own code for "the engine could not run the container"
log = logging.getLogger("medqlora.core.runner")


class RunnerError(RuntimeError):
    """The container could not be run; the message says what to change."""


def image_tag(root: str | Path = ROOT) -> str:
    """medqlora:<first 12 hex of sha256(Dockerfile + requirements.lock + pyproject.toml)>.

    The three files define the software in the image; the hash changes when any of them does,
    so an old image is never mistaken for the current one.
    """
    digest = hashlib.sha256()
    for name in TAG_FILES:
        digest.update((Path(root) / name).read_bytes())
    return f"{IMAGE_REPO}:{digest.hexdigest()[:12]}"


def device_requests(gpus: str | int | Iterable[str]) -> list[Any]:
    """docker device requests for runner.gpus: "all", "none", a count, or device ids."""
    from docker.types import DeviceRequest
    if gpus == "none":
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if isinstance(gpus, int):
        return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]


def parse_mount(spec: str, cwd: Path) -> tuple[str, dict[str, str]]:
    """`SRC[:DST][:ro|rw]` -> (host path, docker volume binding); DST defaults to SRC."""
    parts = spec.split(":")
    mode = "rw"
    if parts[-1] in ("ro", "rw") and len(parts) > 1:
        mode = parts.pop()
    if len(parts) > 2:
        raise RunnerError(f"runner.mounts: {spec!r} is not SRC[:DST][:ro|rw]")
    src = (cwd / os.path.expanduser(parts[0])).resolve()
    dst = parts[1] if len(parts) == 2 else str(src)
    if not src.exists():
        raise RunnerError(f"runner.mounts: {spec!r}: {src} does not exist on the host")
    if not dst.startswith("/"):
        raise RunnerError(f"runner.mounts: {spec!r}: the container path must be absolute")
    return str(src), {"bind": dst, "mode": mode}


def host_hf_cache(environ: dict[str, str]) -> Path:
    """The host's Hugging Face cache (HF_HOME, else ~/.cache/huggingface)."""
    return Path(environ.get("HF_HOME") or Path(environ.get("HOME", "~")).expanduser()
                / ".cache" / "huggingface")


def container_env(runner: RunnerParams, image: str, cwd: Path,
                  environ: dict[str, str]) -> dict[str, str]:
    """The container's environment; secrets from runner.env by value, logged by name only."""
    env = {name: environ[name] for name in BEHAVIOUR_ENV if name in environ}
    if runner.network == "none":
        env.setdefault("HF_HUB_OFFLINE", "1")  # no network: fail fast instead of retrying a hub
    passed, missing = [], []
    for name in runner.env:
        if name in environ:
            env[name] = environ[name]
            passed.append(name)
        else:
            missing.append(name)
    if passed:
        log.info("runner.env: passing %s (values not logged)", ", ".join(passed))
    if missing:
        log.warning("runner.env: %s not set on the host; not passed", ", ".join(missing))
    env.update({"MEDQLORA_IN_CONTAINER": "1", "MEDQLORA_IMAGE": image,
                "HOME": CONTAINER_HOME, "HF_HOME": CONTAINER_HF_HOME,
                "PYTHONPATH": str(cwd), "PYTHONUNBUFFERED": "1"})
    return env


def container_command(argv: list[str], cwd: Path) -> list[str]:
    """`python <stage script> <args>` with the script given as a path inside the workspace."""
    script = Path(argv[0])
    resolved = (cwd / script).resolve()
    if not resolved.is_relative_to(cwd):
        raise RunnerError(f"{argv[0]} is outside the workspace {cwd}: with runner.backend docker "
                          "run stages from the project root (e.g. `dvc repro`)")
    return ["python", str(script if not script.is_absolute() else resolved), *argv[1:]]


def container_spec(runner: RunnerParams, stage_name: str, argv: list[str], *,
                   image: str, cwd: Path, environ: dict[str, str],
                   uid: int, gid: int) -> dict[str, Any]:
    """Keyword arguments for docker's `containers.create`, built from runner params."""
    cwd = cwd.resolve()
    volumes = {str(cwd): {"bind": str(cwd), "mode": "rw"}}
    cache = host_hf_cache(environ)
    cache.mkdir(parents=True, exist_ok=True)
    volumes[str(cache.resolve())] = {"bind": CONTAINER_HF_HOME, "mode": "rw"}
    for spec in runner.mounts:
        src, bind = parse_mount(spec, cwd)
        volumes[src] = bind
    return {
        "image": image,
        "command": container_command(argv, cwd),
        "name": f"medqlora-{stage_name}-{os.getpid()}-{int(time.time())}",
        "working_dir": str(cwd),
        "user": f"{uid}:{gid}",
        "environment": container_env(runner, image, cwd, environ),
        "volumes": volumes,
        "device_requests": device_requests(runner.gpus),
        "shm_size": runner.shm_size,
        "network_mode": runner.network,
        "init": True,  # docker-init as PID 1 forwards SIGINT/SIGTERM to the stage
        "labels": {"medqlora.core.stage": stage_name, "medqlora.workspace": str(cwd)},
        "detach": True,
    }


def docker_client():
    """A client for DOCKER_HOST (or the default socket), with a clear error when none answers."""
    import docker
    import requests
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        where = os.environ.get("DOCKER_HOST", "the default socket /var/run/docker.sock")
        raise RunnerError(f"runner.backend docker: no Docker engine answers at {where} ({err}); "
                          "start one, set DOCKER_HOST, or set runner.backend: local") from None
    return client


def require_image(client, image: str) -> None:
    """Fail with the build command when the image is absent; never pull (no registry here)."""
    import docker
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise RunnerError(f"image {image} is not in the Docker engine; build it with\n  "
                          f"{BUILD_HINT}\n(or set runner.image to an image you have)") from None


def _stream(container, tail: collections.deque) -> None:
    """Copy the container's stdout/stderr to ours as it comes; keep the last lines."""
    for out, err in container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True):
        for chunk, sink in ((out, sys.stdout), (err, sys.stderr)):
            if chunk:
                text = chunk.decode("utf-8", errors="replace")
                sink.write(text)
                sink.flush()
                tail.extend(text.splitlines())


class _Stop(Exception):
    """Raised in the main thread by our SIGINT/SIGTERM handler."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, _frame):
    raise _Stop(signum)


def _stop(container, signum: int) -> None:
    """Forward the signal (the stage removes its temp outputs), then kill after a grace period."""
    log.warning("runner: %s received, stopping container %s", signal.Signals(signum).name,
                container.name)
    try:
        container.kill(signal="SIGINT" if signum == signal.SIGINT else "SIGTERM")
        container.wait(timeout=STOP_GRACE_S)
    except Exception as err:  # noqa: BLE001 - already stopping; the kill below is the fallback
        log.warning("runner: %s did not stop in %d s (%s); killing it", container.name,
                    STOP_GRACE_S, type(err).__name__)
        try:
            container.kill()
        except Exception:  # noqa: BLE001 - it may have exited between the two calls
            pass


def _run(client, spec: dict[str, Any], stage_name: str) -> int:
    """Create, start, stream and wait; the container is removed whatever happens."""
    import docker
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    try:
        container = client.containers.create(**spec)
    except docker.errors.APIError as err:
        hint = (" (runner.gpus asks for GPUs but the engine has no GPU runtime: install the NVIDIA "
                "Container Toolkit, or set runner.gpus: none)"
                if "capabilities" in str(err) else "")
        raise RunnerError(f"{stage_name}: could not create the container: {err}{hint}") from None
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        container.start()
        _stream(container, tail)
        code = int(container.wait()["StatusCode"])
    except _Stop as stop:
        _stop(container, stop.signum)
        code = 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        container.remove(force=True)
    if code != 0:
        shown = "\n".join(f"  | {line}" for line in tail)
        print(f"{stage_name}: failed in container (image {spec['image']}) with exit code {code}; "
              f"last {len(tail)} log lines:\n{shown}", file=sys.stderr)
    return code


def run_in_container(runner: RunnerParams, stage_name: str, argv: list[str]) -> int:
    """Run `python <argv[0]> <argv[1:]>` in the project image; return its exit code."""
    # The workspace's own Dockerfile + lock define the image it needs (a checkout of another
    # commit may need another tag); outside a project checkout, this package's.
    cwd = Path.cwd()
    image = runner.image or image_tag(cwd if (cwd / TAG_FILES[0]).is_file() else ROOT)
    try:
        client = docker_client()
        require_image(client, image)
        spec = container_spec(runner, stage_name, list(argv), image=image, cwd=cwd,
                              environ=dict(os.environ), uid=os.getuid(), gid=os.getgid())
        log.info("%s: running in %s as %s (gpus %s, network %s)", stage_name, image, spec["user"],
                 runner.gpus, runner.network)
        return _run(client, spec, stage_name)
    except RunnerError as err:
        print(f"{stage_name}: {err}", file=sys.stderr)
        return EXIT_ENGINE


def main(argv: list[str] | None = None) -> int:
    """`python -m medqlora.core.runner tag`: print the image tag this checkout expects."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["tag"]:
        print("usage: python -m medqlora.core.runner tag", file=sys.stderr)
        return 2
    print(image_tag())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
