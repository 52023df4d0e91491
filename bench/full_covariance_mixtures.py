"""Gaussian mixtures with full, anisotropic covariances: problems the tuned samplers and DPM-Solver-v3 were not
developed on, for `tune_accuracy --mixture`.

The tables of docs/samplers.md were measured, and the methods built, on one isotropic mixture
(tests/gaussian_mixture.py: 4 components, s_k² I covariances). These mixtures are written apart from that file
(their own exact noise prediction) and differ in what matters to a solver: covariances with eigenvalues spread
over two decades (so the model is far from one scalar times x, the part DPM-Solver-v3's statistics capture),
other dimensions, more components and unequal weights.

    p0  = Σ_k w_k N(μ_k, Σ_k),   Σ_k = U_k diag(e_k) U_kᵀ
    x_t = α_t x0 + σ_t ε
    ε*(x, t) = σ_t Σ_k γ_k(x) U_k diag(1 / (α_t² e_k + σ_t²)) U_kᵀ (x − α_t μ_k),
    γ = softmax_k(log w_k + log N(x; α_t μ_k, α_t² Σ_k + σ_t² I))
"""
from __future__ import annotations

import math

import torch

# name: (dimension, components, mean spread, eigenvalue range of the covariances, generator seed)
MIXTURES = {
    "full-a": (32, 6, 0.6, (0.02, 1.0), 2026),
    "full-b": (48, 8, 0.8, (0.01, 0.5), 1203),
}


class FullCovarianceMixture:
    """p0 = Σ_k weights[k] N(means[k], U_k diag(eigenvalues[k]) U_kᵀ) under `schedule` (an object with
    marginal_alpha(t) and marginal_std(t) for t of shape [B])."""

    def __init__(self, weights, means, bases, eigenvalues, schedule):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)              # [K, D]
        self.bases = torch.as_tensor(bases, dtype=torch.float64)              # [K, D, D], orthonormal columns
        self.eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)  # [K, D]
        self.schedule = schedule
        self.dim = self.means.shape[1]
        # U_kᵀ as one [D, K·D] matrix (x @ it is every U_kᵀ x at once) and U_kᵀ μ_k
        self.stacked_bases = self.bases.permute(1, 0, 2).reshape(self.dim, -1).contiguous()
        self.rotated_means = torch.einsum("kd,kde->ke", self.means, self.bases)
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(stacked_bases, rotated_means) on `device`, copied there once."""
        kept = self._copies.get(device)
        if kept is None:
            kept = self._copies[device] = (self.stacked_bases.to(device), self.rotated_means.to(device))
        return kept

    @classmethod
    def named(cls, name: str, schedule) -> FullCovarianceMixture:
        """One of MIXTURES: random orthonormal bases (QR of a Gaussian matrix), log-uniform eigenvalues in the
        range, means of norm ≈ spread·√D, weights uniform in [0.2, 1.2] before normalising."""
        if name not in MIXTURES:
            raise ValueError(f"unknown mixture {name!r}; choose one of {sorted(MIXTURES)}")
        dim, k, spread, (lo, hi), seed = MIXTURES[name]
        g = torch.Generator().manual_seed(seed)
        weights = 0.2 + torch.rand(k, generator=g, dtype=torch.float64)
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        bases = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64)).Q
        u = torch.rand(k, dim, generator=g, dtype=torch.float64)
        eigenvalues = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return cls(weights, means, bases, eigenvalues, schedule)

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """ε*(x, t) for x of shape [B, D] (float64, on any device), t a number or a tensor of shape [] / [1] / [B].

        The variances depend on t alone, so when the batch shares one time (as a sampler's calls do) they are computed
        once for it; the rotations are two [B, D] × [D, K·D] products."""
        n, k, d = x.shape[0], *self.means.shape
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu().expand(n)  # the schedule's tables
        if n and bool((t == t[0]).all()):
            t = t[:1]  # one time: its [1, ...] tensors broadcast over the batch
        alpha, sigma = self.schedule.marginal_alpha(t), self.schedule.marginal_std(t)         # [B] or [1]
        var = alpha[:, None, None] ** 2 * self.eigenvalues + sigma[:, None, None] ** 2      # [B or 1, K, D]
        log_norm = torch.log(self.weights) - 0.5 * torch.log(2 * math.pi * var).sum(-1)     # [B or 1, K]
        alpha, sigma, inv_var, log_norm = (v.to(x.device) for v in (alpha, sigma, var.reciprocal(), log_norm))
        stacked, rotated_means = self._on(x.device)
        rotated = (x @ stacked).view(n, k, d) - alpha[:, None, None] * rotated_means      # U_kᵀ (x − α μ_k)
        scaled = rotated * inv_var                                                          # diag(1/var) U_kᵀ (…)
        gamma = torch.softmax(log_norm - 0.5 * (scaled * rotated).sum(-1), dim=1)          # [B, K]
        return sigma[:, None] * ((gamma[:, :, None] * scaled).view(n, k * d) @ stacked.T)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of p0, [n, D] float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64) * self.eigenvalues[k].sqrt()
        return self.means[k] + torch.einsum("bij,bj->bi", self.bases[k], z)

    def model_fn(self, total_N: int | None = None):
        """A noise-prediction network `model(x, t_input)` as `model_wrapper` calls it: discrete schedules feed
        t_input = 1000·(t − 1/total_N) (pass total_N), continuous ones t_input = t."""
        def model(x, t_input):
            t = torch.as_tensor(t_input, dtype=torch.float64)
            return self.eps(x, t / 1000.0 + 1.0 / total_N if total_N else t)
        return model
