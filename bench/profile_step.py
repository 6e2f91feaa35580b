"""Where one forward + backward of the fast path spends its time, CPU vs GPU (bench only).

    python bench/profile_step.py --out $OUT --layers 4 --rows 1     # ~1 min on an H200

Mistral-7B with `--layers` decoder layers (random NF4 weights), the train stage's fast path
(every switch on, no recompute), one micro-batch of `--rows` x 2048 tokens, bf16 autocast:
wall time of a forward + backward, the GPU's busy time in it, and the ops with the most CPU
time (torch.profiler). A step whose CPU time exceeds its GPU time is launch-bound: the GPU
waits for Python.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import FAST, build_base, medqlora_path  # noqa: E402

SEQ = 2048


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer (peft's dropout in the fused "
                             "branch: the replay's generator calls would break the graph)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(seq=SEQ, dropout=0.05, warmup=0, steps=1,
                fast={**FAST, "checkpoint_policy": "none",
                      "micro_batch_tokens": args.rows * SEQ})
    model, collator, _ = medqlora_path(spec, build_base("mistral-7b", args.layers),
                                       "/tmp/profile-step", None)
    model.train()
    if args.compile:
        from medqlora.train.fast import lora_branch
        lora_branch.dropped_linear = lambda x, w, p: torch.nn.functional.linear(
            torch.nn.functional.dropout(x, p, True), w)
        for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
            layer.compile()
    ids = torch.randint(3, model.config.vocab_size, (args.rows, SEQ))
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collator(rows).items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()

    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(5):
        start = time.perf_counter()
        step()
        cpus.append(time.perf_counter() - start)       # backward() returns once launched+run
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only (an op's event repeats its kernels' device time)
    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    tag = f"{args.layers}l-{args.rows}r" + ("-compiled" if args.compile else "")
    peak = torch.cuda.max_memory_allocated() / 2**30
    lines = [f"Mistral-7B, {args.layers} layers, {args.rows} x {SEQ} tokens, fast path"
             f"{', layers compiled' if args.compile else ''}, no recompute "
             f"(3 warm-up steps: {warmup_s:.1f} s): peak {peak:.2f} GiB, "
             f"wall {min(walls) * 1e3:.1f} ms a forward + backward, "
             f"GPU busy {gpu_us / 1e3:.1f} ms (kernel time in the profiled step)",
             "", events.table(sort_by="self_cpu_time_total", row_limit=30,
                              max_name_column_width=60),
             "", events.table(sort_by="self_device_time_total", row_limit=20,
                              max_name_column_width=60)]
    report = "\n".join(lines)
    (out / f"profile-{tag}.txt").write_text(report)
    print(report[:6000], flush=True)
    prof.export_chrome_trace(str(out / f"trace-{tag}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
