"""ROOT (Robust Orthogonalized Optimizer, arXiv 2511.20626): Muon on elementwise-clipped momentum.

Per matrix, the Nesterov momentum u is clipped at ε = quantile_q(|u|) + clip_eps (q = 0.9): the 10%
largest entries — the "outliers" of the soft-threshold split u = clamp(u, ±ε) + T_ε(u) — no longer
steer the orthogonalized direction. Newton–Schulz then uses coefficients for the matrix shape, from
`ns_coefficients`: ROOT's published entry where one exists (2048-based shapes), else osp's own fit
(osp.optim.ns_fit) — shipped in root_coefficients.json for the shapes osp trains, fitted on first use
(and memoized per process) for any other. Momentum, scaling, weight decay, AdamW groups and the
distributed split are Muon's (this class only overrides `_robust` and `_coefficients`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from osp.optim.muon import Muon
from osp.optim.newton_schulz import MUON_COEFFICIENTS

Coefficients = tuple[float, float, float]

# Key (min(m, n), max(m, n)) -> (a, b, c) for every iteration (huawei-noah/noah-research ROOT example).
ROOT_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}


def shape_key(m: int, n: int) -> tuple[int, int]:
    """Table key of an m×n matrix: NS orthogonalizes the wide orientation, so (min, max)."""
    return (min(m, n), max(m, n))


FITTED_PATH = Path(__file__).with_name("root_coefficients.json")


def _load_fitted(path: Path = FITTED_PATH) -> dict[tuple[int, int], Coefficients]:
    """The shipped fits ({"coefficients": {"MxN": [a, b, c]}}, written by `python -m osp.optim.ns_fit --write`)."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())["coefficients"]
    return {shape_key(*map(int, k.split("x"))): tuple(float(x) for x in v) for k, v in table.items()}  # type: ignore[misc]


# Shipped fits, then fits made at run time (per process): key -> (a, b, c).
FITTED_COEFFICIENTS: dict[tuple[int, int], Coefficients] = _load_fitted()


def ns_coefficients(m: int, n: int) -> Coefficients:
    """The Newton–Schulz (a, b, c), used at all 5 steps, that ROOT uses for an m×n matrix.

    ROOT's published entry where it has one; else the shipped fit; else a fit made now and memoized
    for the process. A run-time fit is cheap (~0.1 s): 200 Nelder–Mead evaluations on the singular
    values of 3 Gaussian matrices, drawn at a same-aspect proxy with min dim 256 when the matrix is
    larger (see osp.optim.ns_fit). Deterministic, so every rank of a distributed run agrees.
    """
    key = shape_key(m, n)
    if key in ROOT_COEFFICIENTS:
        return ROOT_COEFFICIENTS[key]
    if key not in FITTED_COEFFICIENTS:
        from osp.optim.ns_fit import MAX_EVALS, PROXY_MIN, fit_coefficients  # ns_fit imports this module

        FITTED_COEFFICIENTS[key] = fit_coefficients(
            *key, max_evals=MAX_EVALS["runtime"], proxy_min=PROXY_MIN["runtime"]
        )
    return FITTED_COEFFICIENTS[key]


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
            params, lr=lr, weight_decay=weight_decay, clip_quantile=clip_quantile, clip_eps=clip_eps, **muon_kwargs
        )

    def _robust(self, X: Tensor, group: dict[str, Any]) -> Tensor:
        """Clip each matrix of the batch at its own |u| quantile."""
        eps = batched_quantile(X.abs().flatten(1), group["clip_quantile"]) + group["clip_eps"]
        eps = eps.view(-1, *([1] * (X.ndim - 1)))
        return torch.minimum(torch.maximum(X, -eps), eps)

    def _coefficients(self, shape: torch.Size) -> Coefficients:
        """The table's coefficients for this shape; else osp's fit, or Muon's (warning once) without fit_missing."""
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
