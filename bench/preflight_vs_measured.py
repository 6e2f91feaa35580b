"""medqlora preflight's estimate vs the GPU benches' measured peaks (bench/results/).

    python bench/preflight_vs_measured.py > bench/preflight_vs_measured.md

Estimates are medqlora.core.memory's peak *allocated* bytes (its CUDA-context constant left out),
because bench_train.py reports torch.cuda.max_memory_allocated. No GPU needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.archs import ARCHS  # noqa: E402  (the configs the GPU rows were measured on)
from medqlora.core.memory import (CUDA_CONTEXT_GIB, GIB, Arch, Setup, estimate,  # noqa: E402
                             estimate_evaluate, estimate_merge)

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
    ("DDP 2 GPUs (per GPU), fast path", "mistral-7b", None, dict(seq=2048, world=2, **FAST),
     11.02, "h100x2-distributed.md"),
    ("DDP 2 GPUs (per GPU), plain", "llama-2-13b", None, dict(seq=2048, world=2), 22.59,
     "h100x2-distributed.md"),
    ("FSDP-QLoRA 2 GPUs (per GPU), plain, bf16 storage", "llama-2-13b", None,
     dict(seq=2048, world=2, strategy="fsdp"), 12.40, "h100x2-distributed.md"),
    ("pipeline train stage, fast path (auto)", "mistral-7b", None, dict(seq=2048, **FAST), 10.54,
     "h200-pipeline-mistral-7b-fp16-merge.json"),
    ("pipeline train stage, fast path (auto)", "llama-3-8b", None, dict(seq=2048, **FAST), 12.01,
     "h200-pipeline-llama-3-8b.json"),
]
# evaluate: (config, arch, rows generated together, longest prompt, new tokens, measured, source)
EVALUATE = [
    ("evaluate, 57 items (43 generated)", "mistral-7b", 43, 113, 512, 8.20,
     "h200-pipeline-mistral-7b-fp16-merge.json"),
    ("evaluate, 500 items (355 generated)", "mistral-7b", 355, 116, 512, 35.14,
     "h200-pipeline-mistral-7b.json"),
    ("evaluate, 57 items (43 generated)", "llama-3-8b", 43, 113, 128, 12.68,
     "h200-pipeline-llama-3-8b.json"),
]
# merge: (config, arch, longest parity prompt, measured, source)
MERGE = [
    ("merge, stored float32", "mistral-7b", 116, 30.38, "h200-pipeline-mistral-7b.json"),
    ("merge, stored float16", "mistral-7b", 113, 28.51, "h200-pipeline-mistral-7b-fp16-merge.json"),
    ("merge, stored float32", "llama-3-8b", 113, 33.36, "h200-pipeline-llama-3-8b.json"),
]


def main() -> None:
    print("# preflight estimate vs measured peak (H100 / H200, torch.cuda.max_memory_allocated)\n")
    print("nf4 + double quant, LoRA r=64 on 7 projections, batch 4, adamw_torch, gradient "
          "checkpointing unless stated. `python bench/preflight_vs_measured.py` regenerates "
          f"this; `medqlora preflight` adds {CUDA_CONTEXT_GIB} GiB of CUDA context on top.\n")
    print("| config | arch | estimate GiB | measured GiB | error % | source |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    rows = estimates()
    for label, arch, est, measured, source in rows:
        err = 100 * (est.peak / GIB - measured) / measured
        worst = max(worst, abs(err))
        print(f"| {label} | {arch} | {est.peak / GIB:.2f} | {measured:.2f} | {err:+.1f} | "
              f"{source} |")
    print(f"\nWorst error {worst:.1f}% over {len(rows)} rows (train, evaluate, merge; one GPU, "
          "DDP and FSDP). One formula per stage, no per-config constants. Caveat: the DDP, FSDP, "
          "evaluate and merge terms were written with these measurements in view; no run "
          "measured after them has checked them yet.")


def estimates() -> list[tuple]:
    """(label, arch, Estimate, measured GiB, source) of every measured row."""
    rows = []
    for label, arch, layers, kw, measured, source in ROWS:
        cfg = dict(ARCHS[arch], **({"num_hidden_layers": layers} if layers else {}))
        rows.append((f"train: {label}", arch, estimate(Arch.from_config(cfg),
                                                       Setup(batch=4, r=64, **kw)),
                     measured, source))
    for label, arch, gen_rows, prompt, new, measured, source in EVALUATE:
        rows.append((label, arch, estimate_evaluate(Arch.from_config(ARCHS[arch]), Setup(
            batch=1, seq=prompt, r=64), gen_rows, prompt, new), measured, source))
    for label, arch, prompt, measured, source in MERGE:
        rows.append((label, arch, estimate_merge(Arch.from_config(ARCHS[arch]), Setup(
            batch=1, seq=prompt, r=64), prompt), measured, source))
    return rows


if __name__ == "__main__":
    main()
