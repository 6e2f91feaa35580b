"""How long `medqlora validate` takes on hostile and degenerate params files (issue 17: any
file answered within 2 seconds on 2 cores). Prints one row per file: wall-clock seconds of the
whole command (interpreter start and imports included), exit code and its first line.

    python bench/bench_validate.py            # from the project root
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = (ROOT / "params.yaml").read_text(encoding="utf-8")


def bomb(levels: int = 9) -> str:
    """Nested anchors: 9 aliases of the level below per level, 9^9 = 387,420,489 values."""
    lines = ['x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def env(items: str) -> str:
    return BASE.replace("  env: []", f"  env: {items}")


CASES = {
    "shipped params.yaml": BASE,
    "billion laughs under runner.env": bomb() + env("*x8"),
    "recursive alias": BASE + "loop: &a [1, *a]\n",
    "2,000 nested lists": BASE + "deep: " + "[" * 2000 + "]" * 2000 + "\n",
    "120,000 open brackets": BASE + "deep: " + "[" * 120_000 + "\n",
    "700 indentation levels": BASE + "".join(" " * i + f"k{i}:\n" for i in range(700)),
    "85,000 flow values (256 KB)": env("[" + ", ".join(["[]", "{}"] * 42_500)[:250_000] + "]"),
    "4,700 mixed items (non-unique)": env("[" + ", ".join(["[]", "{}"] * 2350) + "]"),
    "4,700 strings, block style": BASE.replace("  env: []", "  env:\n" + "".join(
        f"    - V{i:06d}\n" for i in range(4700))),
    "250 KB of comments": BASE + "#" + "x" * 250_000 + "\n",
    "250 KB model.base": BASE.replace("models/tiny-med-llama", "a" * 250_000, 1),
    "5,000-digit seed": BASE.replace("seed: 42", "seed: " + "9" * 5000),
    "NaN and infinities": BASE.replace("lora_alpha: 32", "lora_alpha: .nan").replace(
        "learning_rate: 0.003", "learning_rate: .inf"),
}


def main() -> None:
    print(f"| case | bytes | seconds | exit | first line |\n|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in CASES.items():
            path = Path(tmp) / "params.yaml"
            path.write_text(text, encoding="utf-8")
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "medqlora.cli", "validate", str(path)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            seconds = time.perf_counter() - start
            first = (proc.stderr or proc.stdout).splitlines()[0].replace(str(path), "FILE")
            print(f"| {name} | {len(text.encode()):,} | {seconds:.2f} | {proc.returncode} | "
                  f"{first[:110]} |")


if __name__ == "__main__":
    main()
