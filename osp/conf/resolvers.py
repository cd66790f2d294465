"""The resolvers osp's YAML uses (`${osp_run_id:}`, `${osp_devices:}`, `${osp_num_nodes:}`) and the launch
environment they read: which rank this process is, and the one run id that every rank of a job agrees on."""

from __future__ import annotations

import os
import time
from datetime import timedelta

from omegaconf import OmegaConf

_RUN_ID = time.strftime("%Y%m%d-%H%M%S")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK; srun: SLURM_PROCID; Lightning's
    own launcher: LOCAL_RANK), readable before any process group exists."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def run_id() -> str:
    """An id that every rank of one job agrees on.

    In order: the SLURM job (+ array task), the torchrun rendezvous id, OSP_RUN_ID (set by the parent osp
    process for the processes Lightning starts, or by a launcher), a timestamp. Under torchrun without
    --rdzv-id (whose run id is the literal "none") rank 0's timestamp reaches the other ranks through
    torchrun's own store.
    """
    if os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{os.environ['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return os.environ["TORCHELASTIC_RUN_ID"][:12]
    if os.environ.get("OSP_RUN_ID"):
        return os.environ["OSP_RUN_ID"]
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return rank0_value("osp/run_id", _RUN_ID)
    return _RUN_ID


def rank0_value(key: str, value: str) -> str:
    """Rank 0's `value` on every rank, through the key-value store of torchrun's agent (MASTER_ADDR/PORT).

    That store exists before Hydra composes the config, long before Lightning sets up the process group.
    The first value set wins, so workers that torchrun restarts rejoin the same run.
    """
    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=5))
    if launch_rank() == 0:
        store.compare_set(key, "", value)
    return store.get(key).decode()


def local_devices() -> int | str:
    """Devices per node for trainer=ddp|fsdp: the processes torchrun started on this node, else 'auto'."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else "auto"


def num_nodes() -> int:
    """Nodes of a torchrun job (WORLD_SIZE / LOCAL_WORLD_SIZE), else 1."""
    world, per_node = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    return max(1, int(world) // int(per_node)) if world and per_node else 1


def register_resolvers() -> None:
    resolvers = {"osp_run_id": run_id, "osp_devices": local_devices, "osp_num_nodes": num_nodes}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
