"""DDIM (Song et al., ICLR 2021) with η ≥ 0, and DDPM ancestral sampling (Ho et al., 2020) as η = 1."""
from __future__ import annotations

import math
import numbers

from pydpm.samplers._common import Solver, after_step, check_choice
from pydpm.samplers._program import Point
from pydpm.schedules import SKIP_TYPES


def ddim_update(tr, x, s: Point, t: Point, eta: float):
    """One DDIM step from s to t: x_t = α_t·x̂₀ + √(σ_t² − σ̃²)·ε̂ + σ̃·z with σ̃ = η·σ_t·√(1 − e^{−2h}),
    h = λ_t − λ_s (on VP schedules this is DDIM's η·√(σ_t²/σ_s²·(1 − α_s²/α_t²)); η = 1 is the posterior
    q(x_t | x_s, x̂₀) on any Gaussian path). ε̂ is taken from x̂₀, so a start at α = 0 is exact."""
    x0 = tr.model(x, s, predict="data")
    eps = (x - s.alpha * x0) / s.sigma
    sig = eta * t.sigma * math.sqrt(-math.expm1(-2.0 * (t.lam - s.lam)))
    x_t = t.alpha * x0 + math.sqrt(max(t.sigma ** 2 - sig ** 2, 0.0)) * eps  # max(): rounding only (η <= 1)
    return x_t + sig * tr.noise() if sig > 0 else x_t


def ddim(tr, x, ts: list[Point], eta: float, hooks):
    """DDIM over the times ts (η = 0: the deterministic ODE sampler; η = 1: DDPM's ancestral sampler)."""
    for i in range(len(ts) - 1):
        x = hooks(ddim_update(tr, x, ts[i], ts[i + 1], eta), ts[i + 1], i)
    return x


class DDIM(Solver):
    """DDIM sampler; `eta` = 0 deterministic, 1 = DDPM ancestral. Noise: in-kernel Philox from `seed`."""

    algorithm_types = {"data_prediction": "data"}

    def __init__(self, model_fn, noise_schedule, eta: float = 0.0, correcting_xt_fn=None):
        if isinstance(eta, bool) or not (isinstance(eta, numbers.Real) and 0 <= eta <= 1):
            raise ValueError(f"eta={eta!r} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior noise)")
        super().__init__(model_fn, noise_schedule, "data_prediction", None, correcting_xt_fn, 1.0, 0.995)
        self.eta = float(eta)

    def sample(self, x, steps=20, t_start=None, t_end=None, skip_type="time_uniform", seed=0,
               return_intermediate=False, cuda_graph=False, progress=False):
        steps = self.check_steps(steps)
        check_choice("skip_type", skip_type, SKIP_TYPES)
        t_T, t_0 = self.time_range(t_start, t_end)
        key = ("ddim", steps, t_T, t_0, skip_type, self.eta, bool(return_intermediate))

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            return ddim(tr, x, tr.points(self.grid(skip_type, t_T, t_0, steps)), self.eta, hooks)

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress, seed=seed,
                               stochastic=self.eta > 0)


class DDPM(DDIM):
    """DDPM ancestral sampling: DDIM with η = 1."""

    def __init__(self, model_fn, noise_schedule, correcting_xt_fn=None):
        super().__init__(model_fn, noise_schedule, 1.0, correcting_xt_fn)
