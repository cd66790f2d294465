"""What a resume compares: the run record's config differences."""

from __future__ import annotations

import pytest

from osp.training.run_record import differences


def test_resume_ignores_the_bpe_size_only_for_a_pretrained_tokenizer():
    stored = {"data.tokenizer": "HuggingFaceTB/SmolLM-135M", "data.vocab_size": 32768, "optim.lr": 1e-3}
    current = {**stored, "data.vocab_size": 49152}
    assert differences(stored, current) == []
    bpe = {"data.tokenizer": "bpe", "data.vocab_size": 4096}
    assert differences(bpe, {**bpe, "data.vocab_size": 8192}) == [("data.vocab_size", 4096, 8192)]


def test_a_setting_added_later_at_its_default_is_no_difference():
    """A record from an osp without `model.ffn_multiple_of` resumes under one that has it, at its default;
    not at another value, and a key the current run lacks is still a difference."""
    stored = {"model.d_model": 256, "optim.lr": 1e-3}
    assert differences(stored, {**stored, "model.ffn_multiple_of": 64}) == []
    assert differences(stored, {**stored, "model.ffn_multiple_of": 128}) == [
        ("model.ffn_multiple_of", "(absent)", 128)]
    assert differences({**stored, "model.ffn_multiple_of": 64}, stored) == [
        ("model.ffn_multiple_of", 64, "(absent)")]


@pytest.mark.parametrize(("group", "config"), [("model", "ModelConfig"), ("optim", "OptimConfig"),
                                               ("logger", "LoggerConfig")])
def test_the_presets_extend_the_dataclass_and_state_only_what_differs(group, config):
    """<group>/base is the dataclass itself; its presets state only what differs from the code defaults."""
    import dataclasses

    from omegaconf import OmegaConf

    from osp.conf import CONFIG_DIR, compose, presets
    from osp.model import ModelConfig
    from osp.optim import OptimConfig
    from osp.training.logger_config import LoggerConfig

    cls = {"ModelConfig": ModelConfig, "OptimConfig": OptimConfig, "LoggerConfig": LoggerConfig}[config]
    defaults = cls().to_dict()
    for preset in presets(group):
        own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{preset}.yaml"), resolve=False)
        if own.get("defaults", [None])[0] != "base":
            continue  # extends another preset (optim/muon extends adamw)
        for key, value in own.items():
            if key != "defaults" and not isinstance(value, dict):
                assert defaults[key] != value, f"{group}/{preset}.yaml restates the default {key}"
        composed = compose([f"{group}={preset}"])[group]
        assert set(composed) == {f.name for f in dataclasses.fields(cls)}  # every setting overrides without +


def test_ns_dtype_auto_is_recorded_as_the_machine_runs_it(monkeypatch):
    """`optim.ns_dtype=auto` is recorded resolved, like the precision: a Muon checkpoint from before `auto`
    (its record says bf16) resumes as it is where bf16 is native, and names the change where it is not."""
    import osp.training.run as run
    from osp.conf import compose
    from osp.training.run_record import flatten

    old = flatten({"optim": {"name": "muon", "ns_dtype": "bf16"}})
    for native, expected_rows in ((True, []), (False, [("optim.ns_dtype", "bf16", "fp32")])):
        monkeypatch.setattr(run, "auto_dtype_name",
                            lambda device_type, native=native: "bf16" if native else "fp32")
        cfg = compose(["optim=muon"])
        assert cfg.optim.ns_dtype == "auto"
        run.resolve_for_machine(cfg)
        assert differences(old, flatten({"optim": {"name": "muon", "ns_dtype": cfg.optim.ns_dtype}})
                           ) == expected_rows
    adamw = compose([])  # AdamW runs have no Newton-Schulz to resolve: the setting stays at its default
    run.resolve_for_machine(adamw)
    assert adamw.optim.ns_dtype == "auto"
