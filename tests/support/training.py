"""The tiny `osp train` configuration of the training, reliability and GPU tests, and the subprocess env."""

from __future__ import annotations

import os
from pathlib import Path

# A 0.16M-parameter model on generated text (pass data.source.paths): a few seconds per run on one CPU thread.
TINY_MODEL_DATA = [
    "data=files", "data.vocab_size=384", "data.seq_len=64", "data.batch_size=8", "data.val_blocks=8",
    "data.source.val_fraction=0.1",
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=192",
]
# ... with quiet, fast run settings: what the training, reliability and GPU tests run.
TINY = [
    *TINY_MODEL_DATA, "optim.lr=3e-3", "optim.warmup_steps=3", "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "logger.wandb.enabled=false", "callbacks.quant_eval.num_blocks=4", "callbacks.quant_eval.batch_size=2",
    "callbacks.outliers.n_blocks=2", "callbacks.outliers.plots=false", "~callbacks.progress",
    "+trainer.enable_progress_bar=false",
    "summary=false",
]


def tiny_overrides(corpus: dict[str, str], runs_root: Path, *extra: str) -> list[str]:
    """TINY on the session's corpus (the `corpus` fixture), runs under `runs_root`, then `extra`."""
    return [*TINY, f"data.source.paths={corpus['paths']}", f"data.cache_dir={corpus['cache']}",
            f"runs_root={runs_root}", *extra]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `osp train` subprocesses: one thread each, no inherited run id."""
    env = {k: v for k, v in os.environ.items() if k != "OSP_RUN_ID"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env
