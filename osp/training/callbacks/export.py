"""Export: at the end of training, write the model as a Hugging Face folder (osp.export.export_hf)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from osp.export import export_hf
from osp.model import Transformer


class Export(L.Callback):
    """Writes `out_dir` (default `<default_root_dir>/export`) from the trained model when fit ends.

    The tokenizer is `trainer.datamodule.tokenizer` when there is one. Rank 0 writes; under FSDP2 every
    rank first takes part in gathering the full state dict. The folder belongs to the run, so by default
    (`force`) a resumed run replaces the export of its earlier segment, atomically. A model with
    non-finite weights is not exported (it would replace a good folder with a useless one), and a
    failed write (disk, permissions) is reported without failing the finished run.
    """

    def __init__(self, out_dir: str | None = None, dtype: str | None = None,
                 max_shard_size: int | str = "5GB", force: bool = True) -> None:
        self.out_dir = out_dir
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.force = force
        self.export_dir: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = full_model(pl_module.model)  # collective under FSDP2: every rank calls it
        try:
            if trainer.is_global_zero and model is not None:
                out_dir = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "export"
                self.export_dir = self._write(model, out_dir, getattr(trainer.datamodule, "tokenizer", None))
        finally:
            trainer.strategy.barrier("osp-export")  # other ranks may read the folder once this returns

    def _write(self, model: Transformer, out_dir: Path, tokenizer: object) -> Path | None:
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            rank_zero_warn(f"osp export: skipped, non-finite weights in {', '.join(bad[:5])}")
            return None
        try:
            path = export_hf(model, out_dir, tokenizer=tokenizer, force=self.force,
                             max_shard_size=self.max_shard_size, dtype=self.dtype)
        except OSError as err:
            rank_zero_warn(f"osp export: writing {out_dir} failed ({err}); the checkpoint is intact, "
                           f"rerun `osp export <run_dir> {out_dir}`")
            return None
        rank_zero_info(f"osp export: wrote {path}")
        return path

    def final_metrics(self) -> dict[str, str]:
        return {"export_dir": str(self.export_dir.resolve())} if self.export_dir is not None else {}


def full_model(model: Transformer) -> Transformer | None:
    """`model` itself, or under FSDP2 (DTensor parameters) a CPU copy with the gathered full weights.

    The gather is a collective that every rank must enter; with `cpu_offload` only rank 0 receives the
    weights, so the other ranks get None.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return None
    with torch.device("meta"):  # no init work: every tensor is replaced by a gathered one
        full = Transformer(model.cfg)
    missing, unexpected = full.load_state_dict(state, assign=True, strict=False)
    # The gathered dict may list a tied head once only (under the embedding's name).
    missing = [name for name in missing if not (model.cfg.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"osp export: gathered state dict does not match the model "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if model.cfg.tie_embeddings:
        full.lm_head.weight = full.embed_tokens.weight  # assign=True replaced the shared Parameter
    return full
