"""DataConfig: the presets build, every error names its key, older flat data nodes still read, and the
pipeline works without Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from osp.conf import compose, presets
from osp.data import SOURCES, DataConfig, DemoCorpus, HubDataset, LocalFiles
from osp.data.config import build_source
from osp.errors import ConfigError, DataError
from osp.training.run_record import flatten, nested_data
from tests.support.cli import REPO
from tests.support.training import subprocess_env


def test_every_data_preset_builds_its_source(tmp_path):
    built = {}
    for name in presets("data"):
        overrides = [f"+data={name}", "+seed=5"]
        if name == "files":
            overrides.append(f"data.source.paths={tmp_path}/*.txt")
        built[name] = DataConfig.from_dict(compose(overrides, config_name=None).data)  # lazy: nothing fetched
    assert type(built["demo"].source) is DemoCorpus and built["demo"].source.include_bible
    assert (built["demo"].vocab_size, built["demo"].seq_len, built["demo"].batch_size) == (4096, 256, 16)
    assert built["demo"].seed == 5  # the run's seed reaches the data through ${oc.select:seed,...}
    assert type(built["files"].source) is LocalFiles and built["files"].source.paths == f"{tmp_path}/*.txt"
    assert type(built["hub"].source) is HubDataset and built["hub"].source.name == "HuggingFaceFW/fineweb-edu"
    smollm = built["smollm"]  # extends hub: its own dataset, the hub preset's other settings
    assert (smollm.source.name, smollm.source.config_name) == ("HuggingFaceTB/smollm-corpus",
                                                               "fineweb-edu-dedup")
    assert smollm.source.val_docs == 2000 and smollm.tokenizer == "HuggingFaceTB/SmolLM-135M"


def test_the_files_preset_needs_paths():
    with pytest.raises(ConfigError, match=r"data.source.paths is required"):
        DataConfig.from_dict(compose(["+data=files"], config_name=None).data)


def test_one_class_per_source_and_its_fields_are_its_settings():
    assert SOURCES == {"demo": DemoCorpus, "files": LocalFiles, "hub": HubDataset}
    # cache_dir is the pipeline's, not the source's
    assert DemoCorpus.settings() == ["include_bible", "deb_dir"]
    for cls in SOURCES.values():
        node = build_source({"kind": cls.kind, **({"paths": "x"} if cls is LocalFiles else {}),
                             **({"name": "x"} if cls is HubDataset else {})}).to_dict()
        assert build_source(node).to_dict() == node and node["kind"] == cls.kind


@pytest.mark.parametrize("node,message", [
    ({"source": {"kind": "files", "paths": "x", "val_fractio": 0.1}},
     "data.source.val_fractio is not a setting of the files source; its settings: paths, val_paths"),
    ({"source": {"kind": "web"}}, r"data.source.kind='web' is not a source; sources: demo, files, hub"),
    ({"source": "web"}, r"data.source='web' is not a source"),
    ({"source": {"paths": "x"}}, "data.source must be a node with a kind"),
    ({"paths": "x"}, "data.paths is not a data setting .*a source's own settings go under data.source"),
    ({"seq_len": 0}, r"data.seq_len=0 must be an integer >= 1"),
    ({"val_blocks": -1}, r"data.val_blocks=-1 must be an integer >= 0 or null"),
    ({"pin_memory": "yes"}, "data.pin_memory='yes' must be true or false"),
    ({"source": {"kind": "files", "paths": "x", "val_fraction": 2.0}},
     r"data.source \(files\): val_fraction must"),
    ({"source": {"kind": "hub", "name": ""}}, "data.source.name is empty"),
])
def test_errors_name_the_key(node, message):
    with pytest.raises((ConfigError, DataError), match=message):
        DataConfig.from_dict(node)


def test_the_cache_root_is_one_setting():
    config = DataConfig.from_dict({"cache_dir": "/tmp/somewhere"})
    assert config.source.cache_dir == "/tmp/somewhere"
    direct = DataConfig(cache_dir="/tmp/elsewhere")  # built without from_dict: the source follows too
    assert direct.source.cache_dir == "/tmp/elsewhere"
    with pytest.raises(ConfigError, match="data.source.cache_dir is not a setting of the demo source"):
        DataConfig.from_dict({"source": {"kind": "demo", "cache_dir": "/x"}})


def test_an_older_flat_data_node_reads_as_the_nested_one():
    flat = {"_target_": "osp.data.datamodule.PretrainDataModule", "source": "files", "paths": ["a/*.txt"],
            "val_paths": None, "val_fraction": 0.05, "text_field": "body", "txt_documents": "paragraphs",
            "tokenizer": "bpe", "vocab_size": 8192, "seq_len": 512, "batch_size": 16, "seed": 3,
            "val_blocks": 128}
    nested = {"source": {"kind": "files", "paths": ["a/*.txt"], "val_fraction": 0.05, "text_field": "body",
                         "txt_documents": "paragraphs"},
              "tokenizer": "bpe", "vocab_size": 8192, "seq_len": 512, "batch_size": 16, "seed": 3,
              "val_blocks": 128}
    assert DataConfig.from_dict(flat) == DataConfig.from_dict(nested)
    # A checkpoint's record from before the change compares equal to today's record of the same run.
    old_record = {"optim.lr": 0.01, **flatten({"data": flat})}
    new_record = {"optim.lr": 0.01, **flatten({"data": DataConfig.from_dict(nested).to_dict()})}
    assert nested_data(old_record) == new_record
    assert nested_data(new_record) == new_record


def test_the_pipeline_runs_without_lightning(tmp_path, corpus_files):
    script = f"""
import sys
from pathlib import Path
from osp.data import TokenPipeline
from tests.support.data import data_config
pipeline = TokenPipeline(data_config(Path({str(corpus_files)!r}), Path({str(tmp_path)!r})))
assert pipeline.heldout_blocks(3).shape == (3, 16)
assert pipeline.train_blocks(2).shape == (2, 16)
assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')], 'imported'
print('ok')
"""  # noqa: E501 - the script's own lines
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
