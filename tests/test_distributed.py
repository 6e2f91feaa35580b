"""Several processes: the generated accelerate launch commands, and a real 2-process run on CPU.

The slow test runs the train stage script with runner.distributed.num_processes 2 through the
same launcher a GPU host uses (medqlora/train/launch.py -> accelerate launch -> torch.distributed.run,
gloo on CPU), and compares it with one process at the same effective batch:
1 process x micro 4 x accumulation 2 == 2 processes x micro 4 x accumulation 1 (keep_effective_batch).
accelerate gives rank r the micro-batches r, r+2, ... of the same seeded order, so optimizer
step k sees micro-batches 2k and 2k+1 in both runs, and transformers averages the loss over
the tokens of all ranks: the per-step losses and the adapter must agree up to float32
summation order.

    pytest tests/test_distributed.py            # ~1 minute on 2 cores
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, run, set_key
from medqlora.train import checkpoints
from medqlora.train import launch
from medqlora.core.config import build_params, validate_document
from test_train import make_base, make_prepared

LOSS_RTOL = 1e-4     # float32 on CPU: only the summation order differs (observed ~1e-7)
WEIGHT_ATOL = 1e-5   # adapter tensors after 3 steps at lr 0.01 (|w| ~ 1e-2 .. 1e-1)


def dist(**kw):
    """A runner.distributed section (the schema's defaults + kw)."""
    base = dict(num_processes=1, num_machines=1, machine_rank=0, main_process_ip=None,
                main_process_port=29500, strategy="ddp", keep_effective_batch=True)
    return SimpleNamespace(**{**base, **kw})


def doc_with(**dotted):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in dotted.items():
        set_key(doc, key, value)
    return doc


# ---------------------------------------------------------------- launch commands (fast)

def test_single_host_ddp_command():
    cmd, env = launch.launch_command(dist(num_processes=2), "stages/train.py", ["--params", "p.yaml"],
                                     device="cuda", mixed_precision="bf16", environ={})
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--num_processes", "2",
                       "--num_machines", "1", "--machine_rank", "0", "--main_process_port",
                       "29500", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                       "--multi_gpu", "stages/train.py", "--params", "p.yaml"]
    assert cmd[0] == sys.executable and env == {}


def test_fsdp_command_carries_the_fsdp_qlora_settings():
    cmd, env = launch.launch_command(dist(num_processes=4, strategy="fsdp"), "s.py", [],
                                     device="cuda", mixed_precision="bf16", environ={})
    assert "--multi_gpu" not in cmd and "--use_fsdp" in cmd and env == {}
    flags = dict(zip(cmd[cmd.index("--use_fsdp") + 1:-1:2], cmd[cmd.index("--use_fsdp") + 2:-1:2]))
    assert flags == {"--fsdp_version": "1", "--fsdp_sharding_strategy": "FULL_SHARD",
                     "--fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                     "--fsdp_backward_prefetch": "BACKWARD_PRE",
                     "--fsdp_state_dict_type": "SHARDED_STATE_DICT",
                     "--fsdp_use_orig_params": "false",
                     "--fsdp_cpu_ram_efficient_loading": "true",
                     "--fsdp_sync_module_states": "true", "--fsdp_offload_params": "false",
                     "--fsdp_forward_prefetch": "false"}
    assert cmd[-1] == "s.py"


def test_multi_host_command_second_machine():
    d = dist(num_processes=16, num_machines=2, machine_rank=0, main_process_ip="10.0.0.1",
             main_process_port=29555)
    cmd, _ = launch.launch_command(d, "stages/train.py", [], device="cuda",
                                   mixed_precision="bf16", environ={"MEDQLORA_MACHINE_RANK": "1"})
    args = cmd[3:]
    pairs = dict(zip(args[:-2:2], args[1:-2:2]))
    assert pairs == {"--num_processes": "16", "--num_machines": "2", "--machine_rank": "1",
                     "--main_process_port": "29555", "--mixed_precision": "bf16",
                     "--dynamo_backend": "no", "--main_process_ip": "10.0.0.1"}
    assert args[-2:] == ["--multi_gpu", "stages/train.py"]
    # Without the environment override the params value is used.
    cmd, _ = launch.launch_command(dist(**{**vars(d), "machine_rank": 1}), "t.py", [],
                                   device="cuda", mixed_precision="no", environ={})
    assert cmd[cmd.index("--machine_rank") + 1] == "1"
    with pytest.raises(ValueError, match="MEDQLORA_MACHINE_RANK='2'.*0..1"):
        launch.machine_rank(d, {"MEDQLORA_MACHINE_RANK": "2"})


def test_cpu_command_uses_torchrun_path_with_gloo():
    cmd, env = launch.launch_command(dist(num_processes=2), "t.py", [], device="cpu",
                                     mixed_precision="no", environ={})
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert env == {"ACCELERATE_USE_CPU": "true"}


def test_relaunch_only_outside_a_launched_process():
    assert launch.needed(dist(num_processes=2), {}) is True
    assert launch.needed(dist(num_processes=2), {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is False
    assert launch.needed(dist(num_processes=1), {}) is False


def test_keep_effective_batch_divides_accumulation():
    params = build_params(doc_with(**{"train.gradient_accumulation_steps": 4,
                                      "runner.distributed.num_processes": 2}))
    assert launch.accumulation(params, 2) == 2 and launch.accumulation(params, 1) == 4
    params = build_params(doc_with(**{"train.gradient_accumulation_steps": 3}))
    with pytest.raises(ValueError, match="train.gradient_accumulation_steps: 3.*num_processes"):
        launch.accumulation(params, 2)
    keep = build_params(doc_with(**{"train.gradient_accumulation_steps": 3,
                                    "runner.distributed.keep_effective_batch": False}))
    assert launch.accumulation(keep, 2) == 3


def test_validation_names_the_distributed_keys():
    problems = validate_document(doc_with(**{
        "train.gradient_accumulation_steps": 3, "runner.distributed.num_processes": 4,
        "runner.distributed.num_machines": 3, "runner.distributed.main_process_ip": "10.0.0.1",
        "runner.distributed.strategy": "fsdp", "runner.backend": "docker"}), ROOT)
    assert problems == [
        "runner.distributed.num_processes: 4 must be a multiple of num_machines (3): the same "
        "GPU count on every host",
        "train.gradient_accumulation_steps: 3 is not divisible by "
        "runner.distributed.num_processes (4) while runner.distributed.keep_effective_batch is "
        "true; make it a multiple of 4 or set keep_effective_batch: false",
        "quantization.bnb_4bit_quant_storage: uint8 must equal "
        "quantization.bnb_4bit_compute_dtype (bfloat16) with runner.distributed.strategy fsdp "
        "(FSDP shards only float tensors of one dtype); set bnb_4bit_quant_storage: bfloat16",
        "runner.network: none cannot reach the other hosts; set runner.network: host with "
        "runner.distributed.num_machines > 1"]
    ok = doc_with(**{"runner.distributed.num_processes": 2, "runner.distributed.strategy": "fsdp",
                     "quantization.bnb_4bit_quant_storage": "bfloat16"})
    assert validate_document(ok, ROOT) == []


def test_total_steps_with_several_processes():
    # 26 rows / 4 = 7 micro-batches; 2 processes take 4 each (the last one padded); / 1 = 4.
    from medqlora.train.planning import total_optimizer_steps
    assert total_optimizer_steps(26, 4, 1, 1, -1, processes=2) == 4
    assert total_optimizer_steps(26, 4, 2, 1, -1) == 4
    assert total_optimizer_steps(1000, 8, 1, 3, -1, processes=2) == 189  # 125 -> 63 x 3


# ---------------------------------------------------------------- checkpoint layouts (fast)

def _common(ckpt: Path, rng_names: list[str]) -> None:
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    torch.save({"last_epoch": 3}, ckpt / "scheduler.pt")
    for name in rng_names:
        torch.save({"cpu": torch.get_rng_state()}, ckpt / name)


def test_ddp_checkpoint_with_per_rank_rng_states_is_complete(tmp_path):
    from safetensors.torch import save_file
    ckpt = tmp_path / "checkpoint-3"
    _common(ckpt, ["rng_state_0.pth", "rng_state_1.pth"])
    save_file({"a": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    assert checkpoints.problem(ckpt) is None
    (ckpt / "rng_state_1.pth").write_bytes(b"truncated")
    why = checkpoints.problem(ckpt)  # one rank's RNG state unreadable: not resumable
    assert why is not None and why.startswith("RuntimeError: mmap"), why


def test_fsdp_sharded_checkpoint_is_complete_and_partial_one_is_not(tmp_path):
    import torch.distributed.checkpoint as dcp
    ckpt = tmp_path / "checkpoint-3"
    _common(ckpt, ["rng_state_0.pth", "rng_state_1.pth"])
    # Real torch.distributed.checkpoint folders, as accelerate's save_fsdp_model/optimizer write.
    dcp.save({"model": {"lora_A": torch.ones(4, 2)}},
             storage_writer=dcp.FileSystemWriter(str(ckpt / "pytorch_model_fsdp_0")))
    dcp.save({"optimizer": {"exp_avg": torch.zeros(4, 2)}},
             storage_writer=dcp.FileSystemWriter(str(ckpt / "optimizer_0")))
    # Killed after the Trainer's save, before medqlora wrote the whole LoRA tensors (adapter_io).
    assert checkpoints.problem(ckpt) == "missing adapter_model.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.ones(4, 2)},
              str(ckpt / "adapter_model.safetensors"))
    assert checkpoints.problem(ckpt) is None
    # What the Trainer's adapter-only FSDP save writes on GPUs: empty model shards (2 H100s).
    for shard in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp"):
        shard.write_bytes(b"")
    assert checkpoints.problem(ckpt) is None
    (ckpt / "optimizer_0" / ".metadata").unlink()      # killed before the save finished
    assert checkpoints.problem(ckpt) == "missing optimizer_0"
    run_dir = tmp_path
    assert checkpoints.latest_complete(run_dir) is None
    assert [p.name.split("-17")[0] for p in (run_dir / "skipped").iterdir()] == ["checkpoint-3"]


def test_only_rank_zero_moves_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    assert checkpoints.latest_complete(tmp_path, is_main=False) is None
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "skipped").exists()


# ---------------------------------------------------------------- two processes on CPU (slow)

# Plain LoRA in float32 (compute dtype float32 -> no mixed precision), no dropout (its masks
# are per-process random streams), 3 steps of 8 sequences.
SAME = {"quantization.load_in_4bit": False, "quantization.bnb_4bit_compute_dtype": "float32",
        "lora.lora_dropout": 0.0, "train.max_steps": 3, "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 2, "train.learning_rate": 0.01,
        "train.warmup_ratio": 0.0, "train.logging_steps": 1, "train.eval_steps": 3,
        "train.save_steps": 3, "train.early_stopping_patience": 0,
        "train.gradient_checkpointing": False}


def _paths(out: Path) -> dict[str, Path]:
    return {"adapter": out / "models" / "adapter", "ckpt": out / "ckpt", "live": out / "live",
            "metrics": out / "train.json"}


def _step_losses(ckpt_root: Path) -> list[float]:
    (run_dir,) = [p for p in ckpt_root.iterdir() if p.is_dir()]
    state = json.loads((checkpoints.checkpoints(run_dir)[0] / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny base, prepared data) shared by the 2-process tests."""
    base = make_base(tmp_path_factory.mktemp("base"))
    return base, make_prepared(tmp_path_factory.mktemp("prepared"), base)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, inputs):
    """The same training, 1 process (in this process) and 2 processes (through the launcher)."""
    from medqlora.train import training
    base, data = inputs
    doc = doc_with(**{"model.base": str(base), **SAME})
    one = _paths(tmp_path_factory.mktemp("one"))
    training.run(build_params(doc), data, one["adapter"], one["ckpt"], one["live"],
                 one["metrics"])
    set_key(doc, "runner.distributed.num_processes", 2)
    set_key(doc, "runner.distributed.main_process_port", 29617)
    out = tmp_path_factory.mktemp("two")
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    two = _paths(out)
    proc = run([sys.executable, "stages/train.py", "--params", str(params_file), "--data",
                str(data), "--out", str(two["adapter"]), "--checkpoints", str(two["ckpt"]),
                "--live", str(two["live"]), "--metrics", str(two["metrics"])], cwd=ROOT,
               env={"OMP_NUM_THREADS": "1", "MEDQLORA_LOG_LEVEL": "INFO"}, timeout=300)
    return one, two, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_effective_batch(two_runs):
    one, two, log = two_runs
    single, double = _step_losses(one["ckpt"]), _step_losses(two["ckpt"])
    assert len(single) == len(double) == 3
    for a, b in zip(single, double):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (single, double)
    assert single[-1] < single[0]  # it trained
    w1, w2 = (load_file(str(p["adapter"] / "adapter_model.safetensors")) for p in (one, two))
    assert sorted(w1) == sorted(w2) and len(w1) == 28  # 2 layers x 7 projections x (A, B)
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=WEIGHT_ATOL), key
    m1, m2 = (json.loads(p["metrics"].read_text()) for p in (one, two))
    assert (m1["effective_batch"], m1["num_processes"], m1["gradient_accumulation_steps"]) == (
        8, 1, 2)
    assert (m2["effective_batch"], m2["num_processes"], m2["gradient_accumulation_steps"]) == (
        8, 2, 1)
    assert m2["tokens_seen"] == m1["tokens_seen"]  # counted over both ranks
    measured = json.loads((two["metrics"].parent / "measured/train.json").read_text())
    assert len(measured["peak_memory_gib_per_process"]) == 2  # one peak per rank
    assert abs(m2["eval_loss"] - m1["eval_loss"]) <= LOSS_RTOL * m1["eval_loss"]


@pytest.mark.slow
def test_rank_zero_alone_writes_the_outputs(two_runs):
    _, two, log = two_runs
    assert sorted(p.name for p in two["adapter"].parent.iterdir()) == ["adapter"]  # no temp dirs
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json"} <= {
        p.name for p in two["adapter"].iterdir()}
    meta = json.loads((two["adapter"] / "meta.json").read_text())
    assert meta["effective"]["num_processes"] == 2
    assert (meta["run"]["world_size"], meta["run"]["strategy"]) == (2, "ddp")
    assert meta["effective"]["effective_batch"] == 8
    # The closing log line comes after the writes, from rank 0 only; the launch line once.
    assert log.count("train: step 3, eval loss") == 1, log[-3000:]
    assert log.count("launching 2 process(es)") == 1
    (run_dir,) = [p for p in two["ckpt"].iterdir() if p.is_dir()]
    ckpt = checkpoints.checkpoints(run_dir)[0]
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth",
                                                               "rng_state_1.pth"]
    assert checkpoints.problem(ckpt) is None  # a DDP checkpoint counts as complete


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_killing_the_stage_kills_its_launched_workers(inputs, tmp_path):
    # torchrun starts each worker in a session of its own: before launch.exit_with_parent a
    # SIGKILLed stage (dvc repro killed, a preempted job) left both workers training on and
    # writing checkpoints. Only the stage's own pid is killed here, so the whole chain is
    # tested: stage -> accelerate launcher -> workers.
    base, data = inputs
    doc = doc_with(**{"model.base": str(base), **SAME, "train.max_steps": 500,
                      "train.save_steps": 1000, "train.eval_steps": 1000,
                      "runner.distributed.num_processes": 2,
                      "runner.distributed.main_process_port": 29619})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    log_path = tmp_path / "log.txt"
    cmd = [sys.executable, "stages/train.py", "--params", str(params_file), "--data", str(data),
           "--out", str(tmp_path / "adapter"), "--checkpoints", str(tmp_path / "ckpt"),
           "--live", "none", "--metrics", str(tmp_path / "train.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDQLORA_LOG_LEVEL": "INFO",
           "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        stage = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            # Both workers are training once each has logged its data (after join_launch).
            while log_path.read_text(errors="replace").count("train rows:") < 2:
                assert stage.poll() is None and time.monotonic() < deadline, (
                    log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.1)
            workers = [p for p in psutil.Process(stage.pid).children(recursive=True)
                       if "stages/train.py" in " ".join(p.cmdline())
                       and "accelerate" not in " ".join(p.cmdline())]
            assert len(workers) == 2, [p.cmdline() for p in workers]
            stage.send_signal(signal.SIGKILL)
            stage.wait(10)
            _, alive = psutil.wait_procs(workers, timeout=20)
            alive = [p for p in alive if _running(p)]  # an unreaped zombie has stopped
            assert not alive, f"workers outlived the killed stage: {[p.pid for p in alive]}"
        finally:
            for p in psutil.Process().children(recursive=True):
                p.kill()
    assert not (tmp_path / "adapter").exists()


def test_one_process_is_kept_on_one_gpu():
    # The Trainer would otherwise use nn.DataParallel over every visible GPU (bench: 2 H100s).
    env = {}
    assert launch.one_gpu_unless_launched(env) == "0" and env == {"CUDA_VISIBLE_DEVICES": "0"}
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert launch.one_gpu_unless_launched(env) == "2" and env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU on purpose: stays none
    assert launch.one_gpu_unless_launched(env) == "" and env["CUDA_VISIBLE_DEVICES"] == ""
    env = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert launch.one_gpu_unless_launched(env) is None  # launched: accelerate assigns the GPU
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def _peft_model(base: Path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from medqlora.core import modeling
    params = build_params(doc_with(**{"model.base": str(base), **SAME}))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           modeling.lora_config(params.lora))
    for name, param in model.named_parameters():  # lora_B starts at zero: make it visible
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return model


@pytest.mark.slow
def test_fsdp_adapter_writer_matches_peft_and_loads_back(inputs, tmp_path):
    # Under FSDP the gathered LoRA tensors are written by adapter_io.write_adapter (peft's own
    # key filter drops them all there): its files must be what peft writes, and load back.
    from medqlora.train import adapter_io
    base, _ = inputs
    model = _peft_model(base)
    model.save_pretrained(str(tmp_path / "peft"))
    gathered = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    adapter_io.write_adapter(model, tmp_path / "ours", gathered)
    peft_w, ours_w = (load_file(str(tmp_path / d / "adapter_model.safetensors"))
                      for d in ("peft", "ours"))
    assert sorted(peft_w) == sorted(ours_w) and len(ours_w) == 28
    assert all(torch.equal(peft_w[k], ours_w[k]) for k in peft_w)
    peft_c, ours_c = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                      for d in ("peft", "ours"))
    # peft writes target_modules in set (string-hash) order, which PYTHONHASHSEED changes per
    # process (PYTHONHASHSEED=5 gave a different order after copy.deepcopy); ours is sorted.
    assert ours_c["target_modules"] == sorted(peft_c["target_modules"])
    assert ours_c == {**peft_c, "target_modules": ours_c["target_modules"]}
    fresh = _peft_model(base)
    for param in fresh.parameters():
        torch.nn.init.zeros_(param) if param.requires_grad else None
    assert adapter_io.load_lora(fresh, tmp_path / "ours") == 28
    loaded = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert all(torch.equal(loaded[k], gathered[k]) for k in gathered)


@pytest.mark.slow
def test_an_adapter_without_lora_tensors_is_an_error_not_a_file(inputs, tmp_path):
    # What the FULL_STATE_DICT gather gave on 2 H100s: a file with no tensor in it.
    from medqlora.train import adapter_io
    base, _ = inputs
    model = _peft_model(base)
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    adapter_io.save(trainer, tmp_path / "good", None)
    assert len(load_file(str(tmp_path / "good" / "adapter_model.safetensors"))) == 28
    with pytest.raises(RuntimeError, match="incomplete: 0 LoRA tensors"):
        adapter_io.save(trainer, tmp_path / "empty", {})
    sharded = {k: v.flatten()[:3] for k, v in model.state_dict().items() if "lora_" in k}
    with pytest.raises(RuntimeError, match="28 LoRA tensors, 28 not 2-D"):
        adapter_io.save(trainer, tmp_path / "sharded", sharded)
