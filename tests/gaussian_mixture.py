"""An analytic Gaussian-mixture data distribution: the exact noise prediction of a diffusion model at every t.

    p0  = Σ_k w_k N(μ_k, s_k² I)                       in D dimensions
    x_t = α_t x0 + σ_t ε                               (any schedule with marginal_alpha / marginal_std)
    p_t = Σ_k w_k N(α_t μ_k, v_k I),  v_k = α_t² s_k² + σ_t²
    ε*(x, t) = −σ_t ∇log p_t(x) = σ_t Σ_k γ_k(x) (x − α_t μ_k) / v_k,
    γ = softmax_k(log w_k + log N(x; α_t μ_k, v_k I))

so solver error versus NFE, and each method's convergence order, can be measured exactly. `model_fn` wraps ε*
as a network would be called by `model_wrapper` (x, t_input[, cond]) in each parameterization.
"""
from __future__ import annotations

import torch


class GaussianMixture:
    """p0 = Σ_k weights[k] N(means[k], stds[k]² I) under `schedule` (an object with marginal_alpha(t) and
    marginal_std(t), t of shape [B])."""

    def __init__(self, weights, means, stds, schedule):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, D]
        self.stds = torch.as_tensor(stds, dtype=torch.float64)    # [K]
        self.schedule = schedule
        self.dim = self.means.shape[1]
        self._copies: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(means, stds, weights) on x's device in its dtype, converted once per device and dtype."""
        kept = self._copies.get((x.device, x.dtype))
        if kept is None:
            kept = self._copies[(x.device, x.dtype)] = tuple(v.to(x.device, x.dtype)
                                                             for v in (self.means, self.stds, self.weights))
        return kept

    @classmethod
    def random(cls, schedule, dim: int, components: int = 3, seed: int = 0, spread: float = 1.0):
        """A mixture with `components` well-separated means of norm ≈ spread·√dim and stds in [0.3, 0.7]."""
        g = torch.Generator().manual_seed(seed)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = 0.3 + 0.4 * torch.rand(components, generator=g, dtype=torch.float64)
        return cls(weights, means, stds, schedule)

    def _alpha_sigma(self, t, x):
        """α_t, σ_t as [B, 1] on x's device in its dtype (t: a number, or a tensor of shape [] / [1] / [B])."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu().expand(x.shape[0])  # the schedule's tables
        alpha = self.schedule.marginal_alpha(t).reshape(-1, 1).to(x.device, x.dtype)
        sigma = self.schedule.marginal_std(t).reshape(-1, 1).to(x.device, x.dtype)
        return alpha, sigma

    def _posterior(self, x, t, shift=None):
        """(α [B,1], σ [B,1], v [B,K], x − α μ_k [B,K,D], γ [B,K]) in x's dtype."""
        flat = x.reshape(x.shape[0], -1)
        alpha, sigma = self._alpha_sigma(t, x)
        if shift is not None:
            flat = flat - alpha * shift.reshape(x.shape[0], -1).to(x.dtype)
        means, stds, weights = self._on(x)
        var = alpha ** 2 * stds ** 2 + sigma ** 2
        diff = flat[:, None, :] - alpha[:, :, None] * means[None]
        log_p = torch.log(weights) - 0.5 * self.dim * torch.log(var) - 0.5 * diff.square().sum(-1) / var
        return alpha, sigma, var, diff, torch.softmax(log_p, dim=1)  # softmax: log-sum-exp inside

    def eps(self, x: torch.Tensor, t, shift: torch.Tensor | None = None) -> torch.Tensor:
        """ε*(x, t) for x of shape [B, *dims] with prod(dims) = D, in x's dtype. `shift` ([B, *dims]) moves
        every mean of sample b by shift[b] (a conditional mixture: ε*(x − α_t·shift, t))."""
        _, sigma, var, diff, gamma = self._posterior(x, t, shift)
        return (sigma * (gamma[:, :, None] * diff / var[:, :, None]).sum(1)).reshape(x.shape)

    def x0(self, x: torch.Tensor, t, shift: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t = x] = Σ_k γ_k (μ_k + α_t s_k² (x − α_t μ_k) / v_k): (x − σ_t ε*)/α_t, finite at α_t = 0."""
        alpha, _, var, diff, gamma = self._posterior(x, t, shift)
        means, stds, _ = self._on(x)
        post = means[None] + (alpha * stds ** 2 / var)[:, :, None] * diff
        x0 = (gamma[:, :, None] * post).sum(1)
        if shift is not None:
            x0 = x0 + shift.reshape(x.shape[0], -1).to(x.dtype)
        return x0.reshape(x.shape)

    def sample(self, n: int, shape=None, generator: torch.Generator | None = None, dtype=torch.float64):
        """n samples of p0, shaped [n, *shape] (default [n, D])."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * z
        return x.reshape((n,) + tuple(shape or (self.dim,))).to(dtype)

    def model_fn(self, model_type: str = "noise", total_N: int | None = None, time_scale: float = 1.0,
                 conditional: bool = False):
        """A network `model(x, t_input[, cond])` predicting `model_type` of the exact ε*.

        Times: `model_wrapper` feeds discrete schedules t_input = 1000·(t − 1/total_N) (pass total_N) and others
        t_input = time_scale·t. With conditional=True the model takes a `cond` tensor shaped like x and
        predicts for the mixture shifted by cond (ε*(x − α_t·cond, t)).

        model_type: "noise" ε; "x_start" x0 = (x − σε)/α; "v" (ε − σx)/α (so that ε = α·v + σ·x); "score" −ε/σ;
        "flow" the velocity dx/dt = ε − x0 of x_t = (1 − t) x0 + t ε (α = 1 − t, σ = t only). x_start and flow
        take x0 as the posterior mean, so they stay finite at α = 0.
        """
        if model_type not in ("noise", "x_start", "v", "score", "flow"):
            raise ValueError(f"model_type: unknown {model_type!r}")

        def continuous_time(t_input):
            t_input = torch.as_tensor(t_input, dtype=torch.float64)
            return t_input / 1000.0 + 1.0 / total_N if total_N else t_input / time_scale

        def model(x, t_input, cond=None):
            if conditional and cond is None:
                raise TypeError("this conditional model needs a cond argument")
            t = continuous_time(t_input)
            eps = self.eps(x, t, shift=cond)
            alpha, sigma = (v.reshape((-1,) + (1,) * (x.dim() - 1)) for v in self._alpha_sigma(t, x))
            if model_type == "noise":
                return eps
            if model_type == "x_start":
                return self.x0(x, t, shift=cond)
            if model_type == "v":
                return (eps - sigma * x) / alpha
            if model_type == "score":
                return -eps / sigma
            return eps - self.x0(x, t, shift=cond)  # flow

        return model

