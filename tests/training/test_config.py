"""Hydra composition: every recipe composes into a valid model; bad input names the problem."""


import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from osp.conf import compose, presets
from osp.conf.resolvers import run_id
from osp.data import SOURCES
from osp.errors import ConfigError
from osp.model import Transformer
from osp.training.run import build_model_config

RECIPES = presets("recipe")


def test_default_is_the_tiny_recipe_on_the_demo_corpus_on_cpu():
    cfg = compose([])
    assert cfg.name == "tiny"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.data.source.kind == "demo"
    assert cfg.model.max_seq_len == cfg.data.seq_len


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_builds(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.name, "every recipe sets its name"
    model_cfg = build_model_config(cfg, vocab_size=512)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    assert model.num_params() > 0
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_overrides_reach_the_model():
    cfg = compose(["model.n_layers=2", "trainer.max_steps=7", "model.norm=ss"])
    assert build_model_config(cfg, 512).n_layers == 2
    assert cfg.trainer.max_steps == 7


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="(?s)Could not find 'optim/sgd'.*adamw"):
        compose(["optim=sgd"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="n_layer"):
        compose(["model.n_layer=2"])


def test_bad_block_value_lists_allowed_values():
    cfg = compose(["model.norm=layernorm"])
    with pytest.raises(ConfigError,
                       match=r"model.norm='layernorm' is not allowed; choose one of \['rms', 'ss'\]"):
        build_model_config(cfg, 512)


def test_run_dir_is_derived_from_the_run_name(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert run_id() == "abc123"
    cfg = compose(["runs_root=/tmp/r"])
    assert cfg.run_dir == "/tmp/r/tiny-abc123"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert run_id() == "slurm42"


@pytest.mark.parametrize("group", ["recipe", "scale", "model", "optim", "data", "trainer", "logger"])
def test_every_preset_composes(group):
    """Every option a CLI or a config group offers composes into a train config
    (`osp train <group>=<option>`)."""
    options = presets(group)
    assert options
    for option in options:
        cfg = compose([f"{group}={option}"])
        assert cfg.trainer.max_steps > 0 and cfg.data.seq_len > 0, option


@pytest.mark.parametrize("source", presets("data"))
def test_every_data_preset_loads_for_osp_data(source):
    from osp.conf import data_config

    overrides = ["seq_len=32"] + (["source.paths=/corpus/*.txt"] if source == "files" else [])
    values = data_config(source, None, overrides)
    assert values["seq_len"] == 32 and "defaults" not in values and values["source"]["kind"] in SOURCES


def test_osp_data_names_a_missing_mandatory_key():
    from osp.conf import data_config

    with pytest.raises(ConfigError, match=r"paths"):
        data_config("files", None, [])


def test_a_flat_data_key_names_where_it_moved():
    """`data.paths=...` (the flat form of older osp) fails in one line that names `data.source.paths`."""
    from osp.cli.train import start_checks

    with pytest.raises(SystemExit,
                       match=r"data\.paths.*\(paths is a setting of the files source: data\.source\.paths"):
        start_checks(["data=files", "data.paths=/x"])
    with pytest.raises(SystemExit,
                       match=r"text_field is a setting of the files/hub source: data\.source\.text_field"):
        start_checks(["data=hub", "data.text_field=body"])
    with pytest.raises(SystemExit) as other:
        start_checks(["data.nonsense=1"])
    assert "a setting of the" not in str(other.value)
