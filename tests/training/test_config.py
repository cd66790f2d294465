"""Hydra composition: every recipe composes into a valid model; bad input names the problem."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from osp.model import ConfigError, Transformer
from osp.training.train import CONFIG_DIR, build_model_config, register_resolvers, run_id

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml"))


def compose_train(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_default_is_the_tiny_recipe_on_the_demo_corpus_on_cpu():
    cfg = compose_train([])
    assert cfg.name == "tiny"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.data.source == "demo"
    assert cfg.model.max_seq_len == cfg.data.seq_len


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_builds(recipe):
    cfg = compose_train([f"recipe={recipe}"])
    assert cfg.name, "every recipe sets its name"
    model_cfg = build_model_config(cfg, vocab_size=512)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    assert model.num_params() > 0
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_overrides_reach_the_model():
    cfg = compose_train(["model.n_layers=2", "trainer.max_steps=7", "model.norm=ss"])
    assert build_model_config(cfg, 512).n_layers == 2
    assert cfg.trainer.max_steps == 7


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="(?s)Could not find 'optim/sgd'.*adamw"):
        compose_train(["optim=sgd"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="n_layer"):
        compose_train(["model.n_layer=2"])


def test_bad_block_value_lists_allowed_values():
    cfg = compose_train(["model.norm=layernorm"])
    with pytest.raises(ConfigError, match=r"model.norm='layernorm' is not allowed; choose one of \['rms', 'ss'\]"):
        build_model_config(cfg, 512)


def test_run_dir_is_derived_from_the_run_name(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert run_id() == "abc123"
    cfg = compose_train(["runs_root=/tmp/r"])
    assert cfg.run_dir == "/tmp/r/tiny-abc123"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert run_id() == "slurm42"


def test_recipe_group_is_the_recipes_folder():
    assert (CONFIG_DIR / "recipe").resolve() == (Path(CONFIG_DIR).parent / "recipes").resolve()
