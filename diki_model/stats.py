"""Per-task Gaussian statistics of frozen image features (the "D" in DIKI).

Each task i is summarised by a Gaussian N(mu_i, Sigma_i) of the frozen, L2-normalised CLIP
image embeddings of its training images. A test image is scored against every task at once
(``S_i = log N(f(x); mu_i, Sigma_i)``); the argmax picks the adapter and the calibration maps the
winning score to a gate.

Design:
- ``GaussianAccumulator`` keeps *sufficient statistics* in float64 (count, sum, sum of outer
  products, plus two scalars/vectors for the Ledoit-Wolf intensity), so shards and workers fit
  separately and merge exactly: merge(fit(a), fit(b)) == fit(a + b).
- ``finalize`` turns them into a covariance that stays positive definite when a task has fewer
  images than feature dimensions (Ledoit-Wolf shrinkage by default; the authors' plain sample
  covariance + 1e-7 I is available as ``shrinkage="paper"`` and is singular in that regime).
- ``GaussianScorer`` scores all tasks in one batched operation from cached whitening factors
  (the inverse Cholesky factor and the log-determinant), never rebuilding distribution objects.
  Scoring runs in float32 with TF32 disabled (or float64): TF32 matmuls shift log-densities of
  512-d features by several nats, enough to flip the argmax.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SHRINKAGE_METHODS = ("ledoit_wolf", "oas", "paper")


class GaussianAccumulator:
    """Mergeable sufficient statistics of a set of d-dimensional feature vectors (float64)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        # Extra moments for the Ledoit-Wolf intensity, which needs sum_i ||x_i - mu||^4:
        # sum ||y||^4 and sum ||y||^2 y (both trivial for unit vectors, tracked anyway so the
        # accumulator is exact for any features).
        self.sum_sqnorm2 = torch.zeros((), dtype=torch.float64)
        self.sum_sqnorm_y = torch.zeros(dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> GaussianAccumulator:
        """Add a batch of features, shape (N, d). Returns self."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(features.shape)}")
        y = features.detach().to(device="cpu", dtype=torch.float64)
        sq = (y * y).sum(dim=1)
        self.count += y.shape[0]
        self.sum += y.sum(dim=0)
        self.outer += y.T @ y
        self.sum_sqnorm2 += (sq * sq).sum()
        self.sum_sqnorm_y += (sq[:, None] * y).sum(dim=0)
        return self

    def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Add another accumulator's statistics into this one (exact). Returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        self.sum_sqnorm2 += other.sum_sqnorm2
        self.sum_sqnorm_y += other.sum_sqnorm_y
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": self.sum.clone(),
            "outer": self.outer.clone(),
            "sum_sqnorm2": self.sum_sqnorm2.clone(),
            "sum_sqnorm_y": self.sum_sqnorm_y.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianAccumulator:
        acc = cls(int(state["sum"].shape[0]))
        acc.count = int(state["count"])
        acc.sum = state["sum"].to(torch.float64).clone()
        acc.outer = state["outer"].to(torch.float64).clone()
        acc.sum_sqnorm2 = state["sum_sqnorm2"].to(torch.float64).clone()
        acc.sum_sqnorm_y = state["sum_sqnorm_y"].to(torch.float64).clone()
        return acc

    def mean(self) -> torch.Tensor:
        self._require(1)
        return self.sum / self.count

    def covariance_mle(self) -> torch.Tensor:
        """Maximum-likelihood covariance (divides by n), as scikit-learn's estimators use."""
        self._require(1)
        mu = self.mean()
        cov = self.outer / self.count - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def finalize(self, shrinkage: str = "ledoit_wolf", eps: float = 1e-7) -> Gaussian:
        """Turn the statistics into a Gaussian whose covariance is positive definite.

        shrinkage:
          - ``"ledoit_wolf"`` (default): Ledoit-Wolf shrinkage towards a scaled identity, computed
            exactly from the accumulated moments; identical to ``sklearn.covariance.ledoit_wolf``.
          - ``"oas"``: Oracle Approximating Shrinkage (``sklearn.covariance.oas``).
          - ``"paper"``: the authors' choice, unbiased sample covariance + ``eps`` * I. Singular
            (up to eps) when the task has fewer images than feature dimensions.
        """
        if shrinkage not in SHRINKAGE_METHODS:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; choose one of {SHRINKAGE_METHODS}")
        self._require(2)
        mu = self.mean()
        d, n = self.dim, self.count
        eye = torch.eye(d, dtype=torch.float64)
        if shrinkage == "paper":
            cov = self.covariance_mle() * (n / (n - 1)) + eps * eye
            return Gaussian(mu, cov)
        s = self.covariance_mle()
        trace_s = torch.trace(s)
        target = trace_s / d
        if shrinkage == "oas":
            alpha = (s * s).sum() / d**2  # mean of the squared entries of S
            num = alpha + target**2
            den = (n + 1) * (alpha - target**2 / d)
            rho = torch.tensor(1.0, dtype=torch.float64) if den == 0 else torch.clamp(num / den, max=1.0)
        else:
            rho = self._ledoit_wolf_intensity(mu, s, target)
        cov = (1 - rho) * s + rho * target * eye
        # A tiny floor keeps degenerate inputs (all images identical) factorisable.
        cov = cov + eps * eye
        return Gaussian(mu, cov, shrinkage=float(rho))

    def _ledoit_wolf_intensity(self, mu: torch.Tensor, s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, d = self.count, self.dim
        # sum_i ||x_i||^4 with x_i = y_i - mu, expanded in the accumulated moments.
        mm = mu @ mu
        sum_ymu = self.sum @ mu
        sum_ymu2 = mu @ self.outer @ mu
        sum_sq = torch.trace(self.outer)
        sum_x4 = (
            self.sum_sqnorm2
            + 4 * sum_ymu2
            + n * mm**2
            - 4 * (self.sum_sqnorm_y @ mu)
            + 2 * mm * sum_sq
            - 4 * mm * sum_ymu
        )
        # beta = 1/n^2 sum_i ||x_i x_i^T - S||_F^2 = 1/n^2 (sum ||x||^4 - n ||S||_F^2)
        s_fro2 = (s * s).sum()
        beta = (sum_x4 / n - s_fro2) / n
        delta = s_fro2 - 2 * target * torch.trace(s) + d * target**2  # ||S - mu I||_F^2
        beta = torch.clamp(beta, min=0.0)
        if delta <= 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return torch.clamp(beta / delta, max=1.0)

    def _require(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"need at least {n} feature vectors to fit a Gaussian, got {self.count}")


@dataclass
class Gaussian:
    """A fitted task Gaussian (float64)."""

    mean: torch.Tensor  # (d,)
    cov: torch.Tensor  # (d, d)
    shrinkage: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L^-1, log det Sigma) with Sigma = L L^T; raises a clear error if not PD."""
        chol, info = torch.linalg.cholesky_ex(self.cov.to(torch.float64))
        if int(info) != 0:
            raise ValueError("task covariance is not positive definite; use a shrinkage estimator")
        inv_chol = torch.linalg.solve_triangular(chol, torch.eye(self.dim, dtype=torch.float64), upper=False)
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        return inv_chol, logdet

    def log_prob(self, features: torch.Tensor) -> torch.Tensor:
        """Log-density of (N, d) features, float64 (reference path, one task)."""
        return GaussianScorer([self], dtype=torch.float64).score(features)[:, 0]


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    prev_mm = torch.backends.cuda.matmul.allow_tf32
    prev_prec = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_mm
        torch.set_float32_matmul_precision(prev_prec)


class GaussianScorer:
    """Scores features against every task in one batched operation.

    Caches, per task, W_i = L_i^-1 and b_i = L_i^-1 mu_i, so that
    ``log N(x; mu_i, Sigma_i) = -0.5 * (||W_i x - b_i||^2 + d log 2pi + log det Sigma_i)``.
    """

    def __init__(
        self,
        gaussians: list[Gaussian],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        task_chunk: int = 64,
        split_tf32: bool = True,
    ) -> None:
        if not gaussians:
            raise ValueError("GaussianScorer needs at least one task Gaussian")
        dims = {g.dim for g in gaussians}
        if len(dims) != 1:
            raise ValueError(f"task Gaussians have different feature dims: {sorted(dims)}")
        self.dim = dims.pop()
        self.num_tasks = len(gaussians)
        self.dtype = dtype
        self.task_chunk = task_chunk
        self.use_split = split_tf32
        ws, bs, consts = [], [], []
        for g in gaussians:
            w, logdet = g.whitening()
            ws.append(w)
            bs.append(w @ g.mean.to(torch.float64))
            consts.append(-0.5 * (logdet + self.dim * math.log(2 * math.pi)))
        self.w = torch.stack(ws).to(device=device, dtype=dtype)  # (T, d, d)
        self.b = torch.stack(bs).to(device=device, dtype=dtype)  # (T, d)
        self.const = torch.stack(consts).to(device=device, dtype=torch.float64)  # (T,)
        self._w_split: tuple[torch.Tensor, torch.Tensor] | None = None

    def _whiten_3xtf32(self, start: int, stop: int, x_hi: torch.Tensor, x_lo: torch.Tensor) -> torch.Tensor:
        if self._w_split is None:
            self._w_split = split_tf32(self.w)
        w_hi, w_lo = self._w_split
        return _whiten_3xtf32_impl(w_hi[start:stop], w_lo[start:stop], x_hi, x_lo)

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Log-densities, shape (N, T), float64 (accumulated in ``self.dtype``)."""
        x = features.to(device=self.w.device, dtype=self.dtype)
        out = torch.empty(x.shape[0], self.num_tasks, dtype=torch.float64, device=self.w.device)
        # Scores decide the adapter: never let an outer autocast or TF32 lower their precision.
        with _no_tf32(), torch.autocast(self.w.device.type, enabled=False):
            split = self.use_split and self.dtype == torch.float32 and x.is_cuda
            x_hi, x_lo = split_tf32(x) if split else (x, None)
            for start in range(0, self.num_tasks, self.task_chunk):
                stop = min(start + self.task_chunk, self.num_tasks)
                # (t, d, d) x (N, d) -> (t, N, d): whitened, centred features per task.
                if split:
                    z = self._whiten_3xtf32(start, stop, x_hi, x_lo) - self.b[start:stop, None, :]
                else:
                    z = torch.einsum("tij,nj->tni", self.w[start:stop], x) - self.b[start:stop, None, :]
                maha = (z * z).sum(dim=-1).to(torch.float64)  # (t, N)
                out[:, start:stop] = (self.const[start:stop, None] - 0.5 * maha).T
        return out


def split_tf32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t = hi + lo with hi exactly representable in TF32 (10 mantissa bits)."""
    hi = (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    return hi, t - hi


def _whiten_3xtf32_impl(w_hi: torch.Tensor, w_lo: torch.Tensor, x_hi: torch.Tensor, x_lo: torch.Tensor) -> torch.Tensor:
    # Three TF32 tensor-core products recover float32 accuracy (the lo x lo term is below float32
    # rounding) at several times the speed of plain float32 matmuls on GPUs with TF32 units.
    prec = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        z = torch.einsum("tij,nj->tni", w_hi, x_hi)
        z += torch.einsum("tij,nj->tni", w_hi, x_lo)
        z += torch.einsum("tij,nj->tni", w_lo, x_hi)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prec
    return z


@dataclass
class ScoreStats:
    """Mean and std of a task's log-density on held-out in-distribution images.

    Used by the standardised gate; mergeable across workers through (count, sum, sum of squares).
    """

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def update(self, scores: torch.Tensor) -> ScoreStats:
        s = scores.detach().to(torch.float64).flatten()
        self.count += int(s.numel())
        self.total += float(s.sum())
        self.total_sq += float((s * s).sum())
        return self

    def merge(self, other: ScoreStats) -> ScoreStats:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        return self

    @property
    def mean(self) -> float:
        if self.count == 0:
            raise ValueError("no held-out scores recorded")
        return self.total / self.count

    @property
    def std(self) -> float:
        if self.count < 2:
            raise ValueError("need at least 2 held-out scores for a standard deviation")
        var = (self.total_sq - self.count * self.mean**2) / (self.count - 1)
        return math.sqrt(max(var, 0.0))
