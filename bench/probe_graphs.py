"""Decoder layers as CUDA graphs at 1 x 2048 tokens: speed, memory and exactness (bench only).

    python bench/probe_graphs.py --out $OUT          # ~3 min on an H200

Mistral-7B (random NF4 weights), the train stage's fast path with checkpoint_policy none,
micro-batches of one 2048-token row. Each variant runs in its own process:
  eager      every layer eager (launch-bound: bench/README.md)
  graphs     layers 0..N-1 as one graphed body (medqlora/train/fast/graphs.py)
  check      dropout 0: the graphed body's loss and adapter gradients against eager ones
Prints ms a forward + backward, tokens/s, peak allocated and reserved GiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import FAST, build_base, medqlora_path  # noqa: E402

SEQ = 2048


def kernel_check() -> dict:
    """The Triton seeded dropout against lora_branch's torch version of the same hash."""
    from medqlora.train.fast import lora_branch
    x = torch.randn(2048, 14336, device="cuda", dtype=torch.bfloat16)
    seed = torch.randint(0, 2**31 - 1, (1,), device="cuda")
    fast = lora_branch.seeded_dropout(x, seed, 0.05)
    slow = lora_branch._torch_seeded_dropout(x, seed, 0.05)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        lora_branch.seeded_dropout(x, seed, 0.05)
    torch.cuda.synchronize()
    kernel_us = (time.perf_counter() - start) / 20 * 1e6
    start = time.perf_counter()
    for _ in range(20):
        torch.nn.functional.dropout(x, 0.05, True)
    torch.cuda.synchronize()
    native_us = (time.perf_counter() - start) / 20 * 1e6
    return {"variant": "kernel", "max_abs_diff": (fast - slow).abs().max().item(),
            "kept": (fast != 0).float().mean().item(), "seeded_us": kernel_us,
            "native_dropout_us": native_us}


def run(variant: str, arch: str, layers: int | None, dropout_kind: str) -> dict:
    from medqlora.train.fast import fastpath, graphs, lora_branch
    if variant == "kernel":
        return kernel_check()
    dropout = 0.0 if variant == "check" else 0.05
    spec = dict(seq=SEQ, dropout=dropout, warmup=0, steps=1,
                fast={**FAST, "checkpoint_policy": "none", "micro_batch_tokens": SEQ})
    model, collator, _ = medqlora_path(spec, build_base(arch, layers), "/tmp/probe-graphs", None)
    model.train()
    stack = fastpath.decoder_layers(model)
    state = graphs.capture_layers(stack, 0) if variant != "eager" else None
    if not (variant != "eager" and dropout_kind == "seeded"):   # graphed layers: seeded
        lora_branch.set_dropout_mode(model, "peft" if dropout_kind == "peft" else "replay")
    ids = torch.randint(3, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collator(rows).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    out = {"variant": variant, "arch": arch, "dropout": dropout_kind, "warmup_s": warm_s}
    if variant == "check":
        for p in params:
            p.grad = None
        graph_loss = step().item()
        graph_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        state.failure = "eager comparison"
        eager_loss = step().item()
        diffs = [(g - p.grad).abs().max().item() for g, p in zip(graph_grads, params)]
        scale = max(p.grad.abs().max().item() for p in params)
        out.update(graph_loss=graph_loss, eager_loss=eager_loss, max_grad_diff=max(diffs),
                   max_grad=scale, replays=state.replays, failure=state.failure,
                   declined=state.declined)
        return out
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = sorted(times)[len(times) // 2] * 1e3
    out.update(ms=ms, tokens_per_s=SEQ / ms * 1e3,
               peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
               replays=state.replays if state else 0,
               failure=state.failure if state else None,
               declined=state.declined if state else None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--variants", default="eager,graphs,check")
    parser.add_argument("--dropout", default="peft", choices=["peft", "replay", "seeded"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run(args.one, args.arch, args.layers, args.dropout)),
              flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--arch", args.arch,
               "--dropout", args.dropout] + (["--layers", str(args.layers)] if args.layers else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"[{variant}] FAILED rc={proc.returncode}\n{proc.stderr[-4000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][7:]))
        print(json.dumps(results[-1]), flush=True)
        (out / f"probe-graphs-{args.arch}-{args.dropout}.json").write_text(
            json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
