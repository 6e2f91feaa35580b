# Sourced by .ci/run (bash): a private Docker engine and the project image for the container tests.
#
#   source scripts/ci_docker.sh     # installs docker.io + mmdebstrap if needed, starts dockerd,
#                                   # makes the Debian base, builds containers/Dockerfile offline
#   trap medqlora_stop_dockerd EXIT # the caller stops the engine it started
#
# The engine is our own: its data-root, exec-root and socket live in a temp folder, it runs in its
# own session (setsid) and is stopped at the end, so nothing of the host's Docker is used or left.
# DOCKER_HOST points the tests and the docker SDK at it. No registry is reachable here, so the base
# image is made locally (mmdebstrap | docker import) and pip installs from a wheelhouse.
# Base tarball and wheelhouse are cached under .cache/containers (git-ignored) between local runs;
# CI starts from scratch. Timings are printed so the CI log shows where the minutes go.

medqlora_install_docker() {
    if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null; then
        return 0
    fi
    echo "ci_docker: installing docker.io and mmdebstrap (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io mmdebstrap >/dev/null
}

medqlora_start_dockerd() {
    MEDQLORA_DOCKER_DIR="$(mktemp -d /tmp/medqlora-docker.XXXXXX)"
    export MEDQLORA_DOCKER_DIR
    local t0=$SECONDS
    # --bridge none / --iptables false: containers here run with network none and the build needs
    # no network (wheelhouse), so the engine never touches the host's firewall or interfaces.
    setsid dockerd \
        --data-root "$MEDQLORA_DOCKER_DIR/data" \
        --exec-root "$MEDQLORA_DOCKER_DIR/exec" \
        --pidfile "$MEDQLORA_DOCKER_DIR/dockerd.pid" \
        --host "unix://$MEDQLORA_DOCKER_DIR/docker.sock" \
        --storage-driver overlay2 \
        --exec-opt native.cgroupdriver=cgroupfs \
        --bridge none --iptables=false --ip-masq=false \
        >"$MEDQLORA_DOCKER_DIR/dockerd.log" 2>&1 < /dev/null &
    MEDQLORA_DOCKERD_PID=$!
    export MEDQLORA_DOCKERD_PID
    export DOCKER_HOST="unix://$MEDQLORA_DOCKER_DIR/docker.sock"
    export DOCKER_BUILDKIT=0  # the classic builder: 20.10's engine, no buildx plugin needed
    export MEDQLORA_REQUIRE_DOCKER=1  # tests/test_container.py fails instead of skipping
    for _ in $(seq 1 120); do
        if docker version >/dev/null 2>&1; then
            echo "ci_docker: dockerd up in $((SECONDS - t0)) s ($DOCKER_HOST)"
            return 0
        fi
        if ! kill -0 "$MEDQLORA_DOCKERD_PID" 2>/dev/null; then break; fi
        sleep 0.5
    done
    echo "ci_docker: dockerd did not start; its log:" >&2
    tail -n 30 "$MEDQLORA_DOCKER_DIR/dockerd.log" >&2
    return 1
}

medqlora_stop_dockerd() {
    # Stop only the engine this script started (its pid), then remove its temp folder.
    if [ -n "${MEDQLORA_DOCKERD_PID:-}" ] && kill -0 "$MEDQLORA_DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$MEDQLORA_DOCKERD_PID"
        for _ in $(seq 1 40); do
            kill -0 "$MEDQLORA_DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$MEDQLORA_DOCKERD_PID" 2>/dev/null || true
    fi
    if [ -n "${MEDQLORA_DOCKER_DIR:-}" ] && [ -d "$MEDQLORA_DOCKER_DIR" ]; then
        # overlay mounts under data-root are gone once dockerd exits; unmount leftovers anyway.
        grep -o " $MEDQLORA_DOCKER_DIR[^ ]*" /proc/mounts 2>/dev/null | sort -r \
            | xargs -r -n1 umount -l 2>/dev/null || true
        rm -rf "$MEDQLORA_DOCKER_DIR"
    fi
    unset MEDQLORA_DOCKERD_PID
}

medqlora_ci_docker() {
    local t0=$SECONDS
    medqlora_install_docker
    medqlora_start_dockerd
    local t1=$SECONDS
    containers/build.sh debian-base
    local t2=$SECONDS
    containers/build.sh wheelhouse
    local t3=$SECONDS
    containers/build.sh image --base medqlora-base:bookworm --wheelhouse .cache/containers/wheelhouse
    echo "ci_docker: install+dockerd $((t1 - t0)) s, base $((t2 - t1)) s," \
         "wheelhouse $((t3 - t2)) s, image $((SECONDS - t3)) s"
}

[ -n "${MEDQLORA_CI_DOCKER_DEFINE_ONLY:-}" ] || medqlora_ci_docker
