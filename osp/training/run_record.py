"""What a checkpoint remembers about the run that wrote it, and the check that a resume continues that run.

Every checkpoint stores the run's resolved config and the fingerprints of its data source and tokenizer
(`checkpoint["osp"]["run"]`). Resuming compares them with the run about to start: any difference (another
optimizer, a changed rope_theta, appended training text, ...) stops the run with one message listing
them all, unless the user names it in `resume_allow` (a key or a prefix: `optim.lr`, `trainer.max_steps`,
`optim`, or `data` for changed data).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from osp.data.config import DataConfig
from osp.errors import ConfigError
from osp.model.config import config_defaults

# Keys that say where and how verbosely a run goes, not what it computes: free to change on resume.
FREE = ("run_name", "run_dir", "runs_root", "resume", "resume_allow", "summary", "callbacks", "logger",
        "trainer.enable_progress_bar", "trainer.log_every_n_steps", "data.num_workers", "data.cache_dir")
DATA = "data"  # the resume_allow entry that accepts changed data (the source fingerprint)


def run_record(cfg: DictConfig, source_fingerprint: str, tokenizer_fingerprint: str | None) -> dict[str, Any]:
    """The record a checkpoint carries: flattened resolved config and data fingerprints."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config.pop("hydra", None)
    config["data"] = DataConfig.from_dict(cfg.data).to_dict()  # every setting, in the one nested form
    return {"config": flatten(config), "source_fingerprint": source_fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-3, ...}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def nested_data(flat: dict[str, Any]) -> dict[str, Any]:
    """A record's flat config with its `data.*` keys in the current nested form: records written before the
    data node was nested (`data.source: demo`, `data.paths`, a `data._target_`) compare with today's."""
    data = {key[len("data."):]: value for key, value in flat.items() if key.startswith("data.")}
    if not isinstance(data.get("source"), str):
        return flat
    try:
        nested = DataConfig.from_dict(data).to_dict()
    except ConfigError:  # not a data node osp can read: compare it as it is
        return flat
    return {**{k: v for k, v in flat.items() if not k.startswith("data.")}, **flatten({"data": nested})}


def _matches(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def code_defaults() -> dict[str, Any]:
    """Every model, optim and data setting at its code default, flattened like a record."""
    from osp.optim import OptimConfig
    from osp.training.tail_loss import TailLossConfig

    return flatten({"model": config_defaults(), "optim": OptimConfig().to_dict(),
                    "data": DataConfig().to_dict(), "loss": TailLossConfig().to_dict()})


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every config key that differs, FREE keys left out.

    A key the stored record lacks whose current value is its code default is no difference: a setting that
    a newer osp added (at the default that keeps the old behaviour), e.g. `model.ffn_multiple_of`.
    """
    missing = object()
    defaults = code_defaults()
    rows = []
    # data.vocab_size sizes a BPE trained on the corpus; a pretrained tokenizer ignores it (its own size is
    # compared through the tokenizer fingerprint).
    ignored = () if current.get("data.tokenizer", "bpe") == "bpe" else ("data.vocab_size",)
    for key in sorted(set(stored) | set(current)):
        if _matches(key, FREE) or key in ignored:
            continue
        before, after = stored.get(key, missing), current.get(key, missing)
        if before is missing and key in defaults and after == defaults[key]:
            continue
        if before != after:
            rows.append((key, "(absent)" if before is missing else before,
                         "(absent)" if after is missing else after))
    return rows


def check_resume(stored: dict[str, Any] | None, current: dict[str, Any], allow: list[str],
                 checkpoint: str, run_tokenizer: str) -> list[str]:
    """Raise ConfigError listing what differs between the checkpoint's run and this one (minus `allow`).

    Returns one line per accepted difference, for the log. A checkpoint from before osp recorded runs
    (no record) is accepted as it is.
    """
    if not stored:
        return []
    unknown_allow = [a for a in allow if not isinstance(a, str)]
    if unknown_allow:
        raise ConfigError("resume_allow takes config keys (e.g. [optim.lr,trainer.max_steps]), "
                          f"got {allow!r}")
    rows = differences(nested_data(stored.get("config", {})), current["config"])
    if stored.get("source_fingerprint") != current["source_fingerprint"]:
        rows.append((DATA, "the data the run started with", "changed files or dataset"))
    tok_stored, tok_now = stored.get("tokenizer_fingerprint"), current.get("tokenizer_fingerprint")
    if tok_stored == tok_now:  # the same tokenizer, however it is named (e.g. the run's saved copy)
        rows = [row for row in rows if row[0] != "data.tokenizer"]
    refused = [row for row in rows if not _matches(row[0], allow)]
    if refused:
        listing = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in refused)
        keys = ",".join(key for key, _, _ in refused)
        hint = (f" (changed data: continue on it with the run's tokenizer, data.tokenizer={run_tokenizer})"
                if any(key == DATA for key, _, _ in refused) else "")
        raise ConfigError(f"resume from {checkpoint}: this run differs from the checkpoint's: {listing}. "
                          f"Restore those settings, or accept them with resume_allow=[{keys}]{hint}")
    if tok_stored and tok_now and tok_stored != tok_now:
        raise ConfigError(f"resume from {checkpoint}: the tokenizer differs from the one the checkpoint was "
                          "trained with (token ids would change meaning); resume with the run's own "
                          f"tokenizer (data.tokenizer={run_tokenizer}) or start a new run")
    return [f"{key}: {before!r} -> {after!r} (resume_allow)" for key, before, after in rows]
