"""EmbProj: learnable d x d maps after the token embedding and before the LM head, and their merge."""

from __future__ import annotations

import torch
from torch import nn


class EmbProj(nn.Linear):
    """A bias-free d x d map with orthogonal init: OSP's rot1 (after the embedding) or rot2 (before the head).

    Folds exactly into the embedding and head at export (`merge_emb_proj`).
    """

    folds_into_llama = True
    osp_custom_init = True  # Transformer.reset_parameters keeps the orthogonal init

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, bias=False)

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.weight)


@torch.no_grad()
def merge_emb_proj(
    embedding: torch.Tensor, head: torch.Tensor, proj_in: torch.Tensor, proj_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold EmbProj into the embedding and head: E' = E R1^T, W_head' = W_head R2.

    With y = x W^T (PyTorch convention) the model computes h0 = E[t] R1^T and logits = (R2 n) W_head^T
    = n (W_head R2)^T, so the merged pair reproduces both exactly (up to fp rounding).
    Computed in fp64 so the merge adds no error beyond the final cast.
    """
    merged_embedding = (embedding.double() @ proj_in.double().T).to(embedding.dtype)
    merged_head = (head.double() @ proj_out.double()).to(head.dtype)
    return merged_embedding, merged_head
