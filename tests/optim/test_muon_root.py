"""Muon and ROOT steps against hand computations; AdamW groups against torch; exact resume."""

import io
import math
import warnings

import pytest
import torch
from torch import nn

from osp.optim import ROOT, Muon, newton_schulz
from osp.optim.muon import update_scale
from osp.optim.newton_schulz import MUON_COEFFICIENTS
from osp.optim.root import ROOT_COEFFICIENTS, batched_quantile, ns_coefficients


def test_update_scale_by_hand():
    assert update_scale((256, 704), "moonlight") == pytest.approx(0.2 * math.sqrt(704))
    assert update_scale((704, 256), "moonlight") == pytest.approx(0.2 * math.sqrt(704))
    assert update_scale((704, 256), "keller") == pytest.approx(math.sqrt(704 / 256))
    assert update_scale((256, 704), "keller") == 1.0
    assert update_scale((8, 3, 2, 2), "keller") == pytest.approx(1.0)  # viewed as (8, 12)
    assert update_scale((16,), "moonlight") == pytest.approx(0.2 * 4)  # a (1, 16) row
    assert update_scale((), "moonlight") == pytest.approx(0.2)


@pytest.mark.parametrize("rule", ["moonlight", "keller"])
def test_first_step_by_hand(rule):
    W = nn.Parameter(torch.randn(24, 40))
    W0 = W.detach().clone()
    g = torch.randn(24, 40)
    W.grad = g.clone()
    lr, wd, beta = 0.01, 0.1, 0.95
    Muon([W], lr=lr, weight_decay=wd, momentum=beta, ns_dtype="fp32", update_scale=rule).step()
    # buf = g, u = g + β·g: NS removes the (1 + β) factor.
    ortho = newton_schulz(g, dtype=torch.float32)
    expected = W0 * (1 - lr * wd) - lr * update_scale((24, 40), rule) * ortho
    torch.testing.assert_close(W.detach(), expected, rtol=1e-5, atol=1e-6)


def test_nesterov_form_equals_keller_lerp_form():
    """buf = βbuf + g, u = g + βbuf  vs  m = lerp(m, g, 1−β), u = lerp(g, m, β): u differ by (1−β)."""
    torch.manual_seed(1)
    beta, lr = 0.9, 0.02
    W = nn.Parameter(torch.randn(16, 32))
    ref = W.detach().clone()
    opt = Muon([W], lr=lr, weight_decay=0.0, momentum=beta, ns_dtype="fp32", update_scale="keller")
    m = torch.zeros_like(ref)
    for _ in range(4):
        g = torch.randn(16, 32)
        W.grad = g.clone()
        opt.step()
        m.lerp_(g, 1 - beta)
        ref -= lr * newton_schulz(g.lerp(m, beta), dtype=torch.float32)
    torch.testing.assert_close(W.detach(), ref, rtol=1e-4, atol=1e-5)


def test_plain_momentum_when_not_nesterov():
    W = nn.Parameter(torch.zeros(8, 8))
    opt = Muon([W], lr=1.0, weight_decay=0.0, nesterov=False, ns_dtype="fp32")
    g1, g2 = torch.randn(8, 8), torch.randn(8, 8)
    W.grad = g1
    opt.step()
    before = W.detach().clone()
    W.grad = g2
    opt.step()
    ortho = newton_schulz(0.95 * g1 + g2, dtype=torch.float32)
    torch.testing.assert_close(W.detach() - before, -update_scale((8, 8), "moonlight") * ortho,
                               rtol=1e-5, atol=1e-5)


def test_conv_like_parameter_is_viewed_as_matrix():
    W = nn.Parameter(torch.zeros(6, 2, 3, 3))
    g = torch.randn(6, 2, 3, 3)
    W.grad = g
    Muon([W], lr=1.0, weight_decay=0.0, ns_dtype="fp32").step()
    ortho = newton_schulz(g.reshape(6, 18), dtype=torch.float32).reshape(6, 2, 3, 3)
    torch.testing.assert_close(W.detach(), -0.2 * math.sqrt(18) * ortho)


def test_vectors_and_scalars_get_normalized_updates():
    v, s = nn.Parameter(torch.zeros(9)), nn.Parameter(torch.zeros(()))
    gv, gs = torch.randn(9), torch.tensor(-3.0)
    v.grad, s.grad = gv, gs
    Muon([v, s], lr=1.0, weight_decay=0.0).step()
    # OSP's rule for ndim < 2: u/‖u‖ scaled as a (1, numel) row, so update RMS 0.2; a scalar moves 0.2·sign.
    torch.testing.assert_close(v.detach(), -0.2 * 3 * gv / gv.norm())
    torch.testing.assert_close(s.detach(), torch.tensor(0.2))


def test_missing_grad_is_skipped_on_one_process():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    b0 = b.detach().clone()
    a.grad = torch.randn(4, 4)
    opt = Muon([a, b])
    opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(2)
    params = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(()))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-10, weight_decay=0.05)
    ours = Muon([{"params": params, "algorithm": "adamw", **hp}])
    theirs = torch.optim.AdamW(twins, **hp)
    for _ in range(5):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)


def test_unknown_algorithm_in_group_is_rejected():
    with pytest.raises(ValueError, match="accepts: adamw, muon"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 2))], "algorithm": "root"}])


def test_batched_quantile_matches_torch_quantile():
    x = torch.randn(3, 1001).abs()
    for q in (0.0, 0.5, 0.9, 0.973, 1.0):
        torch.testing.assert_close(batched_quantile(x, q), torch.quantile(x, q, dim=1))


def test_batched_quantile_above_torch_quantile_limit():
    n = 2**24 + 3
    x = torch.randperm(n).float()  # the q-quantile of 0..n-1 is q·(n−1)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.9)
    # float32 spacing at 1.5e7 is 1: compare against the exactly representable neighbours.
    assert abs(batched_quantile(x.view(1, -1), 0.9).item() - 0.9 * (n - 1)) <= 1.0


def test_root_step_by_hand():
    W = nn.Parameter(torch.zeros(12, 20))
    g = torch.randn(12, 20)
    g[0, 0] = 50.0  # an outlier that Muon would let dominate the direction
    W.grad = g.clone()
    ROOT([W], lr=1.0, weight_decay=0.0, ns_dtype="fp32").step()
    u = 1.95 * g
    eps = torch.quantile(u.abs(), 0.9) + 1e-9
    ortho = newton_schulz(u.clamp(-eps, eps), coefficients=ns_coefficients(12, 20), dtype=torch.float32)
    torch.testing.assert_close(W.detach(), -0.2 * math.sqrt(20) * ortho, rtol=1e-5, atol=1e-6)


def test_root_without_fits_warns_once_per_shape_and_uses_muons():
    opt = ROOT([nn.Parameter(torch.zeros(2, 2))], fit_missing=False)
    assert opt._coefficients(torch.Size([2048, 8192])) == ROOT_COEFFICIENTS[(2048, 8192)]
    assert opt._coefficients(torch.Size([8192, 2048])) == ROOT_COEFFICIENTS[(2048, 8192)]
    with pytest.warns(UserWarning, match=r"\(16, 32\)"):
        assert opt._coefficients(torch.Size([32, 16])) == MUON_COEFFICIENTS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt._coefficients(torch.Size([16, 32]))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _hybrid(cls, model):
    matrices = [m.weight for m in model if isinstance(m, nn.Linear)]
    rest = [p for p in model.parameters() if all(p is not w for w in matrices)]
    return cls([{"params": matrices}, {"params": rest, "algorithm": "adamw", "lr": 3e-3}], lr=0.02)


def _step(model, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("cls", [Muon, ROOT])
def test_state_dict_round_trip_gives_identical_next_step(cls):
    torch.manual_seed(3)
    model = _model()
    opt = _hybrid(cls, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(3):
            _step(model, opt, seed)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # as Lightning loads checkpoints
        twin = _model()
        twin.load_state_dict(saved["model"])
        twin_opt = _hybrid(cls, twin)
        twin_opt.load_state_dict(saved["optim"])
        _step(model, opt, 10)
        _step(twin, twin_opt, 10)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_batch_cap_does_not_change_the_step(monkeypatch):
    import osp.optim.muon as muon_module

    grads = [torch.randn(16, 24) for _ in range(5)]

    def run():
        params = [nn.Parameter(torch.ones(16, 24)) for _ in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        Muon(params, ns_dtype="fp32").step()
        return torch.stack([p.detach() for p in params])

    batched = run()
    monkeypatch.setattr(muon_module, "BATCH_ELEMENTS", 2 * 16 * 24)  # batches of 2, 2 and 1
    torch.testing.assert_close(run(), batched)
