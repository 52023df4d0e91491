"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al., NeurIPS 2023), computed by the library.

DPM-Solver-v3 writes the diffusion ODE in λ = log(α/σ) with three statistics of the model ε_θ:

    dx/dλ = (α'/α − l_λ)·x − α·f,      f(x, λ) = (σ·ε_θ(x, λ) − l_λ·x)/α
    l_λ = argmin_l E‖σ·∇ₓε_θ − l·I‖²          (the part of the model linear in x, moved into the integrator)
    s_λ, b_λ = argmin E‖f' − s·f − b‖²       (f' = df/dλ along the ODE: the part of f's change that is
                                              linear in f, and its bias)

with the expectations over x_λ = α·x₀ + σ·ε, x₀ from the data. `compute_ems` estimates them on a λ grid:
l by Hutchinson's estimator (σ·v·(∇ₓε_θ v)/D, v Rademacher, one JVP), f' by one JVP along (dx/dλ, dt/dλ).

Here l_λ and s_λ are one number per λ (the least-squares fits of the paper's objectives over scalars; the
paper fits one per element) and b_λ has one sample's shape. Scalar l and s keep every coefficient of the
solver a number, so each step stays one fused launch; b enters as one constant tensor per step. Between
grid points the statistics are linear in λ. `estimate_statistics(..., per_element=True)` fits l and s per
element as the paper does, to measure what one number gives up (`python bench/ems_per_element.py --solve`
runs the paper's solver on both).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pydpm.samplers._common import check_int
from pydpm.samplers._program import _check_model_output
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP, WrappedModel

FORMAT = "pydpm-ems-1"
# f's spread below this many machine epsilons of the terms it is the difference of is round-off (capped at a
# tenth of them: float16 / bfloat16 models leave s = 0 where f varies less than that)
_ROUNDOFF, _ROUNDOFF_CAP = 1000, 0.1
# the largest |∫ l dλ| or |∫ s dλ| over the grid: the solver exponentiates them and sums of two (float64: e^709)
_MAX_INTEGRAL = 300.0
_NODES = 16  # Gauss-Legendre nodes per grid interval: the integrands are smooth there (e^quadratic · polynomial)


class EMS:
    """Empirical model statistics on an increasing λ grid: `lambdas` [K+1], `l` [K+1], `s` [K+1] (float64) and
    `b` [K+1, *sample_shape] (float64), with what they belong to: the schedule's fingerprint (`schedule`)
    and the guidance scale of the model they were computed for (`guidance_scale`, None for an unguided
    model function). `info` holds how they were computed (samples, seconds)."""

    def __init__(self, lambdas: torch.Tensor, l: torch.Tensor, s: torch.Tensor, b: torch.Tensor, *,
                 schedule: dict[str, Any] | None = None, guidance_scale: float | None = None,
                 info: dict[str, Any] | None = None) -> None:
        lam = torch.as_tensor(lambdas, dtype=torch.float64).cpu()
        k = lam.numel()
        if lam.dim() != 1 or k < 2 or not bool(torch.isfinite(lam).all()) or not bool((lam.diff() > 0).all()):
            raise ValueError("EMS: lambdas must be a 1-D increasing grid of at least two finite λ")
        l_, s_ = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (l, s))
        b_ = torch.as_tensor(b, dtype=torch.float64).cpu()
        if l_.shape != (k,) or s_.shape != (k,) or b_.dim() < 1 or b_.shape[0] != k:
            raise ValueError(f"EMS: l and s need shape ({k},) and b ({k}, *sample_shape) for {k} grid points, got "
                             f"{tuple(l_.shape)}, {tuple(s_.shape)} and {tuple(b_.shape)}")
        if not all(bool(torch.isfinite(v).all()) for v in (l_, s_, b_)):
            raise ValueError("EMS: l, s and b must be finite")
        # L(λ) = ∫ l and S(λ) = ∫ s from the grid's start at its points (exact: l and s are piecewise linear)
        self.cumulative = {name: torch.cat([torch.zeros(1, dtype=torch.float64),
                                            torch.cumsum(0.5 * lam.diff() * (v[1:] + v[:-1]), 0)])
                           for name, v in (("l", l_), ("s", s_))}
        for name, integral in self.cumulative.items():
            spread = float(integral.abs().max())
            if spread > _MAX_INTEGRAL:
                raise ValueError(f"EMS: {name} integrates to {spread:.4g} over the λ grid; DPM-Solver-v3's "
                                 f"coefficients are exponentials of these integrals and overflow past "
                                 f"{_MAX_INTEGRAL}: a model's statistics stay far below (compute them with "
                                 f"pydpm.samplers.compute_ems)")
        self.lambdas, self.l, self.s, self.b = lam, l_, s_, b_
        self.has_b = bool(b_.abs().max() > 0)  # b = 0: no constant term in the solver's steps
        self.schedule, self.guidance_scale, self.info = schedule, guidance_scale, dict(info or {})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[1:])

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b,
                "schedule": self.schedule, "guidance_scale": self.guidance_scale, "info": self.info}

    def save(self, path: str | Path) -> None:
        """Write the statistics and what they belong to (schedule, guidance scale) to `path` (torch.save)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> EMS:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as e:  # what torch.load raises for a file it cannot read depends on the bytes in it
            raise ValueError(f"EMS.load: {path} holds no statistics saved by pydpm ({FORMAT}): torch.load could "
                             f"not read it ({type(e).__name__})") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"EMS.load: {path} holds no statistics saved by pydpm ({FORMAT})")
        return cls(state["lambdas"], state["l"], state["s"], state["b"], schedule=state["schedule"],
                   guidance_scale=state["guidance_scale"], info=state["info"])

    @classmethod
    def degenerated(cls, lambdas: torch.Tensor) -> EMS:
        """l = 1, s = 0, b = 0: DPM-Solver-v3 is then the data-prediction DPM-Solver++ (Taylor form)."""
        k = lambdas.numel()
        return cls(lambdas, torch.ones(k), torch.zeros(k), torch.zeros(k, 1))

    def check(self, noise_schedule, guidance_scale: float | None, name: str) -> None:
        """Refuse statistics computed for another schedule or guidance scale (statistics built by hand, with no
        schedule recorded, are taken as they are)."""
        if self.schedule is None:
            return
        now = fingerprint(noise_schedule, self.lambdas)
        if now["kind"] != self.schedule["kind"] or not torch.allclose(
                torch.tensor(now["times"]), torch.tensor(self.schedule["times"]), rtol=1e-9, atol=1e-12):
            raise ValueError(f"{name}: these EMS were computed for another noise schedule ({self.schedule['kind']}); "
                             f"compute them for this one with pydpm.samplers.compute_ems")
        if self.guidance_scale != guidance_scale:
            raise ValueError(f"{name}: these EMS were computed for guidance scale {self.guidance_scale}, the model "
                             f"function has {guidance_scale}: EMS depend on the guided model; compute them for this "
                             f"scale with pydpm.samplers.compute_ems")


def schedule_kind(noise_schedule) -> str:
    """The schedule's class and kind ('NoiseScheduleVP:discrete', ...): part of what a saved file belongs to."""
    return f"{type(noise_schedule).__name__}:{getattr(noise_schedule, 'schedule', '')}"


def fingerprint(noise_schedule, lambdas: torch.Tensor) -> dict[str, Any]:
    """The schedule's kind and the times of the λ grid under it."""
    times = noise_schedule.inverse_lambda(lambdas.to(torch.float64)).to(torch.float64)
    return {"kind": schedule_kind(noise_schedule), "times": times.tolist()}


def guidance_of(model_fn) -> float | None:
    """The guidance scale a model function applies (None: no classifier-free guidance)."""
    if isinstance(model_fn, WrappedModel) and model_fn.guidance_type == "classifier-free":
        return float(model_fn.guidance_scale)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Integrals of the statistics (float64, exact to rounding between grid points)

def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss–Legendre quadrature on [−1, 1] (Golub–Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2.0 * vecs[0] ** 2


class Integrals:
    """L(λ) = ∫ l, S(λ) = ∫ s (closed form: l and s are piecewise linear) and quadrature on [a, b] split at
    the grid points, over the statistics `ems` (or the degenerate l = 1, s = 0, b = 0 when ems is None)."""

    def __init__(self, ems: EMS):
        self.ems = ems
        self.lam = ems.lambdas
        self.width = self.lam.diff()
        self.nodes, self.weights = gauss_legendre(_NODES)
        self.cum = ems.cumulative
        self.b = ems.b.reshape(ems.b.shape[0], -1)
        whole = self._from_point(self.lam[1:], torch.arange(self.lam.numel() - 1))      # row k: interval k
        self._grid_b = torch.cat([torch.zeros(1, self.lam.numel(), dtype=torch.float64), whole.cumsum(0)])

    def check_range(self, lams: list[float], name: str) -> None:
        lo, hi = float(self.lam[0]), float(self.lam[-1])
        tol = 1e-9 * max(1.0, hi - lo)
        bad = [v for v in lams if not lo - tol <= v <= hi + tol]
        if bad:
            raise ValueError(f"{name}: the sampler's times reach λ = {bad[0]:.6g}, outside the λ range of the EMS "
                             f"[{lo:.6g}, {hi:.6g}]: compute the EMS over the sampling interval (compute_ems's "
                             f"t_start/t_end) or sample inside it")

    def _interval(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.lam, lam, right=True).sub(1).clamp(0, self.lam.numel() - 2)

    def integral(self, name: str, lam: torch.Tensor) -> torch.Tensor:
        """∫_{λ_0}^{lam} of the statistic `name` ('l' or 's')."""
        v = self.ems.l if name == "l" else self.ems.s
        i = self._interval(lam)
        d = lam - self.lam[i]
        slope = (v[i + 1] - v[i]) / self.width[i]
        return self.cum[name][i] + v[i] * d + 0.5 * slope * d * d

    def hat(self, lam: torch.Tensor) -> torch.Tensor:
        """[Q, K+1]: the piecewise-linear basis at lam (a statistic is hat(λ) @ values)."""
        i = self._interval(lam)
        w = ((lam - self.lam[i]) / self.width[i]).clamp(0.0, 1.0)
        out = torch.zeros(lam.numel(), self.lam.numel(), dtype=torch.float64)
        rows = torch.arange(lam.numel())
        out[rows, i] = 1.0 - w
        out[rows, i + 1] += w
        return out

    def quadrature(self, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes and weights of ∫_a^b (a < b or a > b), split at the grid points inside."""
        lo, hi = min(a, b), max(a, b)
        inner = self.lam[(self.lam > lo) & (self.lam < hi)]
        cuts = torch.cat([torch.tensor([lo], dtype=torch.float64), inner, torch.tensor([hi], dtype=torch.float64)])
        mid, half = 0.5 * (cuts[1:] + cuts[:-1]), 0.5 * cuts.diff()
        nodes = (mid[:, None] + half[:, None] * self.nodes[None]).reshape(-1)
        weights = (half[:, None] * self.weights[None]).reshape(-1)
        return nodes, weights if b >= a else -weights

    def _from_point(self, lams: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """[Q, K+1]: ∫ from the grid point λ_i to λ of e^{−S}·hat (one Gauss–Legendre rule per λ: inside one
        interval the integrand is smooth)."""
        start = self.lam[i]
        half, mid = 0.5 * (lams - start), 0.5 * (lams + start)
        nodes = mid[:, None] + half[:, None] * self.nodes[None]                        # [Q, G]
        w = half[:, None] * self.weights[None] * torch.exp(-self.integral("s", nodes.reshape(-1))).reshape(nodes.shape)
        u = (nodes - start[:, None]) / self.width[i][:, None]                          # the hat's weight on λ_{i+1}
        out = torch.zeros(lams.numel(), self.lam.numel(), dtype=torch.float64)
        rows = torch.arange(lams.numel())
        out[rows, i] = (w * (1.0 - u)).sum(1)
        out[rows, i + 1] = (w * u).sum(1)
        return out

    def _cumulative_b(self, lams: torch.Tensor) -> torch.Tensor:
        """[Q, K+1]: B(λ) − B(λ_0) = ∫_{λ_0}^λ e^{−S} b as weights on b's grid values: the whole intervals below λ
        (summed once per EMS) plus the part of λ's own interval."""
        i = self._interval(lams)
        return self._grid_b[i] + self._from_point(lams, i)

    def b_integral(self, lo: float, lams: torch.Tensor) -> torch.Tensor:
        """[Q, K+1]: B(λ) − B(lo) = ∫_lo^λ e^{−S} b as weights on b's grid values, for each λ of lams."""
        lams = lams.to(torch.float64).reshape(-1)
        return self._cumulative_b(lams) - self._cumulative_b(torch.tensor([lo], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Estimating the statistics

def compute_ems(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                noise_schedule: NoiseScheduleVP | NoiseScheduleFlow, data: torch.Tensor, *, points: int = 101,
                t_start: float | None = None, t_end: float | None = None, batch: int = 256, seed: int = 0,
                progress: bool = False) -> EMS:
    """Estimate DPM-Solver-v3's statistics of `model_fn` on `points` λ-uniform grid points from t_start to t_end.

    Args:
        model_fn: the noise-prediction model function (x, t) -> ε, t the continuous time ([B] tensor); with
            classifier-free guidance, the guided function (`model_wrapper(..., guidance_scale=...)`): the
            statistics belong to its scale. It must support forward-mode AD (torch.func.jvp) in x and t.
        noise_schedule: the schedule the statistics belong to.
        data: samples x₀ of the data, [N, *sample_shape], on the device the model runs on, in its dtype.
            Every grid point uses all of them, each with fresh noise.
        points: grid points (>= 2); the solver interpolates linearly between them.
        t_start, t_end: the interval (default: the schedule's T and 1/N); a solver using these EMS must sample
            inside it.
        batch: samples per model call.
        seed: the seed of the noise and of Hutchinson's probe vectors.
        progress: report each grid point on stderr.

    Returns:
        An `EMS` (save it with `.save(path)`; load with `EMS.load(path)`). Cost: 3 model evaluations (two of them
        JVPs) per data sample per grid point.
    """
    began = time.perf_counter()
    lambdas, l, s_, b = estimate_statistics(model_fn, noise_schedule, data, points=points, t_start=t_start,
                                            t_end=t_end, batch=batch, seed=seed, progress=progress)
    n, points = data.shape[0], lambdas.numel()
    return EMS(lambdas, l, s_, b, schedule=fingerprint(noise_schedule, lambdas), guidance_scale=guidance_of(model_fn),
               info={"samples": n, "points": points, "seed": seed, "seconds": time.perf_counter() - began,
                     "model_calls": 3 * n * points})


def estimate_statistics(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        noise_schedule: NoiseScheduleVP | NoiseScheduleFlow, data: torch.Tensor, *, points: int = 101,
                        t_start: float | None = None, t_end: float | None = None, batch: int = 256, seed: int = 0,
                        progress: bool = False, per_element: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`compute_ems`'s estimators, arguments and checks: (λ grid [K], l, s, b [K, *sample_shape]), l and s [K] as
    pydpm's solver takes them, or with `per_element` [K, *sample_shape] as the paper fits them (each element's own
    least squares; for measuring what one number per λ gives up: the fused solver takes scalars)."""
    if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] < 2 or not data.is_floating_point():
        raise ValueError(f"compute_ems: data must be a float tensor [N, *sample_shape] with N >= 2 samples x₀, got "
                         f"{type(data).__name__ if not isinstance(data, torch.Tensor) else tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("compute_ems: data holds NaN or inf")
    points = check_int("points", points, 2, " (grid points of the statistics)")
    batch = check_int("batch", batch, 1, " (samples per model call)")
    seed = check_int("seed", seed, 0, " (the noise generator's seed)")
    ns = noise_schedule
    t_T = float(ns.T if t_start is None else t_start)
    t_0 = float(1.0 / ns.total_N if t_end is None else t_end)
    if not (ns.T >= t_T > t_0 > 0):
        raise ValueError(f"compute_ems: needs T >= t_start > t_end > 0, got t_start={t_T}, t_end={t_0}")
    lam_ends = ns.marginal_lambda(torch.tensor([t_T, t_0], dtype=torch.float64)).to(torch.float64)
    if not bool(torch.isfinite(lam_ends).all()):
        raise ValueError(f"compute_ems: λ is infinite at t_start={t_T} or t_end={t_0}; keep both inside the "
                         f"schedule's open interval")
    lambdas = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), points, dtype=torch.float64)
    times = ns.inverse_lambda(lambdas).to(torch.float64)
    dtype, device, n, shape = data.dtype, data.device, data.shape[0], tuple(data.shape[1:])
    dims = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)

    def draws():
        """The data in batches with fresh noise: (x₀ chunk, ε chunk, probe chunk)."""
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            eps = torch.randn((m, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
            probe = (torch.randint(0, 2, (m, *shape), generator=gen) * 2 - 1).to(device, dtype)
            yield data[lo:lo + m], eps, probe

    def schedule_at(t: torch.Tensor):
        return ns.marginal_alpha(t), ns.marginal_std(t)

    def jvp(fn, primals, tangents):
        try:
            return torch.func.jvp(fn, primals, tangents)
        except RuntimeError as err:
            raise RuntimeError(f"compute_ems: forward-mode AD (torch.func.jvp) through model_fn failed ({err}); the "
                               f"statistics need JVPs of the model in x and t") from err

    # Pass 1: l_λ = E[σ·v·(∇ₓε v)]/D (per element: E[σ·v ⊙ (∇ₓε v)]).
    l_vals = []
    for k in range(points):
        t = float(times[k])
        a, s = (float(v) for v in schedule_at(torch.tensor([t], dtype=torch.float64)))
        total: float | torch.Tensor = 0.0
        for x0, eps, v in draws():
            x = a * x0 + s * eps
            tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)
            with torch.no_grad():
                out, jv = jvp(lambda x_: model_fn(x_, tt), (x,), (v,))
            _check_model_output(out, x, what="compute_ems: model_fn")
            product = v.double() * jv.double()
            total += product.sum(0).cpu() if per_element else float(product.sum())
        l_vals.append(s * total / (n if per_element else n * dims))
        if progress:
            print(f"\rcompute_ems: l at {k + 1}/{points} grid points", end="", file=sys.stderr, flush=True)
    l = torch.stack(l_vals) if per_element else torch.tensor(l_vals, dtype=torch.float64)
    # dl/dλ at the grid points (second-order differences), for f' = d/dλ[(σε − l·x)/α].
    if points > 2:
        dl = torch.gradient(l, spacing=(lambdas,), dim=0, edge_order=2)[0]
    else:
        dl = ((l[1] - l[0]) / (lambdas[1] - lambdas[0])).expand_as(l)
    # dt/dλ along the grid: d/dt of λ(t) by forward-mode AD through the schedule.
    dlam_dt = torch.func.jvp(lambda t_: ns.marginal_lambda(t_).to(torch.float64), (times,),
                             (torch.ones_like(times),))[1]
    if not bool(torch.isfinite(dlam_dt).all()) or not bool((dlam_dt != 0).all()):
        raise ValueError("compute_ems: dλ/dt is zero or not finite on the grid: keep t_start/t_end inside the "
                         "schedule's open interval")
    # Pass 2: s_λ, b_λ by least squares of f' on f (s pooled over the elements, or each element's own).
    s_vals, b_rows = [], []
    for k in range(points):
        t = float(times[k])
        a, s = (float(v) for v in schedule_at(torch.tensor([t], dtype=torch.float64)))
        dt = 1.0 / float(dlam_dt[k])
        dloga = float(torch.func.jvp(lambda t_: ns.marginal_log_mean_coeff(t_).to(torch.float64),
                                     (times[k:k + 1],), (torch.ones(1, dtype=torch.float64),))[1]) * dt
        lk, dlk = (v[k].to(device) if per_element else float(v[k]) for v in (l, dl))
        sums = {name: torch.zeros(shape, dtype=torch.float64, device=device)
                for name in ("f", "df", "ff", "fdf", "terms")}
        for x0, eps, _ in draws():
            x = a * x0 + s * eps
            tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)

            def f_of(x_, t_):
                a_, s_ = ns.marginal_alpha(t_).to(x_.dtype), ns.marginal_std(t_).to(x_.dtype)
                a_, s_ = a_.reshape(-1, *[1] * len(shape)), s_.reshape(-1, *[1] * len(shape))
                return (s_ * model_fn(x_, t_) - lk * x_) / a_

            with torch.no_grad():
                e = model_fn(x, tt)
                dx = dloga * x - s * e                                     # dx/dλ of the ODE
                f, df = jvp(f_of, (x, tt), (dx, torch.full_like(tt, dt)))
            f, df = f.double(), df.double() - dlk * x.double() / a
            # the size of the two terms f is the difference of (its round-off is relative to them)
            sums["terms"] += (((s * e.double()).abs() + (lk * x.double()).abs()) / a).square().sum(0)
            sums["f"] += f.sum(0)
            sums["df"] += df.sum(0)
            sums["ff"] += (f * f).sum(0)
            sums["fdf"] += (f * df).sum(0)
        mf, mdf = sums["f"] / n, sums["df"] / n
        var, cov, power = sums["ff"] / n - mf * mf, sums["fdf"] / n - mf * mdf, sums["ff"] / n
        terms = sums["terms"] / n
        if not per_element:
            var, cov, power, terms = (v.sum() for v in (var, cov, power, terms))
        # f with (almost) no spread (e.g. Gaussian data, where l absorbs all of f's dependence on x): s = 0. No
        # spread is small beside f's mean, or within round-off of the terms that cancel in f (zero-mean Gaussian
        # data: f = 0 but for round-off, whose regression would give any s)
        floor = torch.maximum(1e-12 * power, min(_ROUNDOFF * torch.finfo(dtype).eps, _ROUNDOFF_CAP) ** 2 * terms)
        s_k = torch.where(var > floor, cov / var, torch.zeros_like(var))
        s_vals.append(s_k.cpu())
        b_rows.append((mdf - s_k * mf).cpu())
        if progress:
            print(f"\rcompute_ems: s, b at {k + 1}/{points} grid points", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    s_, b = torch.stack(s_vals), torch.stack(b_rows)
    if not all(bool(torch.isfinite(v).all()) for v in (l, s_, b)):
        raise FloatingPointError("compute_ems: the statistics are not finite: check that model_fn returns finite "
                                 "values at these times")
    return lambdas, l, s_, b
