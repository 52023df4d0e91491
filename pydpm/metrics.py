"""Distribution metrics for generated samples, computed offline: the Fréchet distance between two sets of
features (FID's formula; here in the feature space of any model the caller picks, e.g. a small classifier trained
on the same data, since an Inception network is neither shipped nor meaningful for 32×32 grayscale patches)."""
from __future__ import annotations

import torch


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2·(Σa^½ Σb Σa^½)^½) of the Gaussians fitted to features a [N, D] and b [M, D]
    (N, M ≥ 2), in float64. The matrix square roots are symmetric (eigen-decompositions), so the result is real
    and ≥ 0 up to rounding; it is 0 for identical sets and ‖μa − μb‖² for sets that differ by a shift."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"frechet_distance: {name} is {shape}; it must be [N >= 2, D] features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: a has {a.shape[1]} features per row but b has {b.shape[1]}")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))
