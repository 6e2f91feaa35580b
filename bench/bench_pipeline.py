"""The whole pipeline at real scale: every stage through its entrypoint, as dvc.yaml orders them.

    python bench/bench_pipeline.py --arch mistral-7b --out $OUT             # one GPU
    python bench/bench_pipeline.py --arch llama-3-8b --out $OUT
    python bench/bench_pipeline.py --arch embedded --out bench-results      # the driver on a CPU
    python bench/bench_pipeline.py --recipe examples/smollm2-135m-medical.yaml --out $OUT \
        --merge-dtypes bfloat16,float16                  # the real base (make smollm2 first)

The base is random-init from the real config (bench/archs.py), saved once in bf16 safetensors
with the embedded tiny tokenizer (bench_distributed.make_base); no weights are downloaded.
`--arch embedded` runs the embedded tiny base instead (a CPU check of the driver).
The recipe is examples/mistral-7b-medical.yaml with `model.base` pointed at that folder,
`runner.backend: local`, one epoch of the embedded data, and `package.include_merged: true`;
`--set key=value` overrides any other key (e.g. `--set evaluate.max_examples=500`).
The benchmark stage scores MedQA-4 (lm-evaluation-harness `medqa_4options`, zero-shot) on
1,273 synthetic items in the public layout, the public test size
(scripts/make_benchmark_samples.py; 8 items with `--arch embedded`); `--medqa-items N` changes it.

Each stage command is read from dvc.yaml (train's `--live` becomes `none` where dvclive is not
installed, as on the GPU image) and run in a copy of the project (a fresh-clone-like
workspace under --work), in dvc.yaml's order, through bench/peak.py, which records
torch.cuda.max_memory_allocated / max_memory_reserved of the stage's process at its exit.
Wall time is the stage command's, start to exit (model loading included). The table goes to
stdout and to <out>/pipeline-<arch>.md, every stage's log to <out>/pipeline-<arch>.log, and
the metrics the stages wrote to <out>/pipeline-<arch>.json.

Random weights make speed and memory real but numerics meaningless: generation never meets
an end-of-sequence token, so every answer runs to max_new_tokens (the worst case), and the
adapter's effect is that of a few steps on random data.

`--recipe FILE` runs a recipe as it ships instead (local runner; `--set` still applies), on the
base it names: examples/smollm2-135m-medical.yaml is the real pretrained SmolLM2-135M-Instruct
from its GGUF file, for quality, stopping and merge numerics. `--merge-dtypes` then merges the
trained adapter again with each other storage dtype (models/merged-<dtype>,
metrics/merge-<dtype>.json), to measure what each costs on a real adapter.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.bench_distributed import make_base  # noqa: E402

GIB = 2**30
COPY = ("dvc.yaml", "schema", "stages", "medqlora", "data/raw", "data/benchmarks/README.md",
        "models/tiny-med-llama", "examples", "pyproject.toml")
STAGES = ("prepare", "train", "evaluate", "benchmark", "merge", "package")
MEDQA = "data/benchmarks/medqa/test.jsonl"
# dvclive/ (the train stage's output folder) would import as a namespace package: look for
# the library's own module.
LIVE = importlib.util.find_spec("dvclive") is not None and \
    importlib.util.find_spec("dvclive.live") is not None


def workspace(dest: Path, extra: list[str] = ()) -> Path:
    """A fresh-clone-like copy of the project (what the stage commands need, and `extra`
    paths such as a recipe's local base), nothing built."""
    shutil.rmtree(dest, ignore_errors=True)
    for item in (*COPY, *extra):
        src, target = ROOT / item, dest / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    return dest


def parse_value(text: str):
    """`--set` values are YAML scalars: 500, 0.5, true, null, float16."""
    return yaml.safe_load(text)


def write_medqa(ws: Path, items: int) -> None:
    """`items` synthetic MedQA-4 items in the public layout at MEDQA (the benchmark stage's file)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_benchmark_samples import medqa
    import random
    path = ws / MEDQA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in medqa(random.Random(0), items)),
                    encoding="utf-8")


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """`--set a.b=value` items applied to a params mapping."""
    for item in overrides:
        key, _, value = item.partition("=")
        node = doc
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = parse_value(value)
    return doc


def recipe_params(recipe: Path, overrides: list[str]) -> dict:
    """A recipe as it ships, on the local runner."""
    doc = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    doc["runner"].update(backend="local", network="none", env=[])
    return apply_overrides(doc, overrides)


def params_for(base: Path, overrides: list[str], cpu: bool) -> dict:
    """The example recipe on `base`, local runner, one epoch, merged weights packaged, MedQA-4
    in evaluate.benchmarks."""
    doc = yaml.safe_load((ROOT / "examples" / "mistral-7b-medical.yaml").read_text())
    doc["evaluate"]["benchmarks"] = [{"task": "medqa_4options", "path": MEDQA}]
    doc["model"]["base"] = str(base)
    doc["runner"].update(backend="local", network="none", env=[])
    doc["train"]["num_train_epochs"] = 1
    doc["package"]["include_merged"] = True
    if cpu:  # the driver check: tiny sizes, so it runs in a minute on 2 cores
        doc["data"]["max_seq_length"] = 256
        doc["train"].update(max_steps=2, gradient_checkpointing=False, mixed_precision="auto")
        doc["evaluate"].update(max_examples=8, max_new_tokens=8)
        doc["merge"]["parity_prompts"] = 4
    return apply_overrides(doc, overrides)


def stage_commands(ws: Path) -> list[tuple[str, str]]:
    """(name, cmd) of each stage, in dvc.yaml's order."""
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    return [(name, stages[name]["cmd"]) for name in STAGES]


def run_stage(ws: Path, name: str, cmd: str, log) -> dict:
    """Run one stage command through bench/peak.py; wall seconds, peak GPU memory, exit code."""
    argv = cmd.split()
    assert argv[0] == "python", cmd
    if "--live" in argv and not LIVE:  # the GPU image has no dvclive (nor dvc): no curves
        argv[argv.index("--live") + 1] = "none"
    peak_file = ws / f".peak-{name}.json"
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, MEDQLORA_PEAK_FILE=str(peak_file), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peak.py"), *argv[1:]], cwd=ws,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write(f"\n===== {name}: rc {proc.returncode}, {wall:.1f} s\n{proc.stdout}")
    log.flush()
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
    return {"stage": name, "rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_alloc_gib": peak.get("allocated_gib"), "peak_reserved_gib": peak.get("reserved_gib"),
            "timing": [line.split("timing: ", 1)[1] for line in proc.stdout.splitlines()
                       if "timing: " in line]}


def merge_again(ws: Path, params: dict, dtype: str, log) -> dict:
    """The merge stage once more on the trained adapter, storing the merged weights in `dtype`
    (models/merged-<dtype>, metrics/merge-<dtype>.json)."""
    variant = ws / f"params-merge-{dtype}.yaml"
    doc = json.loads(json.dumps(params))
    doc["merge"]["dtype"] = dtype
    variant.write_text(yaml.safe_dump(doc, sort_keys=False))
    cmd = (f"python stages/merge.py --params {variant.name} --data data/prepared --adapter "
           f"models/adapter --out models/merged-{dtype} --metrics metrics/merge-{dtype}.json")
    return run_stage(ws, f"merge-{dtype}", cmd, log)


def summary(name: str, ws: Path) -> str:
    """What the stage produced, in a few words, from its metrics file."""
    path = ws / "metrics" / f"{name}.json"
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    measured = path.parent / "measured" / path.name  # train's speed and memory
    if measured.is_file():
        m = {**m, **json.loads(measured.read_text())}
    if name == "prepare":
        return f"splits {m['splits']}"
    if name == "train":
        return (f"{m.get('steps', m.get('global_step'))} steps, "
                f"{m.get('tokens_per_second')} tokens/s, train loss {m.get('train_loss')}")
    if name == "evaluate":
        sets = [("test", m)] + ([("heldout", m["heldout"])] if "heldout" in m else [])
        return "; ".join(
            f"{label} n {s['n']} ({s.get('n_option_scored')} by option likelihood, "
            f"{s.get('n_generated')} generated x {m['generation']['max_new_tokens']} tokens)"
            + (f": perplexity {s['base']['perplexity']:.2f} -> {s['adapter']['perplexity']:.2f}"
               if s.get("base") else "")
            + f", stopped by eos {s['adapter'].get('stopped_by_eos')}" for label, s in sets)
    if name == "benchmark":
        return "; ".join(
            f"{task} n {t['n']}: acc base {t['base']['acc']:.3f}, adapter {t['adapter']['acc']:.3f} "
            "(synthetic items)" for task, t in m["tasks"].items())  # scoring times: `timing:` lines
    if name.startswith("merge"):
        return (f"parity {'passed' if m.get('passed') else 'FAILED'} ({m.get('dtype')}): mean "
                f"{m.get('mean_abs_logit_diff')} vs floor "
                f"{(m.get('noise_floor') or {}).get('mean_abs_logit_diff')} and effect "
                f"{(m.get('adapter_effect') or {}).get('mean_abs_logit_diff')}, top-1 "
                f"{m.get('top1_agreement')}")
    return ""


def table(arch: str, rows: list[dict], ws: Path, device: str) -> str:
    lines = [f"### {arch} on {device}", "",
             "| stage | rc | wall s | peak alloc GiB | peak reserved GiB | result |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['rc']} | {row['wall_s']} | "
                     f"{row['peak_alloc_gib']} | {row['peak_reserved_gib']} | "
                     f"{summary(row['stage'], ws)} |")
    for row in rows:
        for timing in row["timing"]:
            lines.append(f"- {row['stage']} {timing}")
    return "\n".join(lines)


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    import torch
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/medqlora-pipeline"))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run (a later run re-uses the workspace)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the workspace")
    parser.add_argument("--medqa-items", type=int, default=None,
                        help="synthetic MedQA-4 items the benchmark stage scores (1273; 8 on a CPU)")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="run this params file as it ships, on the base it names")
    parser.add_argument("--merge-dtypes", default="",
                        help="after the stages, merge again with each of these merge.dtype values")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A GGUF base is materialised once for every run under --work (medqlora/core/gguf.py).
    os.environ.setdefault("MEDQLORA_CACHE", str(work.resolve() / "cache"))
    info = versions()
    cpu = info["device"] == "cpu"
    if args.recipe:
        args.arch = args.recipe.stem
        params = recipe_params(args.recipe, args.set)
        extra = [params["model"]["base"]] if (ROOT / params["model"]["base"]).is_dir() else []
    else:
        base = (ROOT / "models" / "tiny-med-llama" if args.arch == "embedded"
                else make_base(args.arch, work / f"base-{args.arch}"))
        params, extra = params_for(base, args.set, cpu=cpu), []
    ws = work / f"ws-{args.arch}"
    if args.fresh or not ws.is_dir():
        workspace(ws, extra)
    if not args.recipe:
        write_medqa(ws, args.medqa_items or (8 if cpu else 1273))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    wanted = args.stages.split(",")
    rows = []
    with open(out / f"pipeline-{args.arch}.log", "a", encoding="utf-8") as log:
        log.write(f"\n##### {time.strftime('%H:%M:%S')} {args.arch} {args.set} {info}\n")
        for name, cmd in stage_commands(ws):
            if name not in wanted:
                continue
            rows.append(run_stage(ws, name, cmd, log))
            print(json.dumps(rows[-1]), flush=True)
            if rows[-1]["rc"] != 0:
                break
        trained = bool(rows) and all(r["rc"] == 0 for r in rows)
        for dtype in filter(None, args.merge_dtypes.split(",")) if trained else ():
            rows.append(merge_again(ws, params, dtype, log))   # its gate may refuse: reported
            print(json.dumps(rows[-1]), flush=True)
    text = table(args.arch, rows, ws, info["device"]) + f"\n\nversions: {info}\n"
    print(text, flush=True)
    with open(out / f"pipeline-{args.arch}.md", "a", encoding="utf-8") as handle:
        handle.write(f"\n{text}\nsettings: {args.set}\n")
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((ws / "metrics").glob("*.json"))}
    for p in sorted((ws / "metrics" / "measured").glob("*.json")):  # train's speed, memory
        metrics[p.stem] = {**metrics.get(p.stem, {}), **json.loads(p.read_text())}
    (out / f"pipeline-{args.arch}.json").write_text(json.dumps(
        {"rows": rows, "settings": args.set, "versions": info, "metrics": metrics}, indent=1))
    stages = [r for r in rows if r["stage"] in STAGES]
    return 0 if stages and all(r["rc"] == 0 for r in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
