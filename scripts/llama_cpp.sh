#!/usr/bin/env bash
# llama.cpp for `medqlora export` and tests/test_export.py, from PyPI only (`make llama-cpp`).
#
#   scripts/llama_cpp.sh        # idempotent: does nothing when .cache/llama.cpp is current
#
# The pinned llama-cpp-python sdist (requirements-llama-cpp.txt, hash-checked) vendors llama.cpp
# at one commit. From that one download:
#   .cache/llama.cpp/src/vendor/llama.cpp/   llama.cpp's converters and gguf-py (medqlora.ship.export)
#   the binding, installed into the venv     llama-cpp-python itself (pip, from the same sdist)
#   its native library                       built here with CMake, only the targets the binding
#                                            loads (libllama, libggml*), copied where the
#                                            binding's own build would install them
# Why not a plain `pip install llama-cpp-python`: its build also compiles llama.cpp's `common`
# library (52 of 127 objects: chat parsing, Jinja, JSON schema; the binding never loads it, and
# its CMakeLists forces it on), which took most of the measured time on 2 cores (README).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
HOME_DIR="$ROOT/.cache/llama.cpp"
PIN_FILE="requirements-llama-cpp.txt"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

want="$(cat "$PIN_FILE" "$0" | sha256sum | cut -c1-64)"
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -f "$HOME_DIR/.stamp" ] && [ "$(cat "$HOME_DIR/.stamp")" = "$want" ] \
        && [ -f "$site/llama_cpp/lib/libllama.so" ]; then
    echo "llama_cpp.sh: .cache/llama.cpp is current ($(cat "$HOME_DIR/VERSION"))"
    exit 0
fi
t0=$SECONDS
rm -rf "$HOME_DIR"
mkdir -p "$HOME_DIR/dl"
# The sdist only (--no-binary), hash-checked against the pin.
"$PY" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$PIN_FILE" \
    -d "$HOME_DIR/dl" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
sdist="$(ls "$HOME_DIR"/dl/llama_cpp_python-*.tar.gz)"
mkdir -p "$HOME_DIR/src"
tar -xzf "$sdist" -C "$HOME_DIR/src" --strip-components=1
t1=$SECONDS

# libllama + libggml (CPU) only: no common, tools, tests, examples, server, curl.
cmake -S "$HOME_DIR/src/vendor/llama.cpp" -B "$HOME_DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_CURL=OFF -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
    >"$HOME_DIR/cmake.log" 2>&1 || { tail -n 40 "$HOME_DIR/cmake.log" >&2; exit 1; }
cmake --build "$HOME_DIR/build" --target llama --parallel "$JOBS" >>"$HOME_DIR/cmake.log" 2>&1 \
    || { tail -n 40 "$HOME_DIR/cmake.log" >&2; exit 1; }
t2=$SECONDS

# The binding from the same sdist, without its native build (LLAMA_BUILD=OFF); --no-cache-dir
# keeps that library-less wheel out of pip's wheel cache. Its dependencies are in the lock.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet --no-deps \
    --no-cache-dir --force-reinstall "$sdist" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
mkdir -p "$site/llama_cpp/lib"
find "$HOME_DIR/build/bin" -maxdepth 1 -name "lib*.so*" -exec cp -P {} "$site/llama_cpp/lib/" \;
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$HOME_DIR/src/llama_cpp/__init__.py")"
commit="$(git -C "$HOME_DIR/src/vendor/llama.cpp" rev-parse HEAD 2>/dev/null || echo unknown)"
echo "$version $commit" > "$HOME_DIR/VERSION"
"$PY" -c "import llama_cpp; print('llama_cpp.sh: llama-cpp-python', llama_cpp.__version__,
'loads', llama_cpp.llama_cpp._lib._name)"
echo "$want" > "$HOME_DIR/.stamp"
echo "llama_cpp.sh: llama-cpp-python $version (llama.cpp $commit): download+extract $((t1 - t0)) s," \
     "native build $((t2 - t1)) s, binding $((SECONDS - t2)) s"
