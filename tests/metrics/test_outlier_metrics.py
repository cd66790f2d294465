"""Outlier statistics on hand-made tensors: exact values, closed forms and the Gaussian floor."""

import math

import pytest
import torch

from osp.metrics import (
    excess_kurtosis,
    gaussian_floor,
    max_abs,
    max_median_ratio,
    per_channel_kurtosis,
    token_excess_kurtosis,
)
from osp.metrics.outliers import (
    channel_kurtosis_from_sums,
    channel_square_sums,
    gate_up_alignment,
    peak_channels,
    top_channel_share,
)

# Two tokens, d = 4, worked by hand:
#   token a = [1, -1, 2, 0]: mean x^4 (uncentred) = 18/4 = 4.5; centred squares sum to 5, var (n-1) = 5/3,
#       std^4 = 25/9  ->  k = 4.5 * 9/25 - 3 = -1.38
#   token b = [1, 1, 1, 5]:  mean x^4 = 628/4 = 157;   centred squares sum to 12, var = 4, std^4 = 16
#       ->  k = 157/16 - 3 = 6.8125
H = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 5.0]])


def test_token_kurtosis_matches_hand_computation():
    torch.testing.assert_close(token_excess_kurtosis(H), torch.tensor([-1.38, 6.8125]))


def test_kurtosis_clamped_and_unclamped_means():
    assert excess_kurtosis(H).item() == pytest.approx((0.0 + 6.8125) / 2)
    assert excess_kurtosis(H, clamp=False).item() == pytest.approx((-1.38 + 6.8125) / 2)


def test_max_abs_and_max_median():
    assert max_abs(H).item() == 5.0
    # |a| sorted [0, 1, 1, 2]: lower median 1, max 2; |b| sorted [1, 1, 1, 5]: median 1, max 5.
    assert max_median_ratio(H).item() == pytest.approx((2 / 1 + 5 / 1) / 2)


def test_per_channel_kurtosis_matches_hand_computation():
    # Centred tokens: a -> [.5, -1.5, 1.5, -.5], b -> [-1, -1, -1, 3]; per-channel mean squares
    # [0.625, 1.625, 1.625, 4.625], global mean square 2.125; s_j = those / 2.125 (mean 1).
    s = torch.tensor([0.625, 1.625, 1.625, 4.625], dtype=torch.float64) / 2.125
    expected = ((s - 1) ** 2).sum().item() / 3
    assert per_channel_kurtosis(H).item() == pytest.approx(expected, rel=1e-5)


def test_per_channel_kurtosis_streams_over_chunks():
    h = torch.randn(3, 50, 32) * torch.linspace(0.5, 4.0, 32)
    sums = [channel_square_sums(chunk) for chunk in h.split(1)]
    streamed = channel_kurtosis_from_sums(sum(s for s, _ in sums), sum(n for _, n in sums))
    torch.testing.assert_close(streamed, per_channel_kurtosis(h))


def test_shapes_dtypes_and_scale_invariance():
    h = torch.randn(2, 16, 64)
    k = excess_kurtosis(h)
    assert k.dtype == torch.float32 and k.dim() == 0
    assert excess_kurtosis(h.bfloat16()).dtype == torch.float32
    assert excess_kurtosis(h.bfloat16()).item() == pytest.approx(k.item(), abs=0.02)
    assert excess_kurtosis(h * 37.0).item() == pytest.approx(k.item(), rel=1e-4)
    assert token_excess_kurtosis(h).shape == (32,)


def test_single_dominant_channel_reaches_the_maximum():
    d = 64
    h = torch.zeros(3, d)
    h[:, 5] = torch.tensor([2.0, -7.0, 300.0])
    torch.testing.assert_close(token_excess_kurtosis(h), torch.full((3,), d - 3.0))


@pytest.mark.parametrize("m", [10.0, 30.0, 100.0])
def test_planted_outlier_matches_closed_form(m):
    d = 256
    h = torch.randn(4000, d)
    h[:, 7] = m
    closed_form = d * (m**4 + 3 * d) / (m**2 + d) ** 2 - 3
    assert excess_kurtosis(h).item() == pytest.approx(closed_form, rel=0.03)


def test_gaussian_input_sits_at_the_floor():
    d = 256
    assert excess_kurtosis(torch.randn(20000, d)).item() == pytest.approx(gaussian_floor(d), rel=0.05)
    assert excess_kurtosis(torch.randn(20000, d), clamp=False).item() == pytest.approx(
        gaussian_floor(d, clamp=False), abs=0.01)


@pytest.mark.parametrize("d,table", [(128, 0.141), (256, 0.106), (512, 0.079), (768, 0.067), (2048, 0.041)])
def test_gaussian_floor_matches_spec_table(d, table):
    floor = gaussian_floor(d)
    assert floor == pytest.approx(table, abs=0.003)
    # The asymptote sqrt(12 / (pi d)) is an upper approximation that tightens with width.
    assert floor < math.sqrt(12 / (math.pi * d)) < 1.25 * floor


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="channel"):
        excess_kurtosis(torch.tensor(1.0))
    with pytest.raises(ValueError, match="2 channels"):
        excess_kurtosis(torch.ones(4, 1))
    with pytest.raises(ValueError, match="d >= 2"):
        gaussian_floor(1)


def test_top_channel_share_tells_channel_from_token_concentrated_tails():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(400, 256, generator=generator)
    channel = gaussian.clone()
    channel[:, 7] += 30.0  # the same channel peaks in every token
    tokens = gaussian.clone()
    tokens[torch.arange(400), torch.randint(0, 256, (400,), generator=generator)] += 30.0  # any channel
    share = {name: float(top_channel_share(torch.bincount(peak_channels(h), minlength=256)))
             for name, h in (("channel", channel), ("tokens", tokens))}
    assert share["channel"] == 1.0 and share["tokens"] < 0.15
    # By hand: the share of tokens whose argmax is among the 8 most frequent argmax channels.
    argmax = tokens.abs().argmax(-1)
    top = torch.bincount(argmax, minlength=256).topk(8).indices
    assert share["tokens"] == pytest.approx(torch.isin(argmax, top).float().mean().item())


def test_gate_up_alignment_is_the_mean_absolute_row_cosine():
    generator = torch.Generator().manual_seed(1)
    gate = torch.randn(96, 64, generator=generator)
    up = torch.randn(96, 64, generator=generator)
    cos = [abs(float(g @ u / (g.norm() * u.norm()))) for g, u in zip(gate, up)]
    assert float(gate_up_alignment(gate, up)) == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    assert float(gate_up_alignment(gate, -3.0 * gate)) == pytest.approx(1.0)
    assert float(gate_up_alignment(gate, up)) < 0.2  # ~ sqrt(2 / (pi 64)) = 0.1 for independent rows
