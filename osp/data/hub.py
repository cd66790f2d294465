"""A Hugging Face hub dataset, streamed in its stored order (no shuffle buffer, no full download).

Validation is `val_split`, or the first `val_docs` documents of `split` (which training then skips). The same
code reads a local dataset offline (`name: json`, `data_files: ...`), which is how the tests run it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from osp.data.cache import fingerprint
from osp.data.sources import Split, TextSource, check_split
from osp.errors import DataError


@dataclass
class HubDataset(TextSource):
    """A Hugging Face dataset read with `datasets.load_dataset(..., streaming=True)`, in stored order.

    Validation is `val_split` if given, else the first `val_docs` documents of `split` (which
    training then skips). Under DDP each rank streams a disjoint share of the documents
    (`datasets.distributed.split_dataset_by_node`: whole files per rank when they divide evenly).
    `data_files` passes through to `load_dataset` (e.g. name="json" with local files).
    """

    name: str
    config_name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_docs: int = 1000
    text_field: str = "text"
    revision: str | None = None
    data_files: Any = None
    kind: ClassVar[str] = "hub"
    streaming: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError("data.source.name is empty: give a hub dataset, e.g. HuggingFaceFW/fineweb-edu")
        if self.val_split is None and self.val_docs <= 0:
            raise ValueError("val_docs must be positive when val_split is not set")

    def _load(self, split: str):  # noqa: ANN202 - datasets.IterableDataset
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config_name, split=split, streaming=True,
                                         revision=self.revision, data_files=self.data_files)
        except Exception as err:  # network, auth, or a wrong name: say which dataset and why
            raise DataError(f"cannot open hub dataset {self.name!r} (config {self.config_name!r}, split "
                            f"{split!r}): {type(err).__name__}: {err}") from err

    def stream(self, split: Split, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """Documents of `split`; for training under DDP, only this rank's share."""
        check_split(split)
        if split == "val":
            if self.val_split:
                dataset = self._load(self.val_split)
            else:
                dataset = self._load(self.split).take(self.val_docs)
        else:
            dataset = self._load(self.split)
            if not self.val_split:
                dataset = dataset.skip(self.val_docs)
            if world_size > 1:
                from datasets.distributed import split_dataset_by_node

                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        for record in dataset:
            if self.text_field not in record:
                raise DataError(f"hub dataset {self.name!r} has no field {self.text_field!r} "
                                f"(fields: {list(record)}); set data.source.text_field")
            if record[self.text_field]:
                yield str(record[self.text_field])

    def documents(self, split: Split) -> Iterator[str]:
        return self.stream(split)

    def fingerprint(self) -> str:
        return fingerprint("hub", self.name, self.config_name, self.split, self.val_split, self.val_docs,
                           self.text_field, self.revision, self.data_files)

    def describe(self) -> str:
        return f"hub {self.name}" + (f" ({self.config_name})" if self.config_name else "")
