"""What a run records about itself, found from any of its artifacts (the run dir, a checkpoint in it, its
export): its config, the precision it trained at, its tokenizer and its data pipeline. `osp eval`,
`osp export --smooth` and the benches evaluate a model on exactly the held-out blocks its run trained
against through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from osp.errors import ConfigError, DataError, OutputExistsError, PathNotFoundError, one_line
from osp.precision import resolve_precision


def find_run_config(model_path: Path) -> Path | None:
    """The .hydra/config.yaml of the run that produced MODEL (a run dir, its checkpoint or its export)."""
    path = model_path.resolve()
    for candidate in (path, *path.parents[:3]):
        config = candidate / ".hydra" / "config.yaml"
        if config.is_file():
            return config
    return None


def read_config(path: Path) -> dict:
    """A YAML config file (a run's .hydra/config.yaml, or --data-config) as a plain mapping, unresolved."""
    if not path.is_file():
        raise PathNotFoundError(f"{path}: no such config file (give a YAML with a `data` node, e.g. "
                                "RUN_DIR/.hydra/config.yaml)")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{path}: not a readable YAML config ({one_line(str(err))})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of settings, not {type(values).__name__}")
    return values


def run_precision(model_path: Path, data_config: str | None, device: str) -> str:
    """The trainer precision of the run that produced MODEL ("32-true" when unknown).

    A run's summary records the precision it ran; a run still going (no summary yet) says what its config
    says, with `auto` resolved for `device` as training resolves it.
    """
    config_file = Path(data_config) if data_config else find_run_config(model_path)
    if config_file is None:
        return "32-true"
    summary = config_file.parent.parent / "summary.json"
    if summary.is_file():
        recorded = json.loads(summary.read_text()).get("precision")
        if recorded:
            return str(recorded)
    trainer = read_config(config_file).get("trainer") or {}
    precision = trainer.get("precision", "32-true") if isinstance(trainer, dict) else "32-true"
    return resolve_precision(precision, "gpu" if torch.device(device).type == "cuda" else "cpu")


def build_pipeline(model_path: Path, data_config: str | None, tokenizer_dir: Path | None, seq_len: int | None,
                   tokenizer: str | None = None):
    """The data pipeline (no Lightning) of the run's own data config when it can be found (same held-out
    blocks as in training), else of the demo corpus tokenized with the model's tokenizer; `tokenizer` (a
    folder or name the user gave) replaces whichever tokenizer that config names."""
    from osp.data import DataConfig, TokenPipeline

    config_file = Path(data_config) if data_config else find_run_config(model_path)
    if config_file is not None:
        data = read_config(config_file)
        data = data.get("data", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: its `data` node is not a mapping of settings")
        data = {k: v for k, v in data.items() if not (isinstance(v, str) and "${" in v)}
    else:
        if tokenizer_dir is None:
            raise DataError(f"{model_path} has no tokenizer and no run config; pass --tokenizer "
                            "or --data-config RUN_DIR/.hydra/config.yaml")
        data = {"tokenizer": str(tokenizer_dir)}  # the demo corpus, every other data setting at its default
    if tokenizer is not None:
        data["tokenizer"] = str(tokenizer)
    if seq_len is not None:
        data["seq_len"] = seq_len
    return TokenPipeline(DataConfig.from_dict(data))


def find_tokenizer_dir(model_path: Path) -> Path | None:
    """The tokenizer folder of MODEL: an export's own, a run dir's tokenizer/, or the one beside a
    checkpoint's checkpoints/ folder; None when there is none."""
    for candidate in (model_path, model_path / "tokenizer", model_path.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    return None


# What marks a folder as a run's: files osp train writes there (osp.training.rundir keeps the full list).
RUN_MARKERS = (".hydra/config.yaml", "summary.json", "csv/metrics.csv", "checkpoints/last.ckpt")


def run_of(path: Path) -> Path | None:
    """The run dir that `path` lies in (or is), else None."""
    for folder in (path, *path.parents):
        if folder.is_dir() and any((folder / marker).exists() for marker in RUN_MARKERS):
            return folder
    return None


def check_output_file(path: str | Path, option: str) -> Path:
    """Where a command may write a file it was asked for (`osp eval --json`, a bench's --json): not a folder,
    and never into a run dir, whose files belong to its run. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{option} {path} is a folder; give a file name")
    run = run_of(path.resolve().parent)
    if run is not None:
        raise OutputExistsError(f"{option} {path} is inside the run dir {run}, whose files belong to its "
                                "run; write it elsewhere")
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """Where a command may write a folder of results (`osp report --out`): not a file, not a run dir nor
    inside one. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{option} {path} is a file; give a folder (it is created if needed)")
    run = run_of(path.resolve())
    if run is not None:
        raise OutputExistsError(f"{option} {path} is (inside) the run dir {run}, whose files belong to "
                                "its run; write the report elsewhere")
    return path
