"""DDIM (Song et al., ICLR 2021) with η ≥ 0, and DDPM ancestral sampling (Ho et al., 2020) as η = 1."""
from __future__ import annotations

import math

from pydpm.samplers._common import Solver, after_step, check_choice
from pydpm.samplers._program import Point


def ddim_update(tr, x, s: Point, t: Point, eta: float):
    """One DDIM step from s to t: x_t = α_t·x̂₀ + √(σ_t² − σ̃²)·ε̂ + σ̃·z, σ̃ = η·√(σ_t²/σ_s²·(1 − α_s²/α_t²))."""
    eps = tr.model(x, s, predict="noise")
    x0 = (x - s.sigma * eps) / s.alpha
    sig = eta * math.sqrt(max(t.sigma ** 2 / s.sigma ** 2 * (1.0 - (s.alpha / t.alpha) ** 2), 0.0))
    x_t = t.alpha * x0 + math.sqrt(max(t.sigma ** 2 - sig ** 2, 0.0)) * eps
    return x_t + sig * tr.noise() if sig > 0 else x_t


def ddim(tr, x, ts: list[Point], eta: float, hooks):
    """DDIM over the times ts (η = 0: the deterministic ODE sampler; η = 1: DDPM's ancestral sampler)."""
    for i in range(len(ts) - 1):
        x = hooks(ddim_update(tr, x, ts[i], ts[i + 1], eta), ts[i + 1], i)
    return x


class DDIM(Solver):
    """DDIM sampler; `eta` = 0 deterministic, 1 = DDPM ancestral. Noise: in-kernel Philox from `seed`."""

    algorithm_types = {"noise_prediction": "noise"}

    def __init__(self, model_fn, noise_schedule, eta: float = 0.0, correcting_xt_fn=None):
        if not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta={eta!r} must be a finite number >= 0")
        super().__init__(model_fn, noise_schedule, "noise_prediction", None, correcting_xt_fn, 1.0, 0.995)
        self.eta = float(eta)

    def sample(self, x, steps=20, t_start=None, t_end=None, skip_type="time_uniform", seed=0,
               return_intermediate=False, cuda_graph=False, progress=False):
        self.check_steps(steps)
        check_choice("skip_type", skip_type, ("time_uniform", "logSNR", "time_quadratic", "karras"))
        t_T, t_0 = self.time_range(t_start, t_end)
        key = ("ddim", steps, t_T, t_0, skip_type, self.eta, bool(return_intermediate))

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            return ddim(tr, x, tr.points(self.grid(skip_type, t_T, t_0, steps)), self.eta, hooks)

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress, seed=seed)


class DDPM(DDIM):
    """DDPM ancestral sampling: DDIM with η = 1."""

    def __init__(self, model_fn, noise_schedule, correcting_xt_fn=None):
        super().__init__(model_fn, noise_schedule, 1.0, correcting_xt_fn)
