"""A float64 oracle for pydpm's samplers, written from the papers' update formulas.

Independent of pydpm.samplers and pydpm.schedules: it has its own α/σ/λ functions, its own time grids and one
plain function per method, each taking an ε-model `eps(x, t)` (t: float64 tensor of shape [B]). The only pydpm
import is `pydpm.ops.philox_normal`, the fused kernel's documented noise, so that stochastic samplers can be
compared draw for draw: the i-th stochastic update (0-based, in sampling order) adds
z = philox_normal(seed, i, x.numel()).reshape(x.shape).

Papers: DPM-Solver (Lu et al. 2022, arXiv:2206.00927), DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095),
UniPC (Zhao et al. 2023, arXiv:2302.04867), DDIM (Song et al. 2021), PNDM (Liu et al. 2022, arXiv:2202.09778),
Karras et al. 2022 (EDM time steps), Imagen (dynamic thresholding), DPM-Solver-v3 (Zheng et al. 2023,
arXiv:2310.13268). Where the authors' reference code departs from the papers or from consistency (the
multistep loop's orders, the third-order multistep update, UniPC's "vary_coeff" corrector), the code is
followed and the place says so; the convergence tests measure the effect.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from pydpm.ops import philox_normal

F64 = torch.float64
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _f64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=F64)


# --------------------------------------------------------------------------------------------------
# Noise schedules: log α(t), σ(t), λ(t) = log α − log σ and its inverse, all float64
# --------------------------------------------------------------------------------------------------

class Schedule:
    """A schedule given by log α(t), variance preserving unless a subclass says otherwise (σ = sqrt(1 − α²)).
    Subclasses define log_alpha and may define inverse_lambda in closed form."""

    T = 1.0
    total_N = 1000
    discrete = False  # discrete schedules feed the network t_input = 1000·(t − 1/N)

    def log_alpha(self, t):
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t):
        return self.log_alpha(t) - torch.log(self.sigma(t))

    # the names of the schedule objects `model_wrapper` and the Gaussian mixture call
    def marginal_alpha(self, t):
        return self.alpha(t)

    def marginal_std(self, t):
        return self.sigma(t)

    def inverse_lambda(self, lam):
        """t with λ(t) = lam, by bisection on the decreasing log α(t): log α = −½·log(1 + e^(−2λ))."""
        target = -0.5 * torch.nn.functional.softplus(-2.0 * _f64(lam))
        lo, hi = torch.full_like(target, -1.0), torch.full_like(target, 2.0)
        for _ in range(64):  # 3 / 2^64 < one ulp of any t in [1e-4, 1]
            mid = 0.5 * (lo + hi)
            above = self.log_alpha(mid) > target  # log α decreases: the root lies right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)


class VPLinear(Schedule):
    """Continuous-time linear VP SDE: log α(t) = −¼ t² (β1 − β0) − ½ t β0."""

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0):
        self.beta_0, self.beta_1 = beta_0, beta_1

    def log_alpha(self, t):
        t = _f64(t)
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lam):
        """Root of ¼Δβ t² + ½β0 t − c = 0, c = −log α = ½ log(1 + e^(−2λ)), in the cancellation-free form
        t = 2c / (½β0 + sqrt(¼β0² + Δβ c))."""
        c = 0.5 * torch.nn.functional.softplus(-2.0 * _f64(lam))
        d_beta = self.beta_1 - self.beta_0
        return 2.0 * c / (0.5 * self.beta_0 + torch.sqrt(0.25 * self.beta_0 ** 2 + d_beta * c))


class VPDiscrete(Schedule):
    """A discrete-time DPM (steps n = 0..N−1) as continuous time t_n = (n + 1)/N: log α is the piecewise-linear
    interpolation of ½·log(alphas_cumprod[n]) over t_n, extrapolated linearly outside [t_0, t_{N−1}]. As the
    DPM-Solver authors do, trailing steps whose λ < −5.1 are dropped first (N shrinks, the grid is rescaled)."""

    discrete = True
    LAMBDA_MIN = -5.1

    def __init__(self, betas=None, alphas_cumprod=None):
        if betas is not None:
            log_alphas = 0.5 * torch.cumsum(torch.log1p(-_f64(betas)), 0)
        else:
            log_alphas = 0.5 * torch.log(_f64(alphas_cumprod))
        lam = log_alphas - 0.5 * torch.log(-torch.expm1(2.0 * log_alphas))
        keep = len(lam) - int((lam < self.LAMBDA_MIN).sum())
        self.log_alphas = log_alphas[:keep]
        self.total_N = keep
        self.t_knots = torch.arange(1, keep + 1, dtype=F64) / keep

    def log_alpha(self, t):
        t = _f64(t)
        i = torch.searchsorted(self.t_knots, t.reshape(-1).contiguous()).clamp(1, self.total_N - 1).reshape(t.shape)
        t0, t1 = self.t_knots[i - 1], self.t_knots[i]
        y0, y1 = self.log_alphas[i - 1], self.log_alphas[i]
        return y0 + (t - t0) * (y1 - y0) / (t1 - t0)

    def inverse_lambda(self, lam):
        """Bisection as in Schedule.inverse_lambda, done in two stages because log α(t) is piecewise linear:
        binary search for the segment (over the decreasing knot values), then the segment's line solved for t."""
        target = -0.5 * torch.nn.functional.softplus(-2.0 * _f64(lam))
        neg = -self.log_alphas  # increasing
        i = torch.searchsorted(neg, -target.reshape(-1).contiguous()).clamp(1, self.total_N - 1).reshape(target.shape)
        t0, t1 = self.t_knots[i - 1], self.t_knots[i]
        y0, y1 = self.log_alphas[i - 1], self.log_alphas[i]
        return t0 + (target - y0) * (t1 - t0) / (y1 - y0)


class Flow(Schedule):
    """Rectified flow: α = 1 − t, σ = t, λ = log((1 − t)/t), t(λ) = 1/(1 + e^λ)."""

    def log_alpha(self, t):
        return torch.log1p(-_f64(t))

    def alpha(self, t):
        return 1.0 - _f64(t)

    def sigma(self, t):
        return _f64(t)

    def lam(self, t):
        t = _f64(t)
        return torch.log1p(-t) - torch.log(t)

    def inverse_lambda(self, lam):
        return torch.sigmoid(-_f64(lam))


# --------------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------------

KARRAS_RHO = 7.0


def time_steps(sched: Schedule, skip_type: str, t_T: float, t_0: float, N: int) -> torch.Tensor:
    """N + 1 decreasing times from t_T to t_0."""
    if skip_type == "time_uniform":
        return torch.linspace(t_T, t_0, N + 1, dtype=F64)
    if skip_type == "logSNR":
        lam = torch.linspace(float(sched.lam(t_T)), float(sched.lam(t_0)), N + 1, dtype=F64)
        return sched.inverse_lambda(lam)
    if skip_type == "time_quadratic":
        return torch.linspace(math.sqrt(t_T), math.sqrt(t_0), N + 1, dtype=F64) ** 2
    if skip_type == "karras":  # EDM: uniform in σ^(1/ρ), σ = σ_t/α_t = e^(−λ)
        s_max, s_min = (math.exp(-float(sched.lam(t))) ** (1.0 / KARRAS_RHO) for t in (t_T, t_0))
        ramp = torch.arange(N + 1, dtype=F64) / N
        sig = (s_max + ramp * (s_min - s_max)) ** KARRAS_RHO
        return sched.inverse_lambda(-torch.log(sig))
    raise ValueError(f"skip_type: unknown {skip_type!r}")


def _time_range(sched: Schedule, t_start, t_end) -> tuple[float, float]:
    return (sched.T if t_start is None else t_start), (1.0 / sched.total_N if t_end is None else t_end)


# --------------------------------------------------------------------------------------------------
# Model outputs
# --------------------------------------------------------------------------------------------------

def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_val: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding: s_b = max(quantile(|x0_b|, ratio), max_val); x0 ← clamp(x0, −s, s)/s."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1).clamp_min(max_val)
    s = s.reshape((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class _Model:
    """The ε-model at a solver's service: ε, or the data prediction x0 = (x − σ ε)/α, then corrected by
    `correcting_x0_fn` ('dynamic_thresholding' or a function (x0, t) -> x0). `x0_fn(x, t)`, when given,
    computes the data prediction directly (needed where α = 0, e.g. the flow schedule at t = 1)."""

    def __init__(self, eps: EpsModel, sched: Schedule, predict_x0: bool, correcting_x0_fn=None,
                 thresholding_max_val: float = 1.0, dynamic_thresholding_ratio: float = 0.995, x0_fn=None):
        self.eps, self.sched, self.predict_x0, self.x0_fn = eps, sched, predict_x0, x0_fn
        if correcting_x0_fn == "dynamic_thresholding":
            self.correct_x0 = lambda x0, t: dynamic_threshold(x0, dynamic_thresholding_ratio, thresholding_max_val)
        else:
            self.correct_x0 = correcting_x0_fn

    @staticmethod
    def _batch(x, t):
        return _f64(t).reshape(-1).expand(x.shape[0])

    def noise(self, x, t):
        return self.eps(x, self._batch(x, t))

    def data(self, x, t):
        if self.x0_fn is not None:
            x0 = self.x0_fn(x, self._batch(x, t))
        else:
            x0 = (x - self.sched.sigma(t) * self.noise(x, t)) / self.sched.alpha(t)
        return self.correct_x0(x0, t) if self.correct_x0 is not None else x0

    def __call__(self, x, t):
        return self.data(x, t) if self.predict_x0 else self.noise(x, t)


# --------------------------------------------------------------------------------------------------
# DPM-Solver / DPM-Solver++ (exponential integrators)
#
# With hh = −h for data prediction (DPM-Solver++, m = x0) and hh = h for noise prediction (DPM-Solver, m = ε),
# h = λ_t − λ_s, every update of these papers reads
#     x_t = a·x_s − c·(φ1·m_s + φ2·D1 + φ3·D2)
# a = σ_t/σ_s, c = α_t (data) or a = α_t/α_s, c = σ_t (noise); φ1 = e^hh − 1, φ2 = φ1/hh − 1, φ3 = φ2/hh − ½;
# D1 ≈ h·m', D2 ≈ h²·m'' are finite differences of earlier model outputs (but see the multistep order 3).
# --------------------------------------------------------------------------------------------------

def _ei(sched: Schedule, s, t, predict_x0: bool):
    """(a, c, φ1, φ2, φ3, h) of the exponential integrator from s to t."""
    h = sched.lam(t) - sched.lam(s)
    if predict_x0:
        hh, a, c = -h, sched.sigma(t) / sched.sigma(s), sched.alpha(t)
    else:
        hh, a, c = h, torch.exp(sched.log_alpha(t) - sched.log_alpha(s)), sched.sigma(t)
    phi1 = torch.expm1(hh)
    phi2 = phi1 / hh - 1.0
    phi3 = phi2 / hh - 0.5
    return a, c, phi1, phi2, phi3, h


def dpm_multistep_update(model: _Model, x, ms, ts, t, order: int, solver_type: str = "dpmsolver"):
    """Multistep DPM-Solver(++)-`order` from ts[-1] to t with model outputs ms at times ts (last = newest)."""
    sched = model.sched
    a, c, phi1, phi2, phi3, h = _ei(sched, ts[-1], t, model.predict_x0)
    m0 = ms[-1]
    if order == 1:
        return a * x - c * phi1 * m0
    lam = [sched.lam(ti) for ti in ts]
    r0 = (lam[-1] - lam[-2]) / h
    d1_0 = (m0 - ms[-2]) / r0
    if order == 2:
        if solver_type == "dpmsolver":
            return a * x - c * phi1 * m0 - 0.5 * c * phi1 * d1_0
        if solver_type == "taylor":
            return a * x - c * phi1 * m0 - c * phi2 * d1_0
        raise ValueError(f"solver_type: unknown {solver_type!r}")
    if order == 3:  # one formula for both solver types
        # As the authors' code (and diffusers) has it: D2 ≈ h²m''/2, half of what the φ3 weight needs, so this
        # update is second-order accurate only (test_samplers_convergence measures it).
        r1 = (lam[-2] - lam[-3]) / h
        d1_1 = (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return a * x - c * (phi1 * m0 + phi2 * d1 + phi3 * d2)
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


def dpm_singlestep_update(model: _Model, x, s, t, order: int, solver_type: str = "dpmsolver",
                          r1: float | None = None, r2: float | None = None):
    """Singlestep DPM-Solver(++)-`order` from s to t: intermediate points at λ_s + r_i·h."""
    sched = model.sched
    a, c, phi1, phi2, phi3, h = _ei(sched, s, t, model.predict_x0)
    m_s = model(x, s)
    if order == 1:
        return a * x - c * phi1 * m_s
    r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
    lam_s = sched.lam(s)
    s1 = sched.inverse_lambda(lam_s + r1 * h)
    a1, c1, phi1_1, _, _, _ = _ei(sched, s, s1, model.predict_x0)
    m_s1 = model(a1 * x - c1 * phi1_1 * m_s, s1)
    if order == 2:
        if solver_type == "dpmsolver":
            return a * x - c * phi1 * m_s - (0.5 / r1) * c * phi1 * (m_s1 - m_s)
        if solver_type == "taylor":
            return a * x - c * phi1 * m_s - (1.0 / r1) * c * phi2 * (m_s1 - m_s)
        raise ValueError(f"solver_type: unknown {solver_type!r}")
    if order != 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    r2 = 2.0 / 3.0 if r2 is None else r2
    s2 = sched.inverse_lambda(lam_s + r2 * h)
    a2, c2, phi1_2, phi2_2, _, _ = _ei(sched, s, s2, model.predict_x0)
    m_s2 = model(a2 * x - c2 * phi1_2 * m_s - (r2 / r1) * c2 * phi2_2 * (m_s1 - m_s), s2)
    if solver_type == "dpmsolver":
        return a * x - c * phi1 * m_s - (1.0 / r2) * c * phi2 * (m_s2 - m_s)
    if solver_type == "taylor":
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return a * x - c * (phi1 * m_s + phi2 * d1 + phi3 * d2)
    raise ValueError(f"solver_type: unknown {solver_type!r}")


def singlestep_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast: the orders of the singlestep solver that use exactly `steps` evaluations."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    if order == 2:
        return [2] * (steps // 2) + ([1] if steps % 2 else [])
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


def dpm_solver(eps: EpsModel, sched: Schedule, x: torch.Tensor, steps: int = 20, *, t_start=None, t_end=None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
               algorithm_type: str = "dpmsolver++", solver_type: str = "dpmsolver", lower_order_final: bool = True,
               denoise_to_zero: bool = False, correcting_xt_fn=None, return_intermediate: bool = False,
               **model_opts):
    """DPM-Solver (algorithm_type 'dpmsolver', noise prediction) / DPM-Solver++ ('dpmsolver++', data prediction):
    methods 'multistep', 'singlestep' (DPM-Solver-fast) and 'singlestep_fixed'. `model_opts`: correcting_x0_fn,
    thresholding_max_val, dynamic_thresholding_ratio, x0_fn (see _Model). correcting_xt_fn(x, t, step) runs
    after every step (and, as in the authors' code, on x_T after the first model call of the multistep loop).
    Returns x, or (x, intermediates) with return_intermediate."""
    if algorithm_type not in ("dpmsolver", "dpmsolver++"):
        raise ValueError(f"algorithm_type: unknown {algorithm_type!r}")
    model = _Model(eps, sched, algorithm_type == "dpmsolver++", **model_opts)
    t_T, t_0 = _time_range(sched, t_start, t_end)
    fix = correcting_xt_fn or (lambda x_, t_, step_: x_)
    out = []
    if method == "multistep":
        if steps < order:
            raise ValueError("multistep needs steps >= order")
        ts = time_steps(sched, skip_type, t_T, t_0, steps)
        t_hist, m_hist = [ts[0]], [model(x, ts[0])]
        x = fix(x, ts[0], 0)
        out.append(x)
        for step in range(1, steps + 1):
            # the authors' loop: orders 1, 2, … while the history fills; lower orders at the end only if steps < 10
            if step < order:
                step_order = step
            elif lower_order_final and steps < 10:
                step_order = min(order, steps + 1 - step)
            else:
                step_order = order
            x = dpm_multistep_update(model, x, m_hist, t_hist, ts[step], step_order, solver_type)
            x = fix(x, ts[step], step)
            out.append(x)
            t_hist = (t_hist + [ts[step]])[-order:]
            if step < steps:
                m_hist = (m_hist + [model(x, ts[step])])[-order:]
        last = steps
    elif method in ("singlestep", "singlestep_fixed"):
        if method == "singlestep":
            orders = singlestep_orders(steps, order)
            if skip_type == "logSNR":
                outer = time_steps(sched, skip_type, t_T, t_0, len(orders))
            else:
                outer = time_steps(sched, skip_type, t_T, t_0, steps)[torch.cumsum(torch.tensor([0] + orders), 0)]
        else:
            orders = [order] * (steps // order)
            outer = time_steps(sched, skip_type, t_T, t_0, len(orders))
        for step, k in enumerate(orders):
            s, t = outer[step], outer[step + 1]
            inner = sched.lam(time_steps(sched, skip_type, float(s), float(t), k))
            h = inner[-1] - inner[0]
            r = [(inner[i] - inner[0]) / h for i in range(1, k)] + [None, None]
            x = dpm_singlestep_update(model, x, s, t, k, solver_type, r1=r[0], r2=r[1])
            x = fix(x, t, step)
            out.append(x)
        last = len(orders) - 1
    else:
        raise ValueError(f"method: unknown {method!r}")
    if denoise_to_zero:
        t = _f64([t_0])
        x = fix(model.data(x, t), t, last + 1)
        out.append(x)
    return (x, out) if return_intermediate else x


# --------------------------------------------------------------------------------------------------
# UniPC (unified predictor-corrector)
# --------------------------------------------------------------------------------------------------

def _phi_sequence(hh, n: int) -> list:
    """[g_0 .. g_n] with g_k = hh·φ_{k+1}(hh), φ_{k+1}(z) = (e^z − Σ_{j≤k} z^j/j!)/z^(k+1): by the recurrence
    g_0 = e^hh − 1, g_k = g_{k−1}/hh − 1/k!."""
    g = [torch.expm1(hh)]
    for k in range(1, n + 1):
        g.append(g[-1] / hh - 1.0 / math.factorial(k))
    return g


def unipc_update(model: _Model, x, ms, ts, t, order: int, variant: str = "bh1", use_corrector: bool = True):
    """One UniPC step of `order` from ts[-1] to t: UniP-`order` predictor, then (use_corrector) UniC with the
    model evaluated at the predicted x_t. Returns (x_t, model output at the predicted x_t or None)."""
    sched = model.sched
    s = ts[-1]
    a, c, _, _, _, h = _ei(sched, s, t, model.predict_x0)
    hh = -h if model.predict_x0 else h
    m0 = ms[-1]
    rks, d1s = [], []
    for i in range(1, order):
        rk = (sched.lam(ts[-(i + 1)]) - sched.lam(s)) / h
        rks.append(rk)
        d1s.append((ms[-(i + 1)] - m0) / rk)
    rks = torch.stack([_f64(r).reshape(()) for r in rks] + [_f64(1.0)])
    g = _phi_sequence(hh, order + 1)
    x_base = a * x - c * g[0] * m0

    if variant in ("bh1", "bh2"):
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        R = torch.stack([rks ** (i - 1) for i in range(1, order + 1)])
        b = torch.stack([g[i] * math.factorial(i) / b_h for i in range(1, order + 1)]).reshape(-1)
        if order == 1:
            x_t = x_base
        else:
            rhos_p = _f64([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_base - c * b_h * sum(rho * d for rho, d in zip(rhos_p, d1s))
        if not use_corrector:
            return x_t, None
        m_t = model(x_t, t)
        rhos_c = _f64([0.5]) if order == 1 else torch.linalg.solve(R, b)
        corr = sum((rho * d for rho, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x))
        return x_base - c * b_h * (corr + rhos_c[-1] * (m_t - m0)), m_t

    if variant != "vary_coeff":
        raise ValueError(f"variant: unknown {variant!r}")
    K = order
    C = torch.stack([rks ** (k - 1) / math.factorial(k) for k in range(1, K + 1)], dim=1)  # C[j, k−1]
    x_t = x_base
    if K > 1:
        A_p = torch.linalg.inv(C[:-1, :-1])
        for k in range(K - 1):
            x_t = x_t - c * g[k + 1] * sum(A_p[k, j] * d1s[j] for j in range(K - 1))
    if not use_corrector:
        return x_t, None
    m_t = model(x_t, t)
    A_c = torch.linalg.inv(C)
    x_c = x_base
    for k in range(K - 1):
        x_c = x_c - c * g[k + 1] * sum(A_c[k, j] * d1s[j] for j in range(K - 1))
    # The authors' code weights the new output only in one last term, g_K·A_c[k][-1] with k the loop variable left
    # over (K − 2; 0 for K = 1), instead of Σ_k g_{k+1}·A_c[k][j] over all K rows and columns. Reproduced as is:
    # for K ≥ 2 it makes the corrector inconsistent and the method first order (the full sum gives order K + 1).
    k_left = K - 2 if K >= 2 else 0
    return x_c - c * g[K] * A_c[k_left, -1] * (m_t - m0), m_t


def unipc(eps: EpsModel, sched: Schedule, x: torch.Tensor, steps: int = 20, *, t_start=None, t_end=None,
          order: int = 2, skip_type: str = "time_uniform", algorithm_type: str = "data_prediction",
          variant: str = "bh1", lower_order_final: bool = True, denoise_to_zero: bool = False,
          correcting_xt_fn=None, return_intermediate: bool = False, **model_opts):
    """Multistep UniPC: orders 1, 2, … while the history fills, lower orders at the end when lower_order_final
    (for any number of steps), no corrector on the final step; NFE = steps."""
    if algorithm_type not in ("data_prediction", "noise_prediction"):
        raise ValueError(f"algorithm_type: unknown {algorithm_type!r}")
    if steps < order:
        raise ValueError("UniPC needs steps >= order")
    model = _Model(eps, sched, algorithm_type == "data_prediction", **model_opts)
    t_T, t_0 = _time_range(sched, t_start, t_end)
    fix = correcting_xt_fn or (lambda x_, t_, step_: x_)
    ts = time_steps(sched, skip_type, t_T, t_0, steps)
    t_hist, m_hist = [ts[0]], [model(x, ts[0])]
    x = fix(x, ts[0], 0)
    out = [x]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, m_t = unipc_update(model, x, m_hist, t_hist, ts[step], step_order, variant, use_corrector=step < steps)
        x = fix(x, ts[step], step)
        out.append(x)
        t_hist = (t_hist + [ts[step]])[-order:]
        if step < steps:
            m_hist = (m_hist + [m_t])[-order:]
    if denoise_to_zero:
        t = _f64([t_0])
        x = fix(model.data(x, t), t, steps + 1)
        out.append(x)
    return (x, out) if return_intermediate else x


# --------------------------------------------------------------------------------------------------
# DDIM / DDPM, PNDM family, SDE-DPM-Solver++
# --------------------------------------------------------------------------------------------------

def _noise(seed: int, index: int, x: torch.Tensor) -> torch.Tensor:
    return philox_normal(seed, index, x.numel()).reshape(x.shape).to(x.dtype)


def ddim(eps: EpsModel, sched: Schedule, x: torch.Tensor, steps: int = 20, *, t_start=None, t_end=None,
         skip_type: str = "time_uniform", eta: float = 0.0, seed: int = 0, x0_fn=None):
    """DDIM(η) from t to s: x0 = (x − σ_t ε)/α_t, x_s = α_s x0 + sqrt(σ_s² − σ̃²) ε + σ̃ z with
    σ̃ = η·σ_s·sqrt(1 − e^(−2h)), h = λ_s − λ_t: η times the std of q(x_s | x_t, x0). On VP schedules this is the
    DDIM paper's η·sqrt(σ_s²/σ_t² · (1 − α_t²/α_s²)); unlike that form it stays ≤ σ_s on others (flow).
    η = 1 is DDPM's ancestral sampler."""
    model = _Model(eps, sched, predict_x0=False, x0_fn=x0_fn)
    ts = time_steps(sched, skip_type, *_time_range(sched, t_start, t_end), steps)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        e = model(x, t)
        a_t, s_t, a_s, s_s = sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)
        x0 = model.data(x, t) if x0_fn is not None else (x - s_t * e) / a_t
        noise_std = eta * s_s * torch.sqrt(-torch.expm1(-2.0 * (sched.lam(s) - sched.lam(t))))
        x = a_s * x0 + torch.sqrt(s_s ** 2 - noise_std ** 2) * e
        if eta > 0:
            x = x + noise_std * _noise(seed, i, x)
    return x


def _transfer(sched: Schedule, x, e, t, s):
    """PNDM's transfer φ(x, e, t, s) = (α_s/α_t) x + (σ_s − α_s σ_t/α_t) e: a DDIM step with noise e."""
    a_t, a_s = sched.alpha(t), sched.alpha(s)
    return (a_s / a_t) * x + (sched.sigma(s) - a_s * sched.sigma(t) / a_t) * e


def _adams_bashforth(e: list):
    """The linear-multistep ε' of the newest len(e) ≤ 4 outputs (newest last), uniform-step coefficients."""
    if len(e) == 1:
        return e[-1]
    if len(e) == 2:
        return (3 * e[-1] - e[-2]) / 2
    if len(e) == 3:
        return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    return (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24


def pndm(eps: EpsModel, sched: Schedule, x: torch.Tensor, steps: int = 20, *, t_start=None, t_end=None,
         skip_type: str = "time_uniform", method: str = "plms"):
    """PNDM family over the transfer φ: 'plms' (pseudo improved Euler first step, then Adams–Bashforth of
    growing order up to 4; NFE = steps + 1), 's-pndm' (improved Euler first, then always the 2-term formula;
    NFE = steps + 1), 'f-pndm' (pseudo Runge–Kutta for the first min(3, steps) steps, then the 4-term formula;
    NFE = steps + 9). The history keeps ε at the start of each step."""
    if method not in ("plms", "s-pndm", "f-pndm"):
        raise ValueError(f"method: unknown {method!r}")
    model = _Model(eps, sched, predict_x0=False)
    ts = time_steps(sched, skip_type, *_time_range(sched, t_start, t_end), steps)
    hist = []
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        e1 = model(x, t)
        if method == "f-pndm" and i < 3:  # pseudo Runge–Kutta, midpoint time m = (t + s)/2
            m = 0.5 * (t + s)
            e2 = model(_transfer(sched, x, e1, t, m), m)
            e3 = model(_transfer(sched, x, e2, t, m), m)
            e4 = model(_transfer(sched, x, e3, t, s), s)
            e_step = (e1 + 2 * e2 + 2 * e3 + e4) / 6
        elif method in ("plms", "s-pndm") and i == 0:  # pseudo improved Euler
            e2 = model(_transfer(sched, x, e1, t, s), s)
            e_step = (e1 + e2) / 2
        else:
            e_step = _adams_bashforth((hist + [e1])[-(2 if method == "s-pndm" else 4):])
        hist = (hist + [e1])[-3:]
        x = _transfer(sched, x, e_step, t, s)
    return x


def sde_dpm_solver_pp(eps: EpsModel, sched: Schedule, x: torch.Tensor, steps: int = 20, *, t_start=None,
                      t_end=None, order: int = 2, skip_type: str = "time_uniform", seed: int = 0,
                      lower_order_final: bool = True, **model_opts):
    """SDE-DPM-Solver++(1, 2M) (DPM-Solver++ paper, the 'midpoint' form): with h = λ_t − λ_s,
    x_t = (σ_t/σ_s) e^(−h) x + α_t (1 − e^(−2h)) (D0 + ½·D1) + σ_t sqrt(1 − e^(−2h)) z,
    D0 = x0 at s, D1 = (D0 − previous x0)/r0 (order 2, r0 = h_prev/h) or 0 (order 1).
    Multistep order ladder as DPM-Solver's (first step order 1; lower_order_final only when steps < 10)."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    model = _Model(eps, sched, predict_x0=True, **model_opts)
    ts = time_steps(sched, skip_type, *_time_range(sched, t_start, t_end), steps)
    m_hist = [model(x, ts[0])]
    for step in range(1, steps + 1):
        s, t = ts[step - 1], ts[step]
        step_order = min(order, step)
        if lower_order_final and steps < 10:
            step_order = min(step_order, steps + 1 - step)
        h = sched.lam(t) - sched.lam(s)
        m0 = m_hist[-1]
        d = m0
        if step_order == 2:
            r0 = (sched.lam(s) - sched.lam(ts[step - 2])) / h
            d = m0 + 0.5 * (m0 - m_hist[-2]) / r0
        x = (sched.sigma(t) / sched.sigma(s) * torch.exp(-h) * x
             + sched.alpha(t) * -torch.expm1(-2.0 * h) * d
             + sched.sigma(t) * torch.sqrt(-torch.expm1(-2.0 * h)) * _noise(seed, step - 1, x))
        if step < steps:
            m_hist = (m_hist + [model(x, t)])[-2:]
    return x


# --------------------------------------------------------------------------------------------------
# One entry point with pydpm.sample's method names, and a near-exact ODE solution
# --------------------------------------------------------------------------------------------------

def sample(eps: EpsModel, sched: Schedule, x: torch.Tensor, method: str, steps: int = 20, *, order: int = 2,
           skip_type: str = "time_uniform", t_start=None, t_end=None, eta: float = 0.0, seed: int = 0,
           lower_order_final: bool = True, solver_type: str = "dpmsolver", variant: str = "bh1"):
    """The oracle of `pydpm.sample` (same arguments; 'ddpm' is DDIM with η = 1)."""
    common = dict(t_start=t_start, t_end=t_end, skip_type=skip_type)
    if method in ("dpmsolver", "dpmsolver++"):
        return dpm_solver(eps, sched, x, steps, order=order, algorithm_type=method, solver_type=solver_type,
                          lower_order_final=lower_order_final, **common)
    if method == "unipc":
        return unipc(eps, sched, x, steps, order=order, variant=variant, lower_order_final=lower_order_final,
                     **common)
    if method in ("ddim", "ddpm"):
        return ddim(eps, sched, x, steps, eta=1.0 if method == "ddpm" else eta, seed=seed, **common)
    if method in ("plms", "s-pndm", "f-pndm"):
        return pndm(eps, sched, x, steps, method=method, **common)
    if method == "sde-dpmsolver++":
        return sde_dpm_solver_pp(eps, sched, x, steps, order=order, seed=seed,
                                 lower_order_final=lower_order_final, **common)
    raise ValueError(f"method: unknown {method!r}")


def ode_solution(eps: EpsModel, sched: Schedule, x: torch.Tensor, t_start: float, t_end: float,
                 n: int = 2000) -> torch.Tensor:
    """The probability-flow ODE solution at t_end from x at t_start: classical RK4 in λ on y = x/σ,
    dy/dλ = e^λ·x0(σy, t(λ)) (the data-prediction form, whose Jacobian stays O(1) over all λ); n uniform steps."""
    lam = torch.linspace(float(sched.lam(t_start)), float(sched.lam(t_end)), n + 1, dtype=F64)

    def f(y, l):
        t = sched.inverse_lambda(l)
        xt = sched.sigma(t) * y
        x0 = (xt - sched.sigma(t) * eps(xt, t.reshape(1).expand(x.shape[0]))) / sched.alpha(t)
        return torch.exp(l) * x0

    y = x / sched.sigma(_f64(t_start))
    for i in range(n):
        l0, l1 = lam[i], lam[i + 1]
        dl = l1 - l0
        k1 = f(y, l0)
        k2 = f(y + 0.5 * dl * k1, l0 + 0.5 * dl)
        k3 = f(y + 0.5 * dl * k2, l0 + 0.5 * dl)
        k4 = f(y + dl * k3, l1)
        y = y + dl / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return sched.sigma(_f64(t_end)) * y


# --------------------------------------------------------------------------------------------------
# DPM-Solver-v3 (Zheng et al. 2023), in the authors' form
# --------------------------------------------------------------------------------------------------

class DPMSolverV3:
    """DPM-Solver-v3 as the paper states it, on statistics interpolated linearly between their grid points.

    `lambdas` [K]; `l`, `s` [K] (one number per λ, as pydpm fits them) or [K, *shape] (one per element, as the
    paper does); `b` [K, *shape]. Every quantity is kept as a row over the elements (one column for scalar l
    and s) on a fine λ grid holding the statistics' points and the sampler's (`lams_needed`; a statistics point
    within 1e-9 of a sampler's is dropped for it), 2·sub nodes per interval: L = ∫l, S = ∫s exactly (trapezoids
    of a linear function), I = ∫e^{L+S}, B = ∫e^{−S}·b and C = ∫e^{L+S}·B by Simpson's rule. g is taken
    relative to the step's start; derivatives by a Vandermonde solve or divided differences (pseudo-order); the
    corrector re-expresses ε so that σ·ε − l·x is kept."""

    def __init__(self, lambdas, l, s, b, lams_needed: list[float], sub: int = 64):
        grid = np.asarray(lambdas, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        self.shape = b.shape[1:]
        needed = np.asarray(lams_needed, dtype=np.float64)
        apart = np.abs(grid[:, None] - needed[None]).min(1) > 1e-9  # a statistics point on a step's λ: one knot
        knots = np.union1d(grid[apart], needed)
        fine = [knots[0]]
        for lo, hi in zip(knots[:-1], knots[1:]):
            fine.extend(np.linspace(lo, hi, 2 * sub + 1)[1:])
        self.lam = np.asarray(fine)

        def interpolated(v):  # [K, ...] -> [fine nodes, columns]
            v = np.asarray(v, dtype=np.float64).reshape(len(grid), -1)
            return np.stack([np.interp(self.lam, grid, v[:, i]) for i in range(v.shape[1])], 1)

        self.l, self.s, self.b = interpolated(l), interpolated(s), interpolated(b)
        self.L = self._cumtrapz(self.l)   # exact: l is linear between fine nodes
        self.S = self._cumtrapz(self.s)
        self.I = self._cumsimpson(np.exp(self.L + self.S))
        self.B = self._cumsimpson(np.exp(-self.S) * self.b)
        self.C = self._cumsimpson(np.exp(self.L + self.S) * self.B)

    def _cumtrapz(self, v):
        steps = 0.5 * np.diff(self.lam)[:, None] * (v[1:] + v[:-1])
        return np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(steps, axis=0)])

    def _cumsimpson(self, v):
        """Cumulative Simpson's rule over node pairs (equal spacing within a knot interval); at the odd nodes the
        three-point rule for the first half of the pair."""
        h = np.diff(self.lam)
        out = np.zeros_like(v)
        for i in range(2, len(self.lam), 2):
            w = h[i - 2]
            out[i - 1] = out[i - 2] + w / 12.0 * (5.0 * v[i - 2] + 8.0 * v[i - 1] - v[i])
            out[i] = out[i - 2] + w / 3.0 * (v[i - 2] + 4.0 * v[i - 1] + v[i])
        return out

    def _elements(self, row) -> torch.Tensor:
        """A row over the elements as a tensor that broadcasts against [B, *shape]."""
        row = np.asarray(row)
        return torch.from_numpy(row.copy()).reshape(self.shape if row.size > 1 else (1,) * len(self.shape))

    def at(self, lam):
        i = int(np.argmin(np.abs(self.lam - lam)))
        assert abs(self.lam[i] - lam) < 1e-12 and i % 2 == 0
        return i

    def exp_coefficient(self, i_s, i_t, k):
        """∫_s^t e^{L+S−L_s−S_s}·(λ − λ_s)^k/k! by Simpson on the fine grid."""
        lam = self.lam[i_s:i_t + 1]
        v = np.exp(self.L[i_s:i_t + 1] + self.S[i_s:i_t + 1] - self.L[i_s] - self.S[i_s]) \
            * ((lam - lam[0]) ** k / math.factorial(k))[:, None]
        return ((lam[2::2] - lam[:-2:2])[:, None] / 6.0 * (v[:-2:2] + 4 * v[1:-1:2] + v[2::2])).sum(0)

    def update(self, xs, epss, ts, sched, t, idx, pseudo):
        """The update from the point idx[0] of the lists to t through the points idx (in that order)."""
        n = len(idx) - 1
        i_s = self.at(float(sched.lam(ts[idx[0]])))
        i_t = self.at(float(sched.lam(t)))
        a_s, a_t = float(sched.alpha(ts[idx[0]])), float(sched.alpha(t))
        el = self._elements
        gs, lams = [], []
        for j in idx:
            i_j = self.at(float(sched.lam(ts[j])))
            a_j, s_j = float(sched.alpha(ts[j])), float(sched.sigma(ts[j]))
            f = (s_j * epss[j] - el(self.l[i_j]) * xs[j]) / a_j
            gs.append(el(np.exp(self.S[i_s] - self.S[i_j])) * f - el(np.exp(self.S[i_s]) * (self.B[i_j] - self.B[i_s])))
            lams.append(self.lam[i_j])
        C_term = self.C[i_t] - self.C[i_s] - self.B[i_s] * (self.I[i_t] - self.I[i_s])
        x = (a_t / a_s * el(np.exp(self.L[i_s] - self.L[i_t])) * xs[idx[0]]
             - a_t * el(np.exp(-self.L[i_t] - self.S[i_s]) * (self.I[i_t] - self.I[i_s])) * gs[0]
             - a_t * el(np.exp(-self.L[i_t]) * C_term))
        if n:
            if pseudo:  # divided differences of the newest points, times k!
                table = [gs]
                for k in range(1, n + 1):
                    prev = table[-1]
                    table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[j + k]) for j in range(n + 1 - k)])
                derivs = [table[k][0] * math.factorial(k) for k in range(1, n + 1)]
            else:  # the Taylor coefficients of the interpolating polynomial: a Vandermonde solve
                R = np.array([[(lams[j] - lams[0]) ** k for k in range(1, n + 1)] for j in range(1, n + 1)])
                rhs = torch.stack([gs[j] - gs[0] for j in range(1, n + 1)]).reshape(n, -1).numpy()
                sol = np.linalg.solve(R, rhs)
                derivs = [torch.from_numpy(sol[k - 1].reshape(gs[0].shape)) * math.factorial(k)
                          for k in range(1, n + 1)]
            for k in range(1, n + 1):
                x = x - a_t * el(np.exp(self.L[i_s] - self.L[i_t]) * self.exp_coefficient(i_s, i_t, k)) * derivs[k - 1]
        return x

    def sample(self, eps_fn, sched, x, ts, order, p_pseudo, use_corrector, c_pseudo):
        """order: an int (the authors' schedule of orders) or each step's order; use_corrector: a bool or, per
        step but the last, whether that step is corrected."""
        steps = len(ts) - 1
        xs, epss, p_order = [], [], 0
        for step in range(1, steps + 1):
            xs.append(x)
            epss.append(eps_fn(x, ts[step - 1]))
            if use_corrector if isinstance(use_corrector, bool) else step > 1 and use_corrector[step - 2]:
                c_order = p_order + (1 if c_pseudo else 0)
                if c_order > 1:
                    k = len(xs) - 1  # the official corrector's points: -2, -1, -3, -4, ...
                    idx = [k - 1, k] + list(range(k - 2, -1, -1))[:c_order - 2]
                    new = self.update(xs, epss, ts, sched, ts[step - 1], idx, c_pseudo)
                    lv = self._elements(self.l[self.at(float(sched.lam(ts[step - 1])))])
                    s_t = float(sched.sigma(ts[step - 1]))
                    n_old = s_t * epss[-1] - lv * xs[-1]
                    xs[-1], epss[-1] = new, (n_old + lv * new) / s_t
            p_order = min(min(step, order), steps + 1 - step) if isinstance(order, int) else order[step - 1]
            x = self.update(xs, epss, ts, sched, ts[step], list(range(len(xs) - 1, -1, -1))[:p_order], p_pseudo)
        return x
