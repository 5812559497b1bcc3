"""Fréchet distance between Gaussians fitted to feature sets (FID/FVD, Heusel et al. 2017).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

Statistics are accumulated and stored in float64; the matrix square root uses scipy's sqrtm
(as clean-fid / StyleGAN do), discarding the tiny imaginary part numerical error produces.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass
class FeatureStats:
    """Running first and second moments of a feature set (float64)."""

    dim: int
    n: int = 0
    sum_D: np.ndarray | None = None
    sum_DD: np.ndarray | None = None

    def update(self, feats_ND: np.ndarray) -> None:
        feats_ND = np.asarray(feats_ND, dtype=np.float64)
        if feats_ND.ndim != 2 or feats_ND.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {feats_ND.shape}")
        if self.sum_D is None:
            self.sum_D = np.zeros(self.dim)
            self.sum_DD = np.zeros((self.dim, self.dim))
        self.n += feats_ND.shape[0]
        self.sum_D += feats_ND.sum(0)
        self.sum_DD += feats_ND.T @ feats_ND

    @property
    def mu(self) -> np.ndarray:
        return self.sum_D / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (as np.cov)."""
        if self.n < 2:
            raise ValueError("need at least 2 samples for a covariance")
        mu = self.mu
        return (self.sum_DD - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str) -> None:
        """Atomic write of mu/sigma/n to an .npz file."""
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
        os.close(fd)
        np.savez(tmp, sum_D=self.sum_D, sum_DD=self.sum_DD, n=self.n, dim=self.dim)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        z = np.load(path)
        return cls(dim=int(z["dim"]), n=int(z["n"]), sum_D=z["sum_D"], sum_DD=z["sum_DD"])

    @classmethod
    def from_features(cls, feats_ND: np.ndarray) -> "FeatureStats":
        s = cls(dim=np.asarray(feats_ND).shape[1])
        s.update(feats_ND)
        return s


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"shape mismatch: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}")
    diff = mu_a - mu_b
    covmean, _ = scipy.linalg.sqrtm(sigma_a @ sigma_b, disp=False)
    if not np.isfinite(covmean).all():
        # Singular product: regularise as clean-fid / pytorch-fid do.
        eps = 1e-6 * np.eye(sigma_a.shape[0])
        covmean = scipy.linalg.sqrtm((sigma_a + eps) @ (sigma_b + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
