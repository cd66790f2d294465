"""Clipped softmax attention (Bondarenko, Nagel, Blankevoort 2023): the formula, a memory-bounded torch
twin of the Triton kernel, and the op that dispatches between them.

clipped_softmax(x) = clip((zeta - gamma) softmax(x) + gamma, 0, 1) with gamma <= 0 <= 1 <= zeta. Exact 0 and 1
become reachable at finite logits, so a head that wants to "do nothing" stops pushing its logits, and the
residual stream that feeds them, towards infinity. The causal mask is applied before the softmax, so
future keys get p = 0 and, since gamma <= 0, exactly 0 after the clip.

Attention needs the full probability matrix here (the clip acts on normalised probabilities), so fused
SDPA cannot be used. `clipped_attention` runs the Triton kernel (`kernels/clipped_attention.py`) on CUDA
tensors and the torch twin elsewhere; both save only the row log-sum-exp for the backward and recompute
probabilities there, and the op is a `torch.library.custom_op`, so `torch.compile` treats it as one node.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Score-matrix elements per chunk of the twin (16 MiB in fp32). Heads are processed in chunks that fit,
# but never less than one whole head: at long sequences only one head's T x T matrices (a few of them,
# updated in place where possible) are alive at a time, in the forward and in the backward.
TWIN_CHUNK_ELEMENTS = 1 << 22


def clip_probabilities(p: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """clip((zeta - gamma) p + gamma, 0, 1)."""
    return ((zeta - gamma) * p + gamma).clamp_(0.0, 1.0)


def clipped_softmax(x: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """The reference formula on a full score tensor (fp32 inside); -inf entries give exactly 0."""
    return clip_probabilities(torch.softmax(x.float(), dim=dim), gamma, zeta).to(x.dtype)


def _head_chunks(q: torch.Tensor, k: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of the B*H query heads, their key/value head indices into the B*Hkv heads), chunk by chunk."""
    b, h, t, _ = q.shape
    hkv = k.shape[1]
    heads = torch.arange(b * h, device=q.device)
    kv_index = (heads // h) * hkv + (heads % h) // (h // hkv)
    step = max(1, TWIN_CHUNK_ELEMENTS // (t * t))
    for start in range(0, b * h, step):
        chunk = slice(start, min(start + step, b * h))
        yield chunk, kv_index[chunk]


def _probabilities(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, future: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (n, T, T) of fp32 heads q, k, and the row log-sum-exp (computed if not given).
    One (n, T, T) buffer: the scores become the probabilities in place."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    s.masked_fill_(future, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    return s.sub_(lse.unsqueeze(-1)).exp_(), lse


def _future(t: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(t, device=device)
    return positions[None, :] > positions[:, None]


def twin_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, zeta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal clipped attention in torch; q (B, H, T, D), k, v (B, Hkv, T, D) -> out (B, H, T, D) and the
    row log-sum-exp (B, H, T) in fp32."""
    b, h, t, d = q.shape
    qf, kf, vf = q.reshape(b * h, t, d), k.reshape(-1, t, d), v.reshape(-1, t, d)
    future = _future(t, q.device)
    out = qf.new_empty(qf.shape)  # contiguous whatever q's strides (the fake kernel promises it)
    lse = torch.empty(b * h, t, device=q.device, dtype=torch.float32)
    for chunk, kv in _head_chunks(q, k):
        p, lse[chunk] = _probabilities(qf[chunk].float(), kf[kv].float(), None, future)
        c = clip_probabilities(p, gamma, zeta).masked_fill_(future, 0.0)
        out[chunk] = (c @ vf[kv].float()).to(out.dtype)
    return out.view(b, h, t, d), lse.view(b, h, t)


def twin_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                  gamma: float, zeta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `twin_forward`, recomputing probabilities from lse one chunk of heads at a time.

    The clip passes gradient only where 0 < (zeta - gamma) p + gamma < 1; through the softmax,
    dS = P * (dP - rowsum(dP * P)).
    """
    b, h, t, d = q.shape
    qf, kf, vf = q.reshape(b * h, t, d), k.reshape(-1, t, d), v.reshape(-1, t, d)
    dof, lsef = dout.reshape(b * h, t, d), lse.reshape(b * h, t)
    future = _future(t, q.device)
    dq = qf.new_empty(qf.shape)
    # dK, dV as seen by each query head, summed over the GQA group at the end (as the Triton launcher does).
    dk_heads = torch.empty(b * h, t, d, device=q.device, dtype=torch.float32)
    dv_heads = torch.empty_like(dk_heads)
    for chunk, kv in _head_chunks(q, k):
        qc, kc, vc, doc = qf[chunk].float(), kf[kv].float(), vf[kv].float(), dof[chunk].float()
        p, _ = _probabilities(qc, kc, lsef[chunk], future)
        u = (zeta - gamma) * p + gamma
        passes = (u > 0) & (u < 1) & ~future
        c = u.clamp_(0.0, 1.0).masked_fill_(future, 0.0)
        dv_heads[chunk] = c.transpose(-1, -2) @ doc
        del u, c  # freed before dP is allocated
        dp = (doc @ vc.transpose(-1, -2)).mul_(passes).mul_(zeta - gamma)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(d**-0.5)  # in place: dp becomes dS
        dq[chunk] = ds @ kc
        dk_heads[chunk] = ds.transpose(-1, -2) @ qc
    hkv = k.shape[1]
    dk = dk_heads.view(b, hkv, h // hkv, t, d).sum(2)
    dv = dv_heads.view(b, hkv, h // hkv, t, d).sum(2)
    return dq.view(q.shape), dk.to(k.dtype), dv.to(v.dtype)


# ---- the dispatching op: Triton on CUDA tensors, the twin elsewhere ---------------------------------------


@torch.library.custom_op("osp::clipped_attention", mutates_args=())
def _clipped_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, zeta: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return twin_forward(q, k, v, gamma, zeta)


@_clipped_attention_op.register_kernel("cuda")
def _clipped_attention_cuda(q, k, v, gamma, zeta):
    from .kernels import clipped_attention as kernels  # Triton is only needed where a GPU is

    return kernels.forward(q, k, v, gamma, zeta)


# Fake (shape-only) versions for torch.compile. Outputs are contiguous whatever the input strides, as the
# real kernels produce them; empty_like would copy a transposed layout and mislead later view ops.
@_clipped_attention_op.register_fake
def _(q, k, v, gamma, zeta):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("osp::clipped_attention_backward", mutates_args=())
def _clipped_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   lse: torch.Tensor, gamma: float, zeta: float
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return twin_backward(dout, q, k, v, lse, gamma, zeta)


@_clipped_attention_backward_op.register_kernel("cuda")
def _clipped_attention_backward_cuda(dout, q, k, v, lse, gamma, zeta):
    from .kernels import clipped_attention as kernels

    return kernels.backward(dout, q, k, v, lse, gamma, zeta)


@_clipped_attention_backward_op.register_fake
def _(dout, q, k, v, lse, gamma, zeta):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, ctx.gamma, ctx.zeta = inputs
    ctx.save_for_backward(q, k, v, output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = _clipped_attention_backward_op(dout, q, k, v, lse, ctx.gamma, ctx.zeta)
    return dq, dk, dv, None, None


_clipped_attention_op.register_autograd(_backward, setup_context=_setup_context)


def clipped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, zeta: float
                      ) -> torch.Tensor:
    """Causal attention with clipped softmax and scale 1/sqrt(D): q (B, H, T, D), k, v (B, Hkv, T, D) ->
    (B, H, T, D). Differentiable; Triton on CUDA tensors, the torch twin elsewhere."""
    return _clipped_attention_op(q, k, v, float(gamma), float(zeta))[0]
