"""Ridge regression whose penalty is chosen inside the training rows it is given.

`fit_ridge(x, y, groups, alphas, folds)` minimises mean_rows ||y - x w - b||² + alpha ||w||² in closed form, on
features standardised with the training rows' own mean and std (a constant feature keeps scale 1) and an
unpenalised intercept. Alpha is chosen from `alphas` by k-fold cross-validation over `groups` (images: one image's
patches never straddle folds; fold = the group's rank mod k, k = min(folds, groups), so the same rows always make
the same choice), minimising the held-out squared error; with a single group, by generalised cross-validation over
rows (GCV, Golub, Heath & Wahba 1979). Ties go to the larger penalty. As DINOv2's eval/log_regression.py does, the
choice never sees evaluation data: the caller passes the training subset only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS_STD = 1e-6


@dataclass(frozen=True)
class Standardised:
    """A training set's feature mean and std and target mean (float64)."""

    mean: torch.Tensor
    std: torch.Tensor
    y_mean: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> "Standardised":
        std = x.std(0, unbiased=False)
        return cls(x.mean(0), torch.where(std > EPS_STD, std, torch.ones_like(std)), y.mean(0))

    def x(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


@dataclass(frozen=True)
class RidgePath:
    """Solutions for every alpha on one training set, from one eigendecomposition of its Gram matrix."""

    norm: Standardised
    weights: torch.Tensor          # [alphas, d, k]
    eigenvalues: torch.Tensor
    rows: int


def ridge_path(x: torch.Tensor, y: torch.Tensor, alphas: list[float]) -> RidgePath:
    x, y = x.double(), y.double()
    norm = Standardised.of(x, y)
    xs, yc = norm.x(x), y - norm.y_mean
    e, v = torch.linalg.eigh(xs.T @ xs)
    e = e.clamp_min(0.0)
    vxy = v.T @ (xs.T @ yc)
    n = x.shape[0]
    shrink = 1.0 / (e[None, :] + torch.tensor(alphas, dtype=e.dtype)[:, None] * n)      # [alphas, d]
    return RidgePath(norm, v @ (shrink[:, :, None] * vxy), e, n)


def predict(norm: Standardised, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [n, d] -> [n, k] for one weight [d, k]; [alphas, n, k] for a stack [alphas, d, k]."""
    return norm.x(x) @ weight + norm.y_mean


def kfold_errors(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, alphas: list[float],
                 folds: int) -> torch.Tensor:
    """Mean held-out squared error per alpha, k-fold over groups (k = min(folds, groups))."""
    uniq = torch.unique(groups)
    k = min(folds, len(uniq))
    fold = (torch.arange(len(uniq)) % k)[torch.searchsorted(uniq, groups)]
    err = torch.zeros(len(alphas), dtype=torch.float64)
    for f in range(k):
        held = fold == f
        path = ridge_path(x[~held], y[~held], alphas)
        err += ((y[held].double() - predict(path.norm, path.weights, x[held])) ** 2).sum((1, 2))
    return err / x.shape[0]


def gcv_errors(x: torch.Tensor, y: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """GCV per alpha: n RSS / (n - tr H - 1)² (the 1: the intercept's degree of freedom)."""
    path = ridge_path(x, y, alphas)
    n, e = path.rows, path.eigenvalues
    rss = ((y.double() - predict(path.norm, path.weights, x)) ** 2).sum((1, 2))
    dof = (e[None, :] / (e[None, :] + torch.tensor(alphas, dtype=e.dtype)[:, None] * n)).sum(1) + 1.0
    return n * rss / (n - dof).clamp_min(1e-9) ** 2


@dataclass(frozen=True)
class RidgeFit:
    norm: Standardised
    weight: torch.Tensor
    alpha: float
    choice: dict = field(default_factory=dict)   # how alpha was chosen: method, folds, the score per alpha

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.norm, self.weight, x)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, alphas: list[float],
              folds: int = 5) -> RidgeFit:
    """x [n, d], y [n, k], groups [n] (the image of each row); see the module docstring."""
    if y.ndim == 1:
        y = y[:, None]
    alphas = sorted(float(a) for a in alphas)
    n_groups = len(torch.unique(groups))
    if n_groups >= 2 and len(alphas) > 1:
        scores, method = kfold_errors(x, y, groups, alphas, folds), "kfold"
    elif len(alphas) > 1:
        scores, method = gcv_errors(x, y, alphas), "gcv"
    else:
        scores, method = torch.zeros(1, dtype=torch.float64), "fixed"
    best = len(alphas) - 1 - int(torch.argmin(scores.flip(0)))   # ties: the larger penalty
    path = ridge_path(x, y, [alphas[best]])
    choice = {"method": method, "folds": min(folds, n_groups) if method == "kfold" else None,
              "alphas": alphas, "scores": [float(s) for s in scores]}
    return RidgeFit(path.norm, path.weights[0], alphas[best], choice)
