"""Where a run executes: its device, its data-parallel rank and world size, and its seeds.

Ranks come from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). When SLURM (`srun`) or submitit (hydra/launcher=slurm_*, submitit_local)
starts the processes instead, `export_launcher_env` sets those variables from the task's own
environment first, so the one `env://` initialisation serves every launcher.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Mapping, MutableMapping

import numpy as np
import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PORTS = (20000, 60000)  # MASTER_PORT is drawn from here by job id: every task of a job (and its requeue) agrees


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). With WORLD_SIZE > 1 (torchrun, or SLURM/submitit tasks) joins the process group:
    gloo on CPU, nccl on GPU."""
    export_launcher_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def export_launcher_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets torchrun's variables for a process that SLURM or submitit started as one of several tasks, and returns
    what it set. Nothing is set when torchrun (or the user) already set WORLD_SIZE, nor for a single task: a plain
    run stays a plain run. Safe to call twice."""
    if "WORLD_SIZE" in environ:
        return {}
    found = launcher_ranks(environ)
    if found is None or int(found["WORLD_SIZE"]) <= 1:
        return {}
    found = {name: environ.get(name, value) for name, value in found.items()}  # an explicit MASTER_ADDR/PORT wins
    environ.update(found)
    return found


def launcher_ranks(environ: Mapping[str, str]) -> dict[str, str] | None:
    """torchrun's variables as the task's launcher describes them: submitit's job environment inside a submitit job
    (its SLURM and local executors), SLURM's step variables inside a plain `srun` step; None outside both."""
    if environ.get("SUBMITIT_EXECUTOR"):
        import submitit  # a dependency (hydra-submitit-launcher); imported only inside its jobs

        job = submitit.JobEnvironment()
        nodes, world = job.num_nodes, job.num_tasks
        return _ranks(job.global_rank, world, job.local_rank, world // max(nodes, 1), job.hostnames[0], nodes, job.job_id)
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:  # set by srun for the tasks of a step only
        world, nodes = int(environ["SLURM_STEP_NUM_TASKS"]), int(environ.get("SLURM_STEP_NUM_NODES", "1"))
        hosts = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        return _ranks(int(environ["SLURM_PROCID"]), world, int(environ.get("SLURM_LOCALID", "0")), world // max(nodes, 1),
                      first_host(hosts), nodes, environ.get("SLURM_JOB_ID", "0"))
    return None


def _ranks(rank: int, world: int, local_rank: int, local_world: int, host: str, nodes: int, job_id: str) -> dict[str, str]:
    """The variables themselves. On one node the tasks meet on the loopback address, which needs no name lookup."""
    addr = host if nodes > 1 else "127.0.0.1"
    values = (rank, world, local_rank, local_world, addr, master_port(job_id))
    return {name: str(value) for name, value in zip(TORCHRUN_VARS, values)}


def master_port(job_id: str) -> int:
    """A port chosen by the job id alone, so every task computes the same one without talking to the others."""
    low, high = PORTS
    return low + int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % (high - low)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07" (zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def requeued(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether SLURM restarted this job: a requeue after a preemption, or submitit's after a time-out (both go
    through `scontrol requeue`, which counts in SLURM_RESTART_COUNT)."""
    return int(environ.get("SLURM_RESTART_COUNT") or 0) > 0


def slurm_task_cpus(environ: Mapping[str, str] = os.environ) -> int | None:
    """The CPUs SLURM gave this task (cpus_per_task), when SLURM started it; None under torchrun, whose ranks share
    one task's CPUs, and outside SLURM."""
    if "TORCHELASTIC_RUN_ID" in environ or not environ.get("SLURM_CPUS_PER_TASK"):
        return None
    return int(environ["SLURM_CPUS_PER_TASK"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses for bf16 matrix products."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_warning(device: torch.device, precision: str) -> str | None:
    """The line a run prints when `schedule.precision=bf16` would be far slower than fp32: on a CPU without bf16
    instructions autocast emulates every bf16 product (SmolLM2-135M, batch 8, on an AVX2-only AMD EPYC: 108 s a
    step against 4.6 s in fp32; bench/RESULTS.md). A warning, not a refusal: the numbers are the bf16 ones asked
    for, only slow, and a run that must match bf16 results elsewhere may accept the cost."""
    if device.type != "cpu" or precision != "bf16" or cpu_has_bf16():
        return None
    return (f"warning: schedule.precision=bf16 on a CPU without bf16 instructions ({torch.backends.cpu.get_cpu_capability()}): "
            "autocast emulates bf16 here, about 20x slower than fp32 (bench/RESULTS.md); schedule.precision=fp32 is the fast choice")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
