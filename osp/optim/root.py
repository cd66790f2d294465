"""ROOT (Robust Orthogonalized Optimizer, arXiv 2511.20626): Muon on elementwise-clipped momentum.

Per matrix, the Nesterov momentum u is clipped at ε = quantile_q(|u|) + clip_eps (q = 0.9): the 10%
largest entries — the "outliers" of the soft-threshold split u = clamp(u, ±ε) + T_ε(u) — no longer
steer the orthogonalized direction. Newton–Schulz then uses coefficients for the matrix shape, from
`ns_coefficients` (osp.optim.ns_fit): ROOT's published entry where one exists (2048-based shapes), else
osp's own fit — shipped in root_coefficients.json for the shapes osp trains, fitted on first use
(and memoized per process) for any other. Momentum, scaling, weight decay, AdamW groups and the
distributed split are Muon's (this class only overrides `_robust` and `_coefficients`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from osp.optim.muon import Muon
from osp.optim.newton_schulz import MUON_COEFFICIENTS
from osp.optim.ns_fit import ROOT_COEFFICIENTS, Coefficients, ns_coefficients, shape_key

__all__ = ["ROOT", "ROOT_COEFFICIENTS", "batched_quantile", "ns_coefficients"]

def batched_quantile(x: Tensor, q: float) -> Tensor:
    """q-quantile of each row of x (k, N), equal to torch.quantile(x, q, dim=1) (linear interpolation).

    Uses kthvalue because torch.quantile refuses inputs above 2**24 elements, which a 4096×4096
    matrix already exceeds.
    """
    n = x.size(-1)
    pos = q * (n - 1)
    lo = int(pos)
    low = torch.kthvalue(x, lo + 1, dim=-1).values
    if lo + 1 >= n or pos == lo:
        return low
    high = torch.kthvalue(x, lo + 2, dim=-1).values
    return torch.lerp(low, high, pos - lo)


class ROOT(Muon):
    """ROOT for groups with algorithm "root", AdamW for groups with algorithm "adamw".

    Same arguments as Muon, plus clip_quantile (0.9), clip_eps (1e-9), `coefficients`, the shape
    table {(min(m, n), max(m, n)): (a, b, c)} (ROOT's published one by default), and `fit_missing`:
    shapes missing from the table use `ns_coefficients` (osp's fits) if True, or — as ROOT's own code
    does — Muon's coefficients with one warning per shape if False.
    """

    algorithm = "root"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        clip_quantile: float = 0.9,
        clip_eps: float = 1e-9,
        coefficients: Mapping[tuple[int, int], Coefficients] = ROOT_COEFFICIENTS,
        fit_missing: bool = True,
        **muon_kwargs: Any,
    ) -> None:
        self.coefficient_table = {tuple(k): tuple(v) for k, v in coefficients.items()}
        self.fit_missing = fit_missing
        self._warned_shapes: set[tuple[int, int]] = set()
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, clip_quantile=clip_quantile, clip_eps=clip_eps,
            **muon_kwargs,
        )

    def _robust(self, X: Tensor, group: dict[str, Any]) -> Tensor:
        """Clip each matrix of the batch at its own |u| quantile."""
        eps = batched_quantile(X.abs().flatten(1), group["clip_quantile"]) + group["clip_eps"]
        eps = eps.view(-1, *([1] * (X.ndim - 1)))
        return torch.minimum(torch.maximum(X, -eps), eps)

    def _coefficients(self, shape: torch.Size) -> Coefficients:
        """The table's coefficients for this shape; else osp's fit, or Muon's (warning once) without
        fit_missing."""
        key = shape_key(*shape)
        if key in self.coefficient_table:
            return self.coefficient_table[key]
        if self.fit_missing:
            return ns_coefficients(*key)
        if key not in self._warned_shapes:
            self._warned_shapes.add(key)
            warnings.warn(
                f"ROOT has no Newton-Schulz coefficients for shape {key}; using Muon's {MUON_COEFFICIENTS}",
                stacklevel=2,
            )
        return MUON_COEFFICIENTS
