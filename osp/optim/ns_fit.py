"""Fit quintic Newton–Schulz coefficients (a, b, c) to a matrix shape, as ROOT does for its shape table.

Why the fit works on singular values only: every NS step X ← aX + b(XXᵀ)X + c(XXᵀ)²X maps X = U·S·Vᵀ
to U·p(S)·Vᵀ with p(s) = a·s + b·s³ + c·s⁵, so after k steps the singular values are p∘…∘p(sᵢ) and the
singular vectors never change. The orthogonalization error of a matrix — mean |σᵢ − 1| of the result —
is therefore a function of its *initial* singular values alone, and is computed exactly (in float64)
without running a single matrix product. In fp32 this matches running the matrix NS to 1e-4 (bf16
adds ≤ 2e-4), so one SVD per sample matrix, then hundreds of cheap polynomial evaluations, is a fit.

What is fitted: singular values of Frobenius-normalized Gaussian matrices of the shape (a few seeds;
normalized as osp.optim.newton_schulz does, so all sᵢ ≤ 1). Large shapes use a proxy of the same aspect
ratio whose singular values are rescaled by sqrt(k/m): the normalized singular values of an m×n Gaussian
matrix follow the Marchenko–Pastur law for ratio m/n scaled by 1/sqrt(m), so the proxy has the same
spectrum shape at the right scale. The optimizer is a small deterministic Nelder–Mead (scipy is not a
dependency) started from Muon's coefficients and from the nearest official ROOT entry; the best result
wins, so a fit is never worse than either start on its samples.

Stability: coefficients are rejected unless the iteration is bounded for any number of steps — with
h = max(1, max p([0, 1])) ≤ 1.5, p must map [0, h] into [0, h] (Muon: h ≈ 1.20) — and every s from the
largest sampled singular value up to 1 ends at ≥ 0.5. Gaussian spectra only probe small s, while momentum
can have a dominant direction with s near 1: the bounds keep a fitted iteration from blowing such a
direction up, flipping its sign or suppressing it, and keep it safe if ns_steps is raised. Without the
first bound the best 5-step fits grow their largest iterate at every step (1.03, 1.06, 1.10, 1.19, 1.5):
they are tuned to stop just before diverging. (The official (2048, 2048) entry does exactly that — its
iterates reach 3.3 by step 5 for s ≈ 0.56; ROOT still uses it as published, but no fit starts from it.)

`python -m osp.optim.ns_fit --shapes 2048x2048 2048x8192` prints the errors of Muon's, the official and
the fitted coefficients per shape; `--write osp/optim/root_coefficients.json` regenerates the shipped table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from osp.atomic import write_text
from osp.optim.newton_schulz import MUON_COEFFICIENTS

STEPS = 5
STABLE_MAX = 1.5
GUARD_MIN = 0.5
FIT_SEEDS = (0, 1, 2)
EVAL_SEED = 1000  # held out from every fit
# Shapes with a larger min(m, n) are fitted on a same-aspect proxy with this min dim (see module doc).
PROXY_MIN = {"cache": 1024, "runtime": 256}
MAX_EVALS = {"cache": 600, "runtime": 200}
_GRID = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64, device="cpu")

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
    """The shipped fits ({"coefficients": {"MxN": [a, b, c]}}, written by
    `python -m osp.optim.ns_fit --write`)."""
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
        FITTED_COEFFICIENTS[key] = fit_coefficients(
            *key, max_evals=MAX_EVALS["runtime"], proxy_min=PROXY_MIN["runtime"]
        )
    return FITTED_COEFFICIENTS[key]


OFFICIAL_COEFFICIENTS = ROOT_COEFFICIENTS


def iterate(s: Tensor, abc: Sequence[float], steps: int = STEPS) -> Tensor:
    """Singular values after `steps` NS steps from singular values s (exact, see module doc)."""
    for _ in range(steps):
        s = _poly(s, abc)
    return s


def orthogonality_error(s: Tensor, abc: Sequence[float], steps: int = STEPS) -> float:
    """mean |σ − 1| of the NS result of matrices with normalized singular values s."""
    return (iterate(s, abc, steps).abs() - 1.0).abs().mean().item()


def _poly(s: Tensor, abc: Sequence[float]) -> Tensor:
    a, b, c = abc
    s2 = s * s
    return s * (a + s2 * (b + c * s2))


def is_stable(abc: Sequence[float], steps: int = STEPS, guard_from: float = 1.0) -> bool:
    """NS with these coefficients stays bounded for any number of steps, and orthogonalizes large s.

    Bounded: with h = max(1, max p([0, 1])) ≤ STABLE_MAX, p maps [0, h] into [0, h], so every iterate
    of every s ∈ [0, 1] stays in [0, h] however many steps run (ns_steps is configurable). Large s: after
    `steps` steps every s ∈ [guard_from, 1] ends at ≥ GUARD_MIN (orthogonalized, not suppressed).
    """
    if not all(math.isfinite(x) for x in abc):
        return False
    h = max(1.0, float(_poly(_GRID, abc).max()))
    if h > STABLE_MAX:
        return False
    image = _poly(_GRID * h, abc)
    if float(image.min()) < 0.0 or float(image.max()) > h * (1.0 + 1e-6):  # grid tolerance
        return False
    return float(iterate(_GRID[_GRID >= min(guard_from, 1.0)], abc, steps).min()) >= GUARD_MIN


def sample_singular_values(
    m: int, n: int, seeds: Iterable[int] = FIT_SEEDS, proxy_min: int | None = None
) -> Tensor:
    """Singular values (float64, concatenated over seeds) of Frobenius-normalized Gaussian m×n matrices.

    If min(m, n) > proxy_min, a proxy k×round(k·max/min) matrix (k = proxy_min) is drawn instead and its
    singular values are rescaled by sqrt(k / min(m, n)).
    """
    lo, hi = shape_key(m, n)
    k, width, scale = lo, hi, 1.0
    if proxy_min is not None and lo > proxy_min:
        k, width = proxy_min, max(proxy_min, round(proxy_min * hi / lo))
        scale = math.sqrt(k / lo)
    out = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        G = torch.randn(k, width, generator=gen, dtype=torch.float32, device="cpu").double()
        G = G / torch.linalg.matrix_norm(G)
        out.append(torch.linalg.eigvalsh(G @ G.mT).clamp_min(0.0).sqrt() * scale)
    return torch.cat(out)


def nelder_mead(
    f: Callable[[list[float]], float],
    x0: Sequence[float],
    step: float = 0.05,
    max_evals: int = 400,
    tol: float = 1e-9,
) -> tuple[list[float], float]:
    """Minimize f from x0 with the standard Nelder–Mead simplex (deterministic; f may return inf)."""
    dim = len(x0)
    simplex = [list(map(float, x0))]
    for i in range(dim):
        x = list(map(float, x0))
        x[i] += step * (abs(x[i]) if x[i] != 0 else 1.0)
        simplex.append(x)
    values = [f(x) for x in simplex]
    evals = len(simplex)

    def towards(x: list[float], y: list[float], t: float) -> list[float]:
        return [xi + t * (yi - xi) for xi, yi in zip(x, y)]

    while evals < max_evals:
        order = sorted(range(dim + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if math.isfinite(values[-1]) and values[-1] - values[0] <= tol:
            break
        centroid = [sum(x[i] for x in simplex[:-1]) / dim for i in range(dim)]
        reflected = towards(simplex[-1], centroid, 2.0)
        fr = f(reflected)
        evals += 1
        if fr < values[0]:
            expanded = towards(simplex[-1], centroid, 3.0)
            fe = f(expanded)
            evals += 1
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            inside = fr >= values[-1]
            contracted = towards(simplex[-1], centroid, 0.5 if inside else 1.5)
            fc = f(contracted)
            evals += 1
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best vertex
                for i in range(1, dim + 1):
                    simplex[i] = towards(simplex[0], simplex[i], 0.5)
                    values[i] = f(simplex[i])
                evals += dim
    best = min(range(dim + 1), key=lambda i: values[i])
    return simplex[best], values[best]


def nearest_official(
    m: int, n: int, table: Mapping[tuple[int, int], Coefficients] = OFFICIAL_COEFFICIENTS
) -> tuple[int, int]:
    """Official key closest in log-aspect-ratio first, log-size second (aspect shapes the spectrum most)."""
    lo, hi = shape_key(m, n)
    return min(
        table, key=lambda k: (abs(math.log(k[1] / k[0]) - math.log(hi / lo)), abs(math.log(k[0] / lo)))
    )


def fit_coefficients(
    m: int,
    n: int,
    seeds: Iterable[int] = FIT_SEEDS,
    max_evals: int = MAX_EVALS["cache"],
    proxy_min: int | None = PROXY_MIN["cache"],
    steps: int = STEPS,
) -> Coefficients:
    """(a, b, c) minimizing the mean |σ − 1| after `steps` NS steps on Gaussian m×n matrices, stable on
    [0, 1].

    Deterministic (fixed seeds, deterministic optimizer); rounded to 6 decimals unless that breaks stability.
    """
    s = sample_singular_values(m, n, seeds, proxy_min)

    guard = float(s.max())

    def loss(abc: Sequence[float]) -> float:
        return orthogonality_error(s, abc, steps) if is_stable(abc, steps, guard) else math.inf

    starts = [MUON_COEFFICIENTS, OFFICIAL_COEFFICIENTS[nearest_official(m, n)]]
    best, best_loss = tuple(MUON_COEFFICIENTS), loss(MUON_COEFFICIENTS)
    for start in starts:
        # e.g. the official (2048, 2048) entry, which diverges near s = 0.6
        if not math.isfinite(loss(start)):
            continue
        x, fx = nelder_mead(loss, start, max_evals=max_evals)
        rounded = tuple(round(v, 6) for v in x)
        x, fx = (rounded, loss(rounded)) if math.isfinite(loss(rounded)) else (tuple(x), fx)
        if fx < best_loss:
            best, best_loss = x, fx
    return best  # type: ignore[return-value]


def _parse_shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def _eval_values(m: int, n: int) -> Tensor:
    """Held-out singular values: the full shape up to 2**25 elements (exact protocol), a proxy above."""
    return sample_singular_values(m, n, [EVAL_SEED], proxy_min=None if m * n <= 2**25 else PROXY_MIN["cache"])


def main(argv: Sequence[str] | None = None) -> None:
    """Print Muon / official / fitted errors per shape; optionally write the fitted table as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", required=True, help="shapes as MxN, e.g. 2048x8192")
    parser.add_argument(
        "--refit", action="store_true", help="fit every shape now instead of using ROOT's table"
    )
    parser.add_argument("--write", type=Path, help="write the fits to this JSON file (implies --refit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    refit = args.refit or args.write is not None

    fits: dict[str, list[float]] = {}
    print(f"mean |sigma - 1| after {STEPS} NS steps, Frobenius-normalized Gaussian matrix, seed {EVAL_SEED}")
    print("| shape | Muon | official (entry) | fitted | fitted (a, b, c) | ROOT uses |")
    print("|---|---|---|---|---|---|")
    for text in args.shapes:
        m, n = _parse_shape(text)
        key = shape_key(m, n)
        fitted = fit_coefficients(m, n)
        if key not in OFFICIAL_COEFFICIENTS:  # official entries win, so they are not shipped
            fits[f"{key[0]}x{key[1]}"] = list(fitted)
        used = ns_coefficients(m, n) if not refit else None
        s = _eval_values(m, n)
        near = nearest_official(m, n)
        official = orthogonality_error(s, OFFICIAL_COEFFICIENTS[near])
        tag = "exact" if near == key else f"nearest {near[0]}x{near[1]}"
        source = (
            "" if used is None else ("official" if key in OFFICIAL_COEFFICIENTS else "fitted") + f" {used}"
        )
        print(
            f"| {key[0]}x{key[1]} | {orthogonality_error(s, MUON_COEFFICIENTS):.4f} | {official:.4f} ({tag}) "
            f"| {orthogonality_error(s, fitted):.4f} | ({fitted[0]:.4f}, {fitted[1]:.4f}, {fitted[2]:.4f}) "
            f"| {source} |",
            flush=True,
        )
    if args.write is not None:
        payload = {
            "about": "ROOT Newton-Schulz (a, b, c) per shape 'min x max', fitted by osp.optim.ns_fit "
            f"(mean |sigma-1| after {STEPS} steps, Gaussian seeds {list(FIT_SEEDS)}, proxy min dim "
            f"{PROXY_MIN['cache']}); official ROOT entries take precedence",
            "coefficients": fits,
        }
        write_text(args.write, json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
