"""Several GPUs: DDP scaling and FSDP-QLoRA memory, through the train stage itself.

    bench/bench_distributed.sh all            # every row (2+ GPUs; ~10 min on 2 x H100)
    bench/bench_distributed.sh ddp            # Mistral-7B DDP on 1 and 2 GPUs
    bench/bench_distributed.sh fsdp           # Llama-2-13B shapes, DDP vs FSDP-QLoRA on 2 GPUs
    bench/bench_distributed.sh fsdp-resume    # FSDP-QLoRA killed after a sharded checkpoint,
                                              # then resumed (tiny random Llama, 2 GPUs)
    python bench/bench_distributed.py --part cpu-check   # the driver on a CPU, tiny model

Each row runs `python stages/train.py` with runner.distributed set (medqlora/train/launch.py ->
accelerate launch), i.e. exactly what `dvc repro train` runs. The base is random-init from the
real config, saved once in bf16 safetensors (no download) and loaded by the stage through
bitsandbytes NF4 like any checkpoint; the data are random token rows of exactly `seq` tokens
(no padding), so every optimizer step carries micro x accumulation x processes x seq tokens.

Recipe (examples/mistral-7b-medical.yaml): LoRA r=64 on the 7 projections, bf16, gradient
checkpointing, micro-batch 4, effective batch 16 sequences (keep_effective_batch: accumulation
4 on 1 GPU, 2 on 2 GPUs), sequence 2048 = 32,768 tokens an optimizer step.
Throughput = tokens per step / median seconds between optimizer steps
(metrics/measured/train.json step_seconds_median, after warm-up); scaling efficiency = tokens/s on N / (N x tokens/s on 1).
Memory = torch.cuda.max_memory_allocated of every process (peak_memory_gib_per_process).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.archs import ARCHS  # noqa: E402
MICRO, EFFECTIVE = 4, 16
GIB = 2**30


def row(label, arch, gpus, strategy="ddp", seq=2048, warmup=2, steps=5, fast="auto",
        train=None, **quant):
    return dict(label=label, arch=arch, gpus=gpus, strategy=strategy, seq=seq, warmup=warmup,
                steps=steps, fast=fast, train=train or {}, quant=quant)


def part(name: str) -> list[dict]:
    """The rows of a part; the 1-GPU row comes first (the efficiency's denominator)."""
    same = dict(fast="off")  # 13B: the plain recipe on both sides, so memory compares like for like
    bf16_storage = dict(bnb_4bit_quant_storage="bfloat16")
    rows = {
        "ddp": [row("ddp 1 GPU", "mistral-7b", 1), row("ddp 2 GPUs", "mistral-7b", 2)],
        # 13B: 1 + 3 steps are enough for the peak (reached in the first step) and keep the
        # part inside one 10-minute device call.
        "fsdp": [row("ddp 2 GPUs", "llama-2-13b", 2, warmup=1, steps=3, **same),
                 row("fsdp-qlora 2 GPUs", "llama-2-13b", 2, "fsdp", warmup=1, steps=3, **same,
                     **bf16_storage)],
        "cpu-check": [row("ddp 1 proc", "tiny", 1, seq=64, warmup=1, steps=2),
                      row("ddp 2 procs", "tiny", 2, seq=64, warmup=1, steps=2)],
    }
    if name == "all":
        return rows["ddp"] + rows["fsdp"]
    return rows[name]


# ---------------------------------------------------------------- inputs

def make_base(arch: str, dest: Path) -> Path:
    """Random-init bf16 safetensors of `arch` + the tiny tokenizer (ids < vocab), once."""
    if (dest / "done").is_file():
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    shutil.rmtree(dest, ignore_errors=True)
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ROOT / "models" / "tiny-med-llama" / name, dest / name)
    del model
    (dest / "done").write_text("ok")
    print(f"# built {arch} in {time.perf_counter() - started:.0f} s", flush=True)
    return dest


def make_data(dest: Path, rows: int, seq: int, vocab: int) -> Path:
    """Prepared-data folder: `rows` random rows of exactly `seq` tokens, 2 validation rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    ints = pa.list_(pa.int32())
    for name, count in (("train", rows), ("val", 2), ("test", 2)):
        ids = torch.randint(4, vocab, (count, seq), generator=gen).tolist()
        table = pa.table({"input_ids": pa.array(ids, ints), "labels": pa.array(ids, ints),
                          "length": pa.array([seq] * count, pa.int32())})
        pq.write_table(table, dest / f"{name}.parquet")
    (dest / "meta.json").write_text(json.dumps({"stage": "prepare", "bench": True}))
    return dest


def params_for(spec: dict, base: Path, port: int) -> dict:
    """The reference recipe with this row's model, steps and runner.distributed."""
    import yaml
    doc = yaml.safe_load((ROOT / "examples" / "mistral-7b-medical.yaml").read_text())
    doc["model"]["base"] = str(base)
    doc["data"]["max_seq_length"] = spec["seq"]
    doc["quantization"].update(spec["quant"])
    doc["train"].update(max_steps=spec["warmup"] + spec["steps"], logging_steps=1,
                        eval_steps=1000, save_steps=1000, early_stopping_patience=0,
                        per_device_train_batch_size=MICRO, gradient_accumulation_steps=EFFECTIVE // MICRO,
                        per_device_eval_batch_size=2, adaptive_batch_size=False)
    doc["train"].update(spec["train"])
    doc["train"].setdefault("fast_path", {})["enabled"] = spec["fast"]
    doc["runner"] = {"backend": "local", "distributed": {
        "num_processes": spec["gpus"], "strategy": spec["strategy"], "main_process_port": port,
        "keep_effective_batch": True}}
    return doc


# ---------------------------------------------------------------- one row

def stage_command(spec: dict, work: Path, index: int) -> tuple[list[str], Path]:
    """(train-stage command line, its output folder) for one row; inputs built once."""
    import yaml
    base = make_base(spec["arch"], work / "models" / spec["arch"])
    rows = EFFECTIVE * (spec["warmup"] + spec["steps"] + 1)
    data = make_data(work / f"data-{spec['arch']}-{spec['seq']}-{rows}", rows, spec["seq"],
                     ARCHS[spec["arch"]]["vocab_size"])
    out = work / f"row-{index}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    params = out / "params.yaml"
    params.write_text(yaml.safe_dump(params_for(spec, base, 29600 + index), sort_keys=False))
    # --live none: no dvclive curves, so dvc/dvclive need not be on the GPU machine.
    return [sys.executable, "stages/train.py", "--params", str(params), "--data", str(data),
            "--out", str(out / "adapter"), "--checkpoints", str(out / "ckpt"),
            "--live", "none", "--metrics", str(out / "train.json")], out


def run_stage(cmd: list[str], out: Path, timeout: int, log_name: str = "log.txt"):
    """Run the stage to its end; (exit code, log text, wall seconds)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    (out / log_name).write_text(text)
    return proc.returncode, text, time.perf_counter() - started


def run_row(spec: dict, work: Path, index: int, timeout: int) -> dict:
    cmd, out = stage_command(spec, work, index)
    code, text, wall = run_stage(cmd, out, timeout)
    if code != 0:
        return {**spec, "error": f"exit {code}: {text[-1500:]}", "wall_s": wall}
    # losses and batch in train.json, speed and memory beside it in measured/train.json
    m = {**json.loads((out / "train.json").read_text()),
         **json.loads((out / "measured" / "train.json").read_text())}
    per_step = EFFECTIVE * spec["seq"]
    return {**spec, "wall_s": wall, "tokens_per_second": per_step / m["step_seconds_median"],
            "step_s": m["step_seconds_median"], "tokens_per_second_whole_run": m["tokens_per_second"],
            "peak_gib": m["peak_memory_gib_per_process"], "loss": m["train_loss"],
            "effective_batch": m["effective_batch"], "accum": m["gradient_accumulation_steps"],
            "adapter_files": sorted(p.name for p in (out / "adapter").iterdir())}


# ---------------------------------------------------------------- FSDP resume

def resume_check(work: Path, timeout: int, gpus: int = 2) -> dict:
    """FSDP-QLoRA resume: SIGKILL the stage after a sharded checkpoint, run it again.

    Tiny random Llama, 4-bit with bf16 storage, 40 steps saved every 5. Run A is undisturbed;
    run B is killed once checkpoint-10 is complete (medqlora.train.checkpoints.problem is None), then
    the same command runs again and must resume from it and end at the same step.
    """
    from safetensors.torch import load_file
    from medqlora.train import checkpoints
    spec = row("fsdp-qlora resume", "tiny", gpus, "fsdp", seq=256, warmup=0, steps=40,
               fast="off", train=dict(save_steps=5, save_total_limit=2, logging_steps=5),
               bnb_4bit_quant_storage="bfloat16")
    cmd_a, out_a = stage_command(spec, work, 90)
    code, text, _ = run_stage(cmd_a, out_a, timeout)
    if code != 0:
        return {"error": f"undisturbed run: exit {code}: {text[-1500:]}"}
    cmd_b, out_b = stage_command(spec, work, 91)
    killed_at = None
    with open(out_b / "killed.txt", "w") as log:
        proc = subprocess.Popen(cmd_b, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            done = [c for c in (out_b / "ckpt").glob("*/checkpoint-10")
                    if checkpoints.problem(c) is None]
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = 10
                break
            time.sleep(0.05)
        proc.wait()
    newest = sorted(p.name for p in (out_b / "ckpt").glob("*/checkpoint-*"))
    adapter_after_kill = (out_b / "adapter").exists()
    code, text, _ = run_stage(cmd_b, out_b, timeout, "resumed.txt")
    if code != 0:
        return {"error": f"resumed run: exit {code}: {text[-1500:]}"}
    a, b = ({**json.loads((o / "train.json").read_text()),
             **json.loads((o / "measured" / "train.json").read_text())} for o in (out_a, out_b))
    wa, wb = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (out_a, out_b))
    return {
        "killed_at_checkpoint": killed_at, "checkpoints_at_kill": newest,
        "adapter_after_kill": adapter_after_kill,
        "resumed_from_step": b["resumed_from_step"],
        "global_step": [a["global_step"], b["global_step"]],
        "train_loss": [a["train_loss"], b["train_loss"]],
        "eval_loss": [a["eval_loss"], b["eval_loss"]],
        "adapter_tensors": [len(wa), len(wb)],
        "adapter_max_abs_diff": max(float((wa[k].float() - wb[k].float()).abs().max())
                                    for k in wa) if sorted(wa) == sorted(wb) else None,
        "resume_log_line": [line for line in text.splitlines() if "resuming from" in line][:1],
    }


def table(results: list[dict]) -> str:
    lines = ["| row | model | GPUs | strategy | tokens/s | step s | scaling eff. | peak alloc GiB per GPU | effective batch (accum) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    one = {}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['arch']} | {r['gpus']} | {r['strategy']} | "
                         f"FAILED: {r['error'][:200]!r} |||||| ")
            continue
        if r["gpus"] == 1:
            one[r["arch"]] = r["tokens_per_second"]
        eff = (f"{100 * r['tokens_per_second'] / (r['gpus'] * one[r['arch']]):.1f}%"
               if r["gpus"] > 1 and r["arch"] in one else "-")
        peaks = " / ".join(f"{p:.2f}" for p in r["peak_gib"])
        lines.append(f"| {r['label']} | {r['arch']} | {r['gpus']} | {r['strategy']} | "
                     f"{r['tokens_per_second']:,.0f} | {r['step_s']:.2f} | {eff} | {peaks} | "
                     f"{r['effective_batch']} ({r['accum']}) | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all",
                        choices=["all", "ddp", "fsdp", "fsdp-resume", "cpu-check"])
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/medqlora-bench-dist"),
                        help="models and rows (the random bases are built once and kept)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--timeout", type=int, default=420, help="seconds per row")
    parser.add_argument("--only", default=None, help="run the rows whose label contains this")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "fsdp-resume":
        result = resume_check(work, args.timeout)
        text = json.dumps(result, indent=1)
        print(text)
        (out / "fsdp-resume.json").write_text(text + "\n")
        return 1 if "error" in result else 0
    results = []
    for i, spec in enumerate(part(args.part)):
        if args.only and args.only not in spec["label"]:
            continue
        print(f"# {spec['label']} ({spec['arch']})", flush=True)
        try:
            results.append(run_row(spec, work, i, args.timeout))
        except subprocess.TimeoutExpired:
            results.append({**spec, "error": f"timeout after {args.timeout} s"})
        print(json.dumps(results[-1], default=str), flush=True)
        (out / f"distributed-{args.part}.json").write_text(json.dumps(results, indent=1,
                                                                      default=str))
    text = table(results)
    print(text)
    (out / f"distributed-{args.part}.md").write_text(text + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
