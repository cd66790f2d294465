"""Worker for test_distributed.py: trains a tiny Transformer for a few steps on 2 gloo ranks.

Run by torchrun (`python -m torch.distributed.run --standalone --nproc_per_node=2 dist_worker.py OUT`).
For each (mode, optimizer) it writes the full parameters after training to OUT/<mode>_<name>.pt (rank 0)
and how many matrices each rank orthogonalized to OUT/<mode>_<name>_rank<r>.pt. The pytest side computes
the same run on one process with `train()` from this file and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from osp.model import ModelConfig, Transformer
from osp.optim import OptimConfig

STEPS = 3
BATCH = 8
CASES = [("ddp", "muon"), ("ddp", "root"), ("fsdp", "muon"), ("fsdp", "root")]


def make_model() -> Transformer:
    """A model whose matrices come in several shapes (attention, FFN, EmbProj) plus gains, embedding, head."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16,
                      emb_proj=True)
    return Transformer(cfg)


def optim_cfg(name: str) -> dict:
    # fp32 Newton-Schulz: bf16 rounding would turn the tiny all-reduce differences into visible ones.
    return {"name": name, "lr": 0.01, "weight_decay": 0.1, "ns_dtype": "fp32"}


def make_optimizer(model: torch.nn.Module, name: str) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    """The configured optimizer plus a matrix that never gets a gradient (it must stay as it is)."""
    opt = OptimConfig.from_dict(optim_cfg(name)).build(model)
    torch.manual_seed(2)
    unused = torch.nn.Parameter(torch.randn(8, 32))
    opt.add_param_group({"params": [unused], "name": "unused", "algorithm": name})
    return opt, unused


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int = 0, world: int = 1) -> None:
    """STEPS steps on fixed batches; rank r sees rows r::world, the mean over ranks is the full-batch mean."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        tokens = torch.randint(0, 64, (BATCH, 17), generator=gen)[rank::world]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode, name in CASES:
        model = make_model()
        if mode == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
            wrapped = model
        opt, unused = make_optimizer(model, name)
        counted = {"matrices": 0}
        direction = opt._direction

        def counting(X, group, vector, direction=direction, counted=counted):
            counted["matrices"] += X.shape[0]
            return direction(X, group, vector)

        opt._direction = counting
        train(wrapped, opt, rank, world)
        params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                  for k, v in model.named_parameters()}
        params["unused"] = unused.detach().clone()
        torch.save(counted, out / f"{mode}_{name}_rank{rank}.pt")
        if rank == 0:
            torch.save(params, out / f"{mode}_{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
