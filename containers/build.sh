#!/usr/bin/env bash
# Build the medqlora image (containers/Dockerfile), online or offline from a wheelhouse.
#
#   containers/build.sh image [--base IMAGE] [--wheelhouse DIR] [--extra-index-url URL] [--tag T]
#       GPU image on a connected machine (CUDA base, torch's CUDA wheel):
#         containers/build.sh image --extra-index-url https://download.pytorch.org/whl/cu130
#       offline (no network inside the build; every wheel from DIR):
#         containers/build.sh image --base medqlora-base:bookworm --wheelhouse .cache/containers/wheelhouse
#   containers/build.sh wheelhouse [DIR]    pip-download/build every wheel requirements.lock pins,
#                                           plus pyproject's build requirements (on a connected
#                                           machine with the same Python as the image: 3.11 here)
#   containers/build.sh debian-base [NAME]  a minimal Debian bookworm with python3 (mmdebstrap |
#                                           docker import), for machines with no registry
#   containers/build.sh tag                 print the content-addressed tag medqlora:<12 hex>
#
# Uses the docker CLI with the classic builder (DOCKER_BUILDKIT=0), so a plain 20.10 engine
# works. Set DOCKER_HOST to use another engine. Caches live under .cache/containers (git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CACHE="${MEDQLORA_CONTAINER_CACHE:-$ROOT/.cache/containers}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export DOCKER_BUILDKIT=0
DEBIAN_INCLUDE="python3,python3-venv,git,ca-certificates"

image_tag() { "$PY" -m medqlora.core.runner tag; }

cmd_tag() { image_tag; }

cmd_debian_base() {
    local name="${1:-medqlora-base:bookworm}"
    if docker image inspect "$name" >/dev/null 2>&1; then
        echo "build.sh: base $name already in the engine"; return 0
    fi
    # The tarball is keyed by the package list, so changing DEBIAN_INCLUDE makes a new one.
    local key; key="$(echo "$DEBIAN_INCLUDE" | sha256sum | cut -c1-12)"
    local tar="$CACHE/debian-bookworm-$key.tar"
    mkdir -p "$CACHE"
    if [ ! -s "$tar" ]; then
        echo "build.sh: mmdebstrap bookworm minbase + $DEBIAN_INCLUDE"
        mmdebstrap --quiet --variant=minbase --include="$DEBIAN_INCLUDE" bookworm "$CACHE/partial.tar"
        mv "$CACHE/partial.tar" "$tar"
    fi
    docker import --change 'CMD ["/bin/bash"]' "$tar" "$name" >/dev/null
    echo "build.sh: imported $name from $tar ($(du -h "$tar" | cut -f1))"
}

cmd_wheelhouse() {
    local dir="${1:-$CACHE/wheelhouse}"
    mkdir -p "$dir"
    local stamp="$dir/.lock.sha256"
    local want; want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-64)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "build.sh: wheelhouse $dir is current for requirements.lock"; return 0
    fi
    # `pip wheel` downloads wheels and builds the few sdist-only pins (rouge_score, antlr4...)
    # here, so the image build never compiles and never needs an index.
    local build_requires
    build_requires="$("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))")"
    # shellcheck disable=SC2086
    # (the grep drops pip's notes about absent local index folders some machines configure)
    "$PY" -m pip wheel --quiet -r requirements.lock $build_requires -w "$dir" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$stamp"
    echo "build.sh: wheelhouse $dir: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}

cmd_image() {
    local base="" wheelhouse="" extra_index="" tag=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --base) base="$2"; shift 2 ;;
            --wheelhouse) wheelhouse="$2"; shift 2 ;;
            --extra-index-url) extra_index="$2"; shift 2 ;;
            --tag) tag="$2"; shift 2 ;;
            *) echo "build.sh image: unknown option $1" >&2; exit 2 ;;
        esac
    done
    tag="${tag:-$(image_tag)}"
    # A small build context made of exactly what the Dockerfile copies (not .venv, data, models).
    local ctx; ctx="$(mktemp -d /tmp/medqlora-build.XXXXXX)"
    cp containers/Dockerfile requirements.lock pyproject.toml "$ctx/"
    if [ -f README.md ]; then cp README.md "$ctx/"; else : > "$ctx/README.md"; fi
    cp -r medqlora schema "$ctx/"
    find "$ctx/medqlora" -name __pycache__ -prune -exec rm -rf {} +
    mkdir -p "$ctx/wheelhouse"
    local args=(--tag "$tag" --file "$ctx/Dockerfile"
        --build-arg "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
        --build-arg "LOCK_SHA256=$(sha256sum requirements.lock | cut -c1-64)"
        --build-arg "IMAGE_TAG=$tag")
    [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
    [ -n "$extra_index" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
    if [ -n "$wheelhouse" ]; then
        # Hard links when on the same filesystem: no copy of ~500 MB of wheels.
        cp -al "$wheelhouse"/*.whl "$ctx/wheelhouse/" 2>/dev/null \
            || cp "$wheelhouse"/*.whl "$ctx/wheelhouse/"
        args+=(--network none)  # proves the offline build: no index, no registry
    fi
    local t0=$SECONDS
    local rc=0
    docker build "${args[@]}" "$ctx" || rc=$?
    rm -rf "$ctx"
    [ "$rc" = 0 ] || { echo "build.sh: docker build failed ($rc)" >&2; exit "$rc"; }
    echo "build.sh: built $tag in $((SECONDS - t0)) s"
}

case "${1:-}" in
    image) shift; cmd_image "$@" ;;
    wheelhouse) shift; cmd_wheelhouse "$@" ;;
    debian-base) shift; cmd_debian_base "$@" ;;
    tag) cmd_tag ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
