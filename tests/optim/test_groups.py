"""Routing by role, config validation, describe_groups, on the real Transformer and on a fake module."""


import pytest
import torch
from torch import nn

from osp.conf import compose
from osp.model import ModelConfig, Transformer
from osp.optim import ROOT, Muon, OptimConfig, describe_groups


def tiny_model(**overrides) -> Transformer:
    cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, emb_proj=True, norm="ss")
    return Transformer(ModelConfig(**{**cfg, **overrides}))


def by_name(opt):
    return {g["name"]: g for g in opt.param_groups}


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("muon", Muon), ("root", ROOT)])
def test_config_files_build_and_route(name, cls):
    model = tiny_model()
    opt = OptimConfig.from_dict(compose([f"optim={name}"]).optim).build(model)
    assert type(opt) is cls
    groups = by_name(opt)
    matrix_algorithm = "adamw" if name == "adamw" else name
    assert groups["matrix"]["algorithm"] == matrix_algorithm
    for role in ("embedding", "head", "gain"):
        assert groups[role]["algorithm"] == "adamw"
    # EmbProj maps are hidden matrices: they go with the matrix optimizer.
    matrix_ids = {id(p) for p in groups["matrix"]["params"]}
    assert id(model.emb_proj_in.weight) in matrix_ids and id(model.emb_proj_out.weight) in matrix_ids
    assert id(model.embed_tokens.weight) in {id(p) for p in groups["embedding"]["params"]}
    assert groups["gain"]["weight_decay"] == 0.0 and groups["matrix"]["weight_decay"] > 0.0
    n_routed = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_routed == sum(p.numel() for p in model.parameters())
    table = describe_groups(opt)
    assert "matrix" in table and f"{n_routed:,}" in table and matrix_algorithm in table


def test_adamw_settings_of_hybrid_groups():
    cfg = {"name": "muon", "lr": 0.02, "weight_decay": 0.0, "update_scale": "keller", "adamw_lr": 3e-4,
           "adamw_betas": [0.8, 0.95], "adamw_weight_decay": 0.01, "ns_dtype": "fp32"}
    groups = by_name(OptimConfig.from_dict(cfg).build(tiny_model()))
    assert groups["matrix"]["lr"] == 0.02 and groups["matrix"]["update_scale"] == "keller"
    assert groups["matrix"]["ns_dtype"] == "fp32"
    assert groups["head"]["lr"] == 3e-4 and groups["head"]["betas"] == (0.8, 0.95)
    assert groups["embedding"]["weight_decay"] == 0.01 and groups["gain"]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_decayed_roles_choose_who_gets_weight_decay(name):
    """The sweep's "decay on gains" axis: a role in optim.decayed_roles gets the weight decay of its
    algorithm."""
    cfg = OptimConfig.from_dict(compose([f"optim={name}", "optim.weight_decay=0.05",
                                         "optim.decayed_roles=[matrix,gain]"]).optim)
    groups = by_name(cfg.build(tiny_model()))
    decays = {role: g["weight_decay"] for role, g in groups.items()}
    assert decays == {"embedding": 0.0, "head": 0.0, "matrix": 0.05, "gain": 0.05}
    assert cfg.to_dict()["decayed_roles"] == ["matrix", "gain"]
    default = by_name(OptimConfig().build(tiny_model()))
    assert {role: g["weight_decay"] > 0 for role, g in default.items()} == {
        "embedding": True, "head": True, "matrix": True, "gain": False}


def test_routing_override_and_tied_embeddings():
    # OSP's "Muon-Only" ablation: the embedding on Muon too.
    model = tiny_model(tie_embeddings=True, emb_proj=False)
    groups = by_name(OptimConfig.from_dict({"name": "muon", "routing": {"embedding": "muon"}}).build(model))
    assert "head" not in groups  # the tied head is the embedding, listed once
    assert [id(p) for p in groups["embedding"]["params"]] == [id(model.embed_tokens.weight)]
    assert groups["embedding"]["algorithm"] == "muon"


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "sgd"}, r"optim.name='sgd'.*adamw, muon, root"),
        ({"name": "muon", "routing": {"matrix": "root"}}, r"optim.routing.matrix='root'.*adamw, muon"),
        ({"name": "muon", "routing": {"norms": "adamw"}}, r"unknown role 'norms'"),
        ({"name": "muon", "update_scale": "spectral"}, r"optim.update_scale.*moonlight, keller"),
        ({"lr": -1.0}, r"optim.lr"),
        ({"betas": [0.9]}, r"optim.betas"),
        ({"learning_rate": 1e-3}, r"optim.learning_rate is not a optim setting"),
        ({"decayed_roles": "gain"}, r"optim.decayed_roles must be a list, got 'gain'"),
        ({"decayed_roles": ["gain", "x"]},
         r"optim.decayed_roles=\['gain', 'x'\].*embedding, head, matrix, gain, bias"),
        ({"decayed_roles": ["norm"]}, r"optim.decayed_roles"),
    ],
)
def test_bad_config_names_key_and_allowed_values(cfg, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig.from_dict(cfg).build(tiny_model())


class FakeModel(nn.Module):
    """The parameter_roles() contract without the Transformer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.extra = nn.Parameter(torch.randn(4))

    def parameter_roles(self):
        return {"w": "matrix"}


def test_parameter_without_role_is_an_error():
    with pytest.raises(KeyError, match="'extra'"):
        OptimConfig.from_dict({"name": "muon"}).build(FakeModel())


def test_reapply_on_a_restored_optimizer_is_bitwise_a_no_op_and_applies_a_changed_setting():
    """torch's load_state_dict keeps the saved hyperparameters (and LambdaLR its saved base lrs); reapply puts
    this run's config back, so a change that resume_allow accepts takes effect, and nothing else moves."""
    import torch

    torch.manual_seed(0)
    model = tiny_model()
    cfg = OptimConfig(name="muon", lr=3e-3, weight_decay=0.1, warmup_steps=2, ns_dtype="fp32")
    opt = cfg.build(model)
    sched = cfg.build_scheduler(opt, total_steps=10)
    for _ in range(3):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    def restored(config: OptimConfig):
        o = config.build(model)
        s = config.build_scheduler(o, total_steps=10)
        o.load_state_dict(saved_opt)
        s.load_state_dict(saved_sched)
        return o, s

    same, same_sched = restored(cfg)
    before = [dict(g, params=None) for g in same.param_groups]
    cfg.reapply(same, same_sched, model)
    assert [dict(g, params=None) for g in same.param_groups] == before
    assert same_sched.get_last_lr() == sched.get_last_lr()

    changed_cfg = OptimConfig(name="muon", lr=1e-3, weight_decay=0.05, warmup_steps=2, ns_dtype="fp32")
    changed, changed_sched = restored(changed_cfg)
    assert changed.param_groups[0]["initial_lr"] == 3e-3  # what load_state_dict leaves
    changed_cfg.reapply(changed, changed_sched, model)
    factor = sched.get_last_lr()[0] / 3e-3
    for group in changed.param_groups:
        assert group["initial_lr"] == 1e-3 and group["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
        assert group["weight_decay"] in (0.0, 0.05)
    assert changed_sched.base_lrs == [1e-3] * len(changed.param_groups)
