"""Clipped softmax attention: the formula, the torch twin, the dispatching op, and the Triton kernel
(under TRITON_INTERPRET=1, set by tests/conftest.py) against the twin."""

import pytest
import torch
import torch.nn.functional as F

from osp.model import ModelConfig, Transformer
from osp.model import clipped_softmax as cs
from osp.model.clipped_softmax import clipped_attention, clipped_softmax, twin_backward, twin_forward
from tests.support.kernel_inputs import qkv


def naive_clipped_attention(q, k, v, gamma, zeta):
    """Full-matrix reference: mask, clipped softmax, times V; plain autograd."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return clipped_softmax(scores, gamma, zeta) @ v


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def test_formula_masked_positions_are_exactly_zero_and_gamma0_zeta1_is_softmax():
    x = torch.randn(5, 9)
    x[:, 4:] = float("-inf")
    clipped = clipped_softmax(x, gamma=-0.05, zeta=1.02)
    assert torch.equal(clipped[:, 4:], torch.zeros(5, 5))
    assert clipped.min() >= 0 and clipped.max() <= 1
    assert torch.equal(clipped_softmax(x, gamma=0.0, zeta=1.0), torch.softmax(x, -1))
    # Large logits: exact 1 and exact 0 are reached at finite values.
    sharp = clipped_softmax(torch.tensor([[0.0, 30.0, 0.0]]), gamma=-0.05, zeta=1.05)
    assert torch.equal(sharp, torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma, zeta", [(0.0, 1.0), (-0.1, 1.0), (-0.05, 1.08)])
def test_twin_matches_the_naive_formula_forward_and_backward(gamma, zeta):
    q, k, v = qkv(t=23)
    ref = naive_clipped_attention(q, k, v, gamma, zeta)
    dout = torch.randn_like(ref)
    out = clipped_attention(q, k, v, gamma, zeta)  # CPU tensors: the op runs the twin
    assert torch.allclose(out, ref, atol=1e-5)
    for mine, theirs in zip(grads(out, (q, k, v), dout), grads(ref, (q, k, v), dout), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_gamma0_zeta1_equals_sdpa_softmax_attention():
    q, k, v = qkv(t=19)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(clipped_attention(q, k, v, 0.0, 1.0), sdpa, atol=1e-5)


def test_future_keys_do_not_influence_outputs():
    q, k, v = qkv(t=12)
    out = clipped_attention(q, k, v, -0.1, 1.0)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 7:] += 5.0
    v2[:, :, 7:] -= 3.0
    out2 = clipped_attention(q, k2, v2, -0.1, 1.0)
    assert torch.equal(out[:, :, :7], out2[:, :, :7])


def test_twin_processes_one_head_at_a_time_at_long_sequences():
    q = torch.empty(2, 8, 4096, 64, device="meta")
    k = torch.empty(2, 2, 4096, 64, device="meta")
    sizes = [chunk.stop - chunk.start for chunk, _ in cs._head_chunks(q, k)]
    assert sizes == [1] * 16
    # Short sequences batch many heads per chunk (speed), within the same element budget.
    short = [c.stop - c.start for c, _ in cs._head_chunks(q[:, :, :64], k[:, :, :64])]
    assert short == [16]


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v = qkv(t=21)
    out, lse = twin_forward(q.detach(), k.detach(), v.detach(), -0.1, 1.02)
    dout = torch.randn_like(out)
    full = twin_backward(dout, q.detach(), k.detach(), v.detach(), lse, -0.1, 1.02)
    monkeypatch.setattr(cs, "TWIN_CHUNK_ELEMENTS", 1)  # one head per chunk
    out1, lse1 = twin_forward(q.detach(), k.detach(), v.detach(), -0.1, 1.02)
    assert torch.allclose(out1, out, atol=1e-6) and torch.allclose(lse1, lse, atol=1e-6)
    chunked = twin_backward(dout, q.detach(), k.detach(), v.detach(), lse, -0.1, 1.02)
    for a, b in zip(chunked, full, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_autograd_saves_no_score_matrix():
    q, k, v = qkv(t=48)
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        clipped_attention(q, k, v, -0.05, 1.0).sum().backward()
    assert saved and max(saved) <= q.numel()  # q, k, v and the (B, H, T) log-sum-exp; never B*H*T*T


def test_op_registration_is_consistent():
    q, k, v = qkv(b=1, t=9)
    torch.library.opcheck(cs._clipped_attention_op, (q, k, v, -0.1, 1.0))
    # As in the model: heads are a transposed view of (B, T, H, D); fake and real outputs agree on strides.
    q, k, v = qkv(b=2, t=9)
    q_t = torch.randn(2, 9, 4, 16).transpose(1, 2).requires_grad_()
    torch.library.opcheck(cs._clipped_attention_op, (q_t, k, v, -0.1, 1.0))


def test_compiles_with_fullgraph():
    """As in Attention: heads are a transposed view of (B, T, H, D), and the output is transposed back and
    flattened; the compiled graph must agree with eager (the fake kernels report the real output layout)."""
    x = torch.randn(2, 11, 4, 16, requires_grad=True)
    _, k, v = qkv(b=2, t=11)

    def attend(x, k, v):
        out = clipped_attention(x.transpose(1, 2), k, v, -0.1, 1.0)
        return out.transpose(1, 2).reshape(2, 11, 64)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x, k, v), attend(x, k, v)
    assert torch.allclose(out, ref)
    dout = torch.randn_like(ref)
    for a, b in zip(grads(out, (x, k, v), dout), grads(ref, (x, k, v), dout), strict=True):
        assert torch.allclose(a, b)


def test_model_with_gamma0_zeta1_equals_the_softmax_model():
    values = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    plain = Transformer(ModelConfig(**values))
    clipped = Transformer(ModelConfig(**values, attn_softmax="clipped", clip_gamma=0.0))
    clipped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (2, 13))
    assert torch.allclose(clipped(ids), plain(ids), atol=1e-5)


def test_alpha_form_is_length_invariant_gamma():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=512,
                      attn_softmax="clipped", clip_alpha=12.0)
    core = Transformer(cfg).layers[0].self_attn.core
    assert core.gamma == pytest.approx(-12.0 / 512) and core.zeta == 1.0


# ---- Triton kernel (interpreted on CPU) vs the twin ------------------------------------------------------


@pytest.mark.parametrize(
    "shape, blocks",
    [
        ((2, 4, 2, 37, 16), (64, 64)),  # GQA, odd T, one block per head
        ((1, 4, 1, 45, 24), (32, 16)),  # MQA, odd T and head_dim (padded to 32), several blocks, M != N
        ((1, 2, 2, 33, 16), (16, 32)),  # MHA, block_m < block_n
    ],
)
def test_triton_kernel_matches_twin(shape, blocks):
    from osp.model.kernels import clipped_attention as kernels

    b, h, hkv, t, d = shape
    block_m, block_n = blocks
    gamma, zeta = -0.08, 1.03
    q, k, v = (x.detach() for x in qkv(b, h, hkv, t, d))
    out_ref, lse_ref = twin_forward(q, k, v, gamma, zeta)
    out, lse = kernels.forward(q, k, v, gamma, zeta, block_m=block_m, block_n=block_n)
    assert torch.allclose(out, out_ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(lse, lse_ref, atol=2e-5, rtol=1e-4)

    dout = torch.randn_like(out)
    expected = twin_backward(dout, q, k, v, lse_ref, gamma, zeta)
    got = kernels.backward(dout, q, k, v, lse, gamma, zeta, block_m=block_m, block_n=block_n)
    for name, mine, theirs in zip("qkv", got, expected, strict=True):
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=2e-5, rtol=1e-4), f"d{name}: {(mine - theirs).abs().max()}"


def test_triton_kernel_bf16_inputs_and_outputs():
    """bf16 in, bf16 out, fp32 statistics (Triton's interpreter upcasts dot operands)."""
    from osp.model.kernels import clipped_attention as kernels

    q, k, v = (x.detach() for x in qkv(1, 4, 2, 29, 16, dtype=torch.bfloat16))
    out_ref, lse_ref = twin_forward(q, k, v, -0.05, 1.0)
    out, lse = kernels.forward(q, k, v, -0.05, 1.0)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.allclose(out.float(), out_ref.float(), atol=2e-2)  # one bf16 rounding of values ~1
    assert torch.allclose(lse, lse_ref, atol=1e-4)
    dout = torch.randn_like(out)
    got = kernels.backward(dout, q, k, v, lse, -0.05, 1.0)
    for mine, theirs in zip(got, twin_backward(dout, q, k, v, lse_ref, -0.05, 1.0), strict=True):
        assert mine.dtype == torch.bfloat16
        assert torch.allclose(mine.float(), theirs.float(), atol=5e-2, rtol=2e-2)
