"""torchrun worker: 2 gloo ranks shard a Transformer with FSDP2; the Export callback writes it from rank 0."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from osp.model import ModelConfig, Transformer
from osp.training.callbacks.export import Export

# SSNorm's scalar gain is stored with shape (1,), which fully_shard accepts (it refuses 0-d parameters).
CONFIG = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, emb_proj=True,
              norm="ss",
              gated_norm_rank=4)


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIG))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    trainer = SimpleNamespace(is_global_zero=dist.get_rank() == 0, default_root_dir=str(out), datamodule=None,
                              strategy=SimpleNamespace(barrier=lambda name=None: dist.barrier()))
    callback = Export()
    callback.on_train_end(trainer, SimpleNamespace(model=model))
    assert (callback.export_dir is not None) == (dist.get_rank() == 0)
    assert (out / "export" / "config.json").exists()  # after the barrier every rank sees the folder
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
