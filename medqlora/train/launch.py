"""Several processes (GPUs, hosts) through `accelerate launch`: the command, and life inside it.

    runner:
      distributed: {num_processes: 2, strategy: ddp}     # params.yaml
    python stages/train.py --params params.yaml ...      # re-runs itself under accelerate launch

With `runner.distributed.num_processes > 1` the train stage re-executes its own command line
through `python -m accelerate.commands.launch` (torch.distributed.run underneath), once per
host; each launched process sees LOCAL_RANK / WORLD_SIZE and trains. With runner.backend
docker the stage first re-enters the container (medqlora.core.stage.start), so the launch happens
*inside* it. Nothing is home-made: accelerate builds the process group, the Hugging Face
Trainer shards the data and wraps the model (DDP, or FSDP from accelerate's FSDP_* variables).

- ddp: `--multi_gpu`; every GPU holds the whole 4-bit base, gradients are all-reduced.
- fsdp: `--use_fsdp` with the settings FSDP-QLoRA needs (peft's fsdp_config_qlora.yaml):
  FULL_SHARD, transformer-layer wrapping, SHARDED_STATE_DICT checkpoints, use_orig_params
  false, cpu_ram_efficient_loading + sync_module_states. The 4-bit weights shard only when
  quantization.bnb_4bit_quant_storage equals the compute dtype (checked in medqlora.core.config).
- CPU (tests, no GPU): `accelerate launch --cpu` starts ONE process (its multi-CPU path needs
  mpirun), so on CPU we take the same torch.distributed.run path (`--multi_gpu`) with
  ACCELERATE_USE_CPU=true; TrainingArguments(use_cpu=True) then makes a gloo process group.
- several hosts: the same command on every host, `--machine_rank` differing; the rank may come
  from MEDQLORA_MACHINE_RANK so params.yaml stays identical everywhere (docs/distributed.md).
- a killed stage takes its processes with it: torchrun starts each worker in a session of its
  own, so a SIGKILL of the stage's process group (dvc repro killed, a preempted job) would
  leave the workers training and writing. The launcher and every worker therefore ask Linux
  for SIGKILL when their parent dies (PR_SET_PDEATHSIG; `exit_with_parent`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)
MACHINE_RANK_ENV = "MEDQLORA_MACHINE_RANK"
# What FSDP-QLoRA needs from accelerate (peft examples/sft/configs/fsdp_config_qlora.yaml).
FSDP_FLAGS = {
    "--fsdp_version": "1",
    "--fsdp_sharding_strategy": "FULL_SHARD",
    "--fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # decoder layers; the Trainer adds
    "--fsdp_backward_prefetch": "BACKWARD_PRE",           # peft's LoRA wrapping on top
    "--fsdp_state_dict_type": "SHARDED_STATE_DICT",       # each rank writes its own shard
    "--fsdp_use_orig_params": "false",
    "--fsdp_cpu_ram_efficient_loading": "true",
    "--fsdp_sync_module_states": "true",                  # required by the line above
    "--fsdp_offload_params": "false",
    "--fsdp_forward_prefetch": "false",
}


# ---------------------------------------------------------------- launching

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent: int | None = None) -> bool:
    """Have Linux SIGKILL this process when its parent dies; False where that is unavailable.

    `parent`: the pid the parent had; if it is already gone (re-parented before the request
    took effect), exit now rather than train on as an orphan.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return True


def _launcher_exits_with_stage(stage_pid: int):
    """preexec_fn for the launcher: SIGKILL when the stage process that started it dies."""
    return lambda: exit_with_parent(stage_pid)


def one_gpu_unless_launched(environ: dict[str, str] | None = None) -> str | None:
    """Outside a launch, train on one GPU: set CUDA_VISIBLE_DEVICES to the first visible one.

    Call before CUDA is initialised. Without it the Trainer wraps the model in
    torch.nn.DataParallel over every visible GPU: on 2 H100s a num_processes 1 run trained
    micro-batches of 2 x 4 rows at half the per-GPU speed and reported twice the loss. Several
    GPUs are used through runner.distributed.num_processes (DDP / FSDP) instead. Returns the
    value set, or None when launched.
    """
    environ = os.environ if environ is None else environ
    if inside_launch(environ):
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    if visible is None or "," in visible:
        log.info("runner.distributed.num_processes is 1: training on one GPU "
                 "(CUDA_VISIBLE_DEVICES=%s); raise num_processes to train on more", first)
    environ["CUDA_VISIBLE_DEVICES"] = first
    return first


def inside_launch(environ: dict[str, str] | None = None) -> bool:
    """True in a process started by accelerate / torchrun (they set LOCAL_RANK, WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ or "WORLD_SIZE" in environ


def needed(dist, environ: dict[str, str] | None = None) -> bool:
    """Whether this (not yet launched) process must re-execute itself through the launcher."""
    return dist.num_processes > 1 and not inside_launch(environ)


def machine_rank(dist, environ: dict[str, str] | None = None) -> int:
    """runner.distributed.machine_rank, or MEDQLORA_MACHINE_RANK when set (per host)."""
    environ = os.environ if environ is None else environ
    value = environ.get(MACHINE_RANK_ENV)
    if value is None:
        return dist.machine_rank
    if not value.isdigit() or int(value) >= dist.num_machines:
        raise ValueError(f"{MACHINE_RANK_ENV}={value!r}: expected 0..{dist.num_machines - 1} "
                         "(runner.distributed.num_machines)")
    return int(value)


def launch_command(dist, script: str, script_args: list[str], *, device: str,
                   mixed_precision: str, environ: dict[str, str] | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that runs `python script script_args` in every process.

    `dist` is runner.distributed; `device` "cuda" or "cpu"; `mixed_precision` no|bf16|fp16
    (what the Trainer will use, so accelerate's own setting agrees with it).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(dist.num_processes),
           "--num_machines", str(dist.num_machines),
           "--machine_rank", str(machine_rank(dist, environ)),
           "--main_process_port", str(dist.main_process_port),
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if dist.num_machines > 1:
        cmd += ["--main_process_ip", str(dist.main_process_ip)]
    env: dict[str, str] = {}
    if device == "cpu":
        # See the module docstring: --cpu would start a single process.
        cmd += ["--multi_gpu"]
        env["ACCELERATE_USE_CPU"] = "true"
    elif dist.strategy == "fsdp":
        cmd += ["--use_fsdp"]
        for flag, value in FSDP_FLAGS.items():
            cmd += [flag, value]
    else:
        cmd += ["--multi_gpu"]
    return cmd + [script, *script_args], env


def mixed_precision_of(precision) -> str:
    """accelerate's --mixed_precision value for a modeling.Precision."""
    return "bf16" if precision.bf16 else ("fp16" if precision.fp16 else "no")


def relaunch(params, script: str, script_args: list[str]) -> int:
    """Run this stage again under accelerate launch; returns the launcher's exit code.

    SIGINT/SIGTERM are passed on to the launcher (which passes them to every process), so
    Ctrl-C and a container stop end the training processes and their temp outputs go away.
    """
    from medqlora.core import modeling
    precision = modeling.resolve_precision(params.quantization, params.train.mixed_precision)
    dist = params.runner.distributed
    cmd, env = launch_command(dist, script, script_args, device=precision.device,
                              mixed_precision=mixed_precision_of(precision))
    log.info("launching %d process(es) on this host (%d in all, %s, host %d of %d): %s",
             dist.num_processes // dist.num_machines, dist.num_processes, dist.strategy,
             machine_rank(dist), dist.num_machines, " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, env={**os.environ, **env},
                            preexec_fn=_launcher_exits_with_stage(os.getpid()))
    old = {sig: signal.signal(sig, lambda signum, _f: proc.send_signal(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- inside a launched process

def join_launch() -> None:
    """In a launched worker: die with the launcher (see the module docstring)."""
    if inside_launch():
        parent = os.getppid()
        if parent == 1:  # the launcher is already gone
            os._exit(1)
        exit_with_parent(parent)


def world_size() -> int:
    """Processes training together (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that writes the stage's outputs."""
    return rank() == 0


def uses_fsdp(params) -> bool:
    """FSDP is on: several processes, strategy fsdp, and GPUs (a CPU launch is always DDP over
    gloo, see launch_command: accelerate's FSDP needs an accelerator)."""
    import torch
    dist = params.runner.distributed
    return dist.strategy == "fsdp" and dist.num_processes > 1 and torch.cuda.is_available()


def accumulation(params, processes: int) -> int:
    """gradient_accumulation_steps per process.

    With keep_effective_batch the configured value is divided by the process count, so
    micro x accumulation x processes stays what params.yaml says: 4 x 4 x 1 = 4 x 2 x 2 = 16.
    """
    accum = params.train.gradient_accumulation_steps
    if not params.runner.distributed.keep_effective_batch or processes == 1:
        return accum
    if accum % processes:
        raise ValueError(
            f"train.gradient_accumulation_steps: {accum} is not divisible by the {processes} "
            "processes (runner.distributed.num_processes) while "
            "runner.distributed.keep_effective_batch is true; make it a multiple of "
            f"{processes} or set keep_effective_batch: false")
    return accum // processes


def gather(value: Any) -> list[Any]:
    """`value` from every process, in rank order ([value] when not distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def leave() -> None:
    """End a launched worker's part: wait for every rank (rank 0 is still writing), then shut
    the process group down. A worker that exits with the group alive can abort in gloo's
    thread teardown ("terminate called without an active exception", SIGABRT), which the
    launcher reports as a failed run although training finished."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
