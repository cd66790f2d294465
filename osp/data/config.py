"""DataConfig: the `data` config node as one frozen dataclass that checks itself and builds the pipeline.

The node has the settings every source shares at its top level and one nested node per source:

    data:
      source: {kind: files, paths: /corpus/*.jsonl, val_fraction: 0.01}   # a SOURCES class and its fields
      tokenizer: bpe
      seq_len: 512
      ...

`TokenPipeline(DataConfig.from_dict(node))` (osp.data.pipeline) is the Lightning-free pipeline (tokenizer,
shards, held-out blocks, per-rank batches); `PretrainDataModule(pipeline)` (osp.data.datamodule) wraps it in
the LightningDataModule that training uses. Every error names the key
(`data.source.val_fractio is not a setting of the files source; its settings: ...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from osp.data.demo import DemoCorpus
from osp.data.files import LocalFiles
from osp.data.hub import HubDataset
from osp.data.sources import TextSource
from osp.errors import ConfigError

# data.source.kind -> the class; its dataclass fields are the other keys of data.source.
SOURCES: dict[str, type[TextSource]] = {cls.kind: cls for cls in (DemoCorpus, LocalFiles, HubDataset)}


def build_source(node: Mapping[str, Any], cache_dir: str | None = None) -> TextSource:
    """The source a `data.source` node describes: `kind` picks the class, the other keys are its settings."""
    if not isinstance(node, Mapping) or "kind" not in node:
        raise ConfigError(f"data.source must be a node with a kind ({', '.join(SOURCES)}) and that source's "
                          f"settings, e.g. data.source.kind=files; got {node!r}")
    settings = dict(node)
    kind = settings.pop("kind")
    if kind not in SOURCES:
        raise ConfigError(f"data.source.kind={kind!r} is not a source; sources: {', '.join(SOURCES)}")
    cls = SOURCES[kind]
    allowed = cls.settings()
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ConfigError(f"data.source.{unknown[0]} is not a setting of the {kind} source; its settings: "
                          f"{', '.join(allowed)}")
    runtime = {"cache_dir": cache_dir} if "cache_dir" in {f.name for f in fields(cls)} else {}  # type: ignore[arg-type]
    try:
        return cls(**settings, **runtime)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"data.source ({kind}): {err}") from None


@dataclass(frozen=True)
class DataConfig:
    """Validated data settings. `seq_len` and `batch_size` are per rank and micro-batch.

    tokenizer: "bpe" (trained on the training split; `vocab_size` is its size, and the model's vocabulary is
    read back from the pipeline) or a pretrained name/path (`vocab_size` is then only what `osp plan`
    assumes).
    tokenizer_train_chars caps the BPE training text. val_blocks: held-out blocks in each validation (None:
    all). The defaults are those of `configs/data/demo.yaml`.
    """

    source: TextSource = dataclasses.field(default_factory=DemoCorpus)
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    tokenizer_train_chars: int | None = None
    seq_len: int = 256
    batch_size: int = 16
    num_workers: int = 0
    pin_memory: bool = False
    seed: int = 1234
    val_blocks: int | None = 64
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        nullable = ("val_blocks", "tokenizer_train_chars")
        for key, low in (("vocab_size", 1), ("seq_len", 1), ("batch_size", 1), ("num_workers", 0),
                         ("seed", 0), ("val_blocks", 0), ("tokenizer_train_chars", 1)):
            value = getattr(self, key)
            if value is None and key in nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{key}={value!r} must be an integer >= {low}"
                                  + (" or null" if key in nullable else ""))
        if not isinstance(self.pin_memory, bool):
            raise ConfigError(f"data.pin_memory={self.pin_memory!r} must be true or false")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} must be 'bpe' or a tokenizer name "
                              "or folder")
        if not isinstance(self.source, TextSource):
            raise ConfigError("data.source must be a source; build it with DataConfig.from_dict, "
                              f"got {self.source!r}")
        # one cache root for everything
        if getattr(self.source, "cache_dir", self.cache_dir) != self.cache_dir:
            object.__setattr__(self, "source", dataclasses.replace(self.source, cache_dir=self.cache_dir))

    @classmethod
    def from_dict(cls, node: Any) -> DataConfig:
        """From the `data` node (dict or DictConfig; a `_target_` key from an older run config is ignored).

        A flat node of an older run (`source: demo`, the source's keys beside the shared ones) is read as
        the nested one it stands for, so `osp eval` and resume still work on runs made before the change.
        """
        if isinstance(node, DataConfig):
            return node
        values = _plain(node)
        values.pop("_target_", None)
        if isinstance(values.get("source"), str):
            values = _nest_flat(values)
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"data.{unknown[0]} is not a data setting (settings: {', '.join(allowed)}; "
                              "a source's own settings go under data.source)")
        source = build_source(values.pop("source", {"kind": "demo"}), values.get("cache_dir"))
        return cls(source=source, **values)

    def to_dict(self) -> dict[str, Any]:
        """The nested `data` node, plain values: what builds this config again."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["source"] = self.source.to_dict()
        return out



def _plain(node: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if node is None:
        return {}
    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            key = err.full_key if err.full_key.startswith("data.") else f"data.{err.full_key}"
            raise ConfigError(f"{key} is required (the preset leaves it ???): set it, "
                              f"e.g. {key}=...") from None
    if not isinstance(node, Mapping):
        raise ConfigError(f"the data config must be a mapping, got {type(node).__name__}")
    return dict(node)


def _nest_flat(values: dict[str, Any]) -> dict[str, Any]:
    """An older run's flat data node as the nested one: its source's keys move under `source`."""
    kind = values.pop("source")
    if kind not in SOURCES:
        raise ConfigError(f"data.source={kind!r} is not a source; sources: {', '.join(SOURCES)}")
    shared = {f.name for f in fields(DataConfig)}
    source_keys = {key for cls in SOURCES.values() for key in cls.settings()} - shared
    own = set(SOURCES[kind].settings())
    nested = {"kind": kind, **{k: v for k, v in values.items() if k in own}}
    rest = {k: v for k, v in values.items() if k not in source_keys}
    return {**rest, "source": nested}
