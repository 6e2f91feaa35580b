"""Time the benchmark stage's scoring: MedQA-4 at the public test size, base and base + adapter.

    python bench/bench_benchmark.py --adapter models/adapter                  # 1,273 items
    python bench/bench_benchmark.py --adapter models/adapter --batch-size 32 --num-fewshot 0

Runs what `stages/benchmark.py` runs (medqlora.evaluate.benchmarks: the adapter's 4-bit base as train
loaded it, LoRA attached, lm-evaluation-harness `medqa_4options` through `simple_evaluate`) on
synthetic MedQA items in the public layout (scripts/make_benchmark_samples.py: ~120-word
vignettes with 4 options, about the public test set's mean length; no real items are needed
or shipped). Prints one Markdown table: load time, base and adapter scoring time, items per
second, log-likelihood requests (4 per item), peak GPU memory. The accuracies are of made-up
questions and mean nothing; the times are the point.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from make_benchmark_samples import write_samples  # noqa: E402

from medqlora.core.config import BenchmarkParams  # noqa: E402
from medqlora.evaluate import benchmarks as bm


def time_medqa(adapter: str | Path, items: int = 1273, batch_size: int | str = 16,
               num_fewshot: int = 0, workdir: str | Path | None = None) -> dict:
    """Score `items` synthetic MedQA-4 items with base and base + adapter; return the timings
    and the harness's metrics (benchmark.json's shape, plus scoring seconds per model, load
    time and device)."""
    import torch
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-medqa-"))
    files = write_samples(work / "data/benchmarks", n_test=8, n_fewshot=max(num_fewshot, 1),
                          medqa_items=items)["medqa_4options"]
    bench = BenchmarkParams(task="medqa_4options", path=str(files["path"]),
                            fewshot_path=str(files["fewshot_path"]) if num_fewshot else None,
                            num_fewshot=num_fewshot, limit=None)
    prepared = bm.check_files((bench,), work / "data/benchmarks", root="/")
    tasks_dir = bm.write_task_folder(prepared, work / "out")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result, _, _, seconds = bm.score(adapter, prepared, tasks_dir, batch_size)
    result["seconds"] = seconds  # scoring time per model (benchmark.json carries none)
    result["wall_s"] = round(time.perf_counter() - start, 1)  # model load + base + adapter
    result["peak_gib"] = (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                          if torch.cuda.is_available() else None)
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["batch_size"] = batch_size
    return result


def table(result: dict) -> str:
    task = result["tasks"]["medqa_4options"]
    n, secs = task["n"], result["seconds"]
    rows = ["| device | items | shots | batch | model | seconds | items/s | requests | acc "
            "(synthetic) | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("base", "adapter"):
        rows.append(f"| {result['device']} | {n:,} | {task['num_fewshot']} | "
                    f"{result['batch_size']} | {name} | {secs[name]:.1f} | "
                    f"{n / secs[name]:.1f} | {4 * n:,} | {task[name]['acc']:.3f} | "
                    f"{result['peak_gib'] if result['peak_gib'] is not None else 'n/a'} |")
    total = secs["base"] + secs["adapter"]
    rows.append(f"\nBenchmark step for {n:,} MedQA items: {result['wall_s']:.1f} s in all "
                f"({total:.1f} s scoring base + adapter, the rest loading the 4-bit base and "
                f"adapter); lm_eval {result['lm_eval_version']}.")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="models/adapter",
                        help="adapter folder made by the train stage (its meta.json names the base)")
    parser.add_argument("--items", type=int, default=1273, help="MedQA items (public test: 1273)")
    parser.add_argument("--batch-size", default="16",
                        help="lm_eval batch size (an integer, or auto)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    result = time_medqa(args.adapter, args.items, batch, args.num_fewshot)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
