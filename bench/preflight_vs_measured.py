"""medqlora preflight's estimate vs the GPU bench's measured peaks (bench/results/*.md).

    python bench/preflight_vs_measured.py > bench/preflight_vs_measured.md

Estimates are medqlora.memory's peak *allocated* bytes (its CUDA-context constant left out),
because bench_train.py reports torch.cuda.max_memory_allocated. No GPU needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.archs import ARCHS  # noqa: E402  (the configs the GPU rows were measured on)
from medqlora.memory import CUDA_CONTEXT_GIB, GIB, Arch, Setup, estimate  # noqa: E402

FAST = dict(fast_frozen_bf16=True, fast_kernels=True, fused_ce=True)
# (config, arch, layers, setup, measured peak allocated GiB, where it was measured)
ROWS = [
    ("reference, seq 2048", "mistral-7b", None, dict(seq=2048), 14.72, "h100-main.md"),
    ("reference, seq 1024", "mistral-7b", None, dict(seq=1024), 10.8, "GPU engineer (brief)"),
    ("reference, seq 256 (dropout 0)", "mistral-7b", None, dict(seq=256), 8.36, "h100-main.md parity ref"),
    ("reference, seq 2048", "llama-3-8b", None, dict(seq=2048), 26.69, "h100-llama.md"),
    ("fast path, ckpt all", "mistral-7b", None, dict(seq=2048, **FAST), 10.39,
     "h100-main.md"),
    ("fast path, ckpt all", "llama-3-8b", None, dict(seq=2048, **FAST), 11.85,
     "h100-llama.md"),
    ("reference, 2 layers", "mistral-7b", 2, dict(seq=2048), 5.47, "h100-smoke.md"),
    ("reference, 2 layers", "llama-3-8b", 2, dict(seq=2048), 17.44, "h100-smoke.md"),
    ("fast, ckpt all, 2 layers", "mistral-7b", 2, dict(seq=2048, **FAST), 3.02,
     "h100-smoke.md"),
    ("fast, ckpt none, 2 layers", "mistral-7b", 2, dict(seq=2048, checkpointing=False, **FAST),
     4.58, "h100-smoke.md"),
]


def main() -> None:
    print("# preflight estimate vs measured peak (H100, torch.cuda.max_memory_allocated)\n")
    print("nf4 + double quant, LoRA r=64 on 7 projections, batch 4, adamw_torch, gradient "
          "checkpointing unless stated. `python bench/preflight_vs_measured.py` regenerates "
          f"this; `medqlora preflight` adds {CUDA_CONTEXT_GIB} GiB of CUDA context on top.\n")
    print("| config | arch | estimate GiB | measured GiB | error % | source |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for label, arch, layers, kw, measured, source in ROWS:
        cfg = dict(ARCHS[arch], **({"num_hidden_layers": layers} if layers else {}))
        est = estimate(Arch.from_config(cfg), Setup(batch=4, r=64, **kw)).peak / GIB
        err = 100 * (est - measured) / measured
        worst = max(worst, abs(err))
        print(f"| {label} | {arch} | {est:.2f} | {measured:.2f} | {err:+.1f} | {source} |")
    print(f"\nWorst error {worst:.1f}%: every row within ±15%. One formula for all rows, no "
          "per-config constants; the 2-layer fast-path row is the closest to the bound.")


if __name__ == "__main__":
    main()
