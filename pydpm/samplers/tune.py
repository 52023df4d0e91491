"""A sampler tuned to one model and step budget: time steps and multistep coefficients learned on the
library's own calibration noise against a fine-step solution.

    sampler = tune(model_fn, noise_schedule, nfe=5, shape=(4, 64, 64))
    x = sampler.sample(torch.randn(8, 4, 64, 64))           # nfe model calls, one fused step after each

The objective: the mean squared distance, at t_end, between the sampler and DPM-Solver++(3M) with
`reference_steps` λ-uniform steps, both started from the same calibration noise. The calibration noise comes
from the tuner's own generator (`seed`): the x_T a tuned sampler later samples from are never seen. A
quarter of it is held out (the validation set, which picks the learned method's checkpoint); the candidates are
fitted on the rest, and the one returned is the best on `n_selection` further samples of that generator that
neither a fit nor a checkpoint choice saw:

1. A learned linear multistep method over data predictions m_i = x̂₀(x_i, t_i):

       x_{i+1} = a_i·x_i + Σ_k b_{i,k}·m_{i−k}        (k < min(history, i + 1); one fused solver_step per call)

   It starts as the exponential integrator of the polynomial in λ through the last predictions (order 1:
   DDIM; 2 and 3: the Taylor-consistent DPM-Solver++(2M)/(3M) updates) on the best of the standard time
   grids; the step times, a_i and b_{i,k} are then fitted by gradient descent through the model (Adam,
   cosine-decayed learning rate, minibatches), keeping the parameters with the lowest validation loss
   (checked every `eval_every` iterations, the start included).
2. The best standard solver configuration (DPM-Solver(++) and UniPC: orders, variants, prediction types,
   time grids) on the fit set, as it is: every configuration on every grid is scored on the first 1024 fit
   samples, and the four best there and the best of each family (UniPC with data or with noise prediction,
   DPM-Solver, DPM-Solver++) on every grid over the whole fit set. At 20 steps a thousand samples hold one or
   two of the trajectories that carry the error, so they rank by the rest, where noise prediction is ahead; how
   many trajectories end in the wrong mode of the data depends most on the family, which only the whole fit
   set ranks.
3. That configuration with its time steps searched. The search starts from the best of its grid and 42 warps
   of it (the grid's step density multiplied by a bump 1 + a·exp(−(λ − c)²/2w²) in log-SNR λ: a ∈ {½, 1, 2},
   w an eighth or a sixteenth of the grid's λ range, c at its eighths), then moves each step size
   (Nelder-Mead, no gradients). Both minimise an estimate of the mean error over the whole fit set from
   `search_samples` of it: the half with the largest errors under that solver on any standard grid, all
   counted, and a weighted random draw from the rest. At 20 steps and more the mean is carried by a few
   trajectories near the boundary between two modes of the data that end in the wrong one; a plain subsample
   rarely holds one, and a search on it trades them for the bulk (bench/tune_accuracy.py: as many flipped
   trajectories as the untuned grid). Where a trajectory chooses its mode is a band of λ, the same for all
   of them; the warps put steps there, which a search moving one step at a time seldom finds. The start, when
   it is a warp, is a candidate of its own ("warped"): with a few such trajectories among the search samples,
   the step-by-step search can fit them and lose on fresh noise what the warp gained.
4. With `data` (samples of the data): DPM-Solver-v3 with statistics computed from them (`compute_ems`), its
   order, corrector use and grid chosen on the fit set; and 5., that configuration with its time steps searched
   as in 3 ("v3-warped", "v3-searched").

Measured on Gaussian mixtures (bench/tune_accuracy.py, docs/samplers.md), the learned method wins at few
steps (5-10) and the searched standard solver at more (20).

It needs the model's gradient with respect to its input and time (a differentiable `model_fn`: a network,
a guided wrapper, an analytic model); memory grows with `batch` × `nfe` activations. VP schedules (discrete
and continuous) and flow schedules. A flow sampler starts at t = 1, where α = 0 and λ = −∞: the data
prediction there comes from the raw output of a `model_wrapper` model (a velocity or x₀ model; an ε-model
carries no x₀ at α = 0), the learned method's first step starts as the exact first-order step from λ = −∞, and
later steps' interpolations leave that prediction out (its weight in the λ-polynomial is 0 in the limit); the
grids uniform in λ (logSNR, karras) are skipped.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pydpm.samplers._common import Solver, after_step, check_int
from pydpm.samplers.dpm_solver import DPMSolver
from pydpm.samplers.dpm_solver_v3 import DPMSolverV3
from pydpm.samplers.ems import EMS, compute_ems, gauss_legendre, guidance_of, schedule_kind
from pydpm.samplers.unipc import UniPC
from pydpm.schedules import (SKIP_TYPES, NoiseScheduleFlow, NoiseScheduleVP, WrappedModel, conversion, fused_wrapper,
                             interpolate_fn)

_STANDARD = {"DPMSolver": DPMSolver, "UniPC": UniPC, "DPMSolverV3": DPMSolverV3}
FORMAT = "pydpm-tuned-sampler-1"
_FINALISTS = 4  # the best standard configurations on the subset scored over the whole fit set
_NODES = 16  # Gauss-Legendre nodes per step: exact to rounding for a polynomial of degree < 4 times e^λ here


class TunedSampler(Solver):
    """A sampler tuned by `tune`: `sample(x)` runs len(times) − 1 model calls, each followed by one fused
    solver step; `cuda_graph=True` captures the loop.

    Either a learned multistep method (`a`, `b`) or a standard solver on tuned times (`solver`), never both.
    Attributes: `times` (float64, decreasing, from t_start to t_end); `a` (one per step) and `b` (per step, the
    weights of the last min(history, step + 1) data predictions, oldest first); `solver`: the configuration of
    a DPM-Solver(++) or UniPC run (`{"class": "UniPC" | "DPMSolver", "init": {...}, "sample": {...}}`, the
    keyword arguments of the constructor and of `sample`); `report`: what tuning cost and reached (model calls,
    seconds, every candidate's error on the selection set)."""

    algorithm_types = {"dpmsolver++": "data"}
    default_algorithm = "dpmsolver++"

    def __init__(self, model_fn: Callable[..., torch.Tensor], noise_schedule: NoiseScheduleVP | NoiseScheduleFlow,
                 times: Sequence[float], a: Sequence[float] | None = None, b: Sequence[Sequence[float]] | None = None,
                 *, solver: dict[str, Any] | None = None, report: dict[str, Any] | None = None,
                 ems: EMS | None = None) -> None:
        super().__init__(model_fn, noise_schedule, "dpmsolver++", None, None, 1.0, 0.995)
        ts = self.explicit_times(times, None, None)
        steps = ts.numel() - 1
        if not bool((ts.diff() < 0).all()):
            raise ValueError("TunedSampler: times must decrease (a tuned sampler samples; it does not invert)")
        self.times, self.report = ts, dict(report or {})
        if (solver is None) == (a is None or b is None):
            raise ValueError("TunedSampler: give either a and b (a learned multistep method) or solver (a standard "
                             "solver's configuration)")
        self.solver, self._standard, self.ems = solver, None, ems
        self.a, self.b = [], []
        if solver is not None:
            if not isinstance(solver, dict) or solver.get("class") not in _STANDARD:
                raise ValueError(f"TunedSampler: solver must be a dict with 'class' one of {tuple(_STANDARD)}, 'init' "
                                 f"and 'sample', got {solver!r}")
            if (solver["class"] == "DPMSolverV3") != (ems is not None):
                raise ValueError("TunedSampler: a DPMSolverV3 configuration needs its ems, and only it takes them")
            extra = {"ems": ems} if ems is not None else {}
            self._standard = _STANDARD[solver["class"]](model_fn, noise_schedule, **solver["init"], **extra)
            return
        assert a is not None and b is not None
        if len(a) != steps or len(b) != steps:
            raise ValueError(f"TunedSampler: {steps} steps need {steps} entries in a and in b, got {len(a)} and "
                             f"{len(b)}")
        for i, row in enumerate(b):
            if not 1 <= len(row) <= i + 1:
                raise ValueError(f"TunedSampler: b[{i}] weighs {len(row)} predictions; step {i} has 1 to {i + 1}")
        values = [float(v) for v in a] + [float(v) for row in b for v in row]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("TunedSampler: a and b must be finite")
        self.a = [float(v) for v in a]
        self.b = [[float(v) for v in row] for row in b]

    @property
    def nfe(self) -> int:
        return self.times.numel() - 1

    def sample(self, x: torch.Tensor, *, return_intermediate: bool = False, cuda_graph: bool = False,
               progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample from x (noise at times[0]) to times[-1] with `nfe` model calls. x: float32, float16 or
        bfloat16 (float64 on the CPU), any shape with a leading batch dimension; not modified."""
        if self._standard is not None:
            assert self.solver is not None
            return self._standard.sample(x, times=self.times, return_intermediate=return_intermediate,
                                         cuda_graph=cuda_graph, progress=progress, **self.solver["sample"])
        key = ("tuned", return_intermediate)

        def program(tr, x):
            hooks = after_step(tr, None, return_intermediate)
            ps = tr.points(self.times)
            x = hooks(x, ps[0], 0)
            keep = max(len(row) for row in self.b)
            ms: list = []
            for i, (a, row) in enumerate(zip(self.a, self.b)):
                ms = (ms + [tr.model(x, ps[i])])[-keep:]
                y = a * x
                for w, m in zip(row, ms[-len(row):]):
                    y = y + w * m
                x = hooks(y, ps[i + 1], i + 1)
            return x

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress)

    def state_dict(self) -> dict[str, Any]:
        times = self.times.tolist()
        return {"format": FORMAT, "times": times, "a": self.a or None, "b": self.b or None, "solver": self.solver,
                "report": self.report, "schedule": _fingerprint(self.noise_schedule, times)}

    def save(self, path: str | Path) -> None:
        """Write the tuned sampler (times, coefficients, report, and the schedule it was tuned for) as JSON; a
        DPM-Solver-v3 configuration's EMS go beside it, to `path` + '.ems.pt'."""
        state = self.state_dict()
        if self.ems is not None:
            ems_path = Path(str(path) + ".ems.pt")
            self.ems.save(ems_path)
            state["ems"] = ems_path.name
        Path(path).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, path: str | Path, model_fn: Callable[..., torch.Tensor],
             noise_schedule: NoiseScheduleVP | NoiseScheduleFlow) -> TunedSampler:
        """A sampler saved by `save`, for `model_fn` under `noise_schedule`, which must be the schedule it was
        tuned for (checked: the same kind and the same λ at the tuned times)."""
        try:
            state = json.loads(Path(path).read_text())
        except ValueError as e:  # not UTF-8, or not JSON
            raise ValueError(f"TunedSampler.load: {path} is not a tuned sampler saved by pydpm ({FORMAT}): "
                             f"{type(e).__name__}") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"TunedSampler.load: {path} is not a tuned sampler saved by pydpm ({FORMAT})")
        saved, now = state["schedule"], _fingerprint(noise_schedule, state["times"])
        if saved["kind"] != now["kind"] or not all(
                math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-9) for p, q in zip(saved["lambda"], now["lambda"])):
            raise ValueError(f"TunedSampler.load: noise_schedule differs from the one {path} was tuned for "
                             f"({saved['kind']}, λ at its times {saved['lambda'][:3]}...); tune again for this one")
        ems = EMS.load(Path(path).parent / state["ems"]) if state.get("ems") else None
        return cls(model_fn, noise_schedule, state["times"], state["a"], state["b"], solver=state["solver"],
                   report=state["report"], ems=ems)


def _fingerprint(noise_schedule, times: Sequence[float]) -> dict[str, Any]:
    """What identifies the schedule a sampler was tuned for: its kind and λ at the tuned times."""
    ns = noise_schedule
    return {"kind": schedule_kind(ns),
            "lambda": ns.marginal_lambda(torch.tensor(times, dtype=torch.float64)).tolist()}


# ---------------------------------------------------------------------------------------------------------------
# The tuner

class _Multistep:
    """The tuned sampler's update as a differentiable function of (times, a-scale, b-corrections): the
    exponential-integrator weights of the order-`order` interpolating polynomial at the current times, plus
    learned corrections (a_i scaled by 1 + da_i; b_{i,k} moved by c_i·db_{i,k}, c_i the row's initial size)."""

    def __init__(self, ns: NoiseScheduleVP | NoiseScheduleFlow, t_T: float, t_0: float, nfe: int, order: int,
                 history: int, init_times: torch.Tensor):
        self.ns, self.t_T, self.t_0, self.nfe, self.order, self.history = ns, t_T, t_0, nfe, order, history
        self.u = _log_gaps(init_times).clone().requires_grad_(True)
        self.da = torch.zeros(nfe, dtype=torch.float64, requires_grad=True)
        self.db = torch.zeros(nfe, history, dtype=torch.float64, requires_grad=True)
        self.nodes, self.weights = gauss_legendre(_NODES)
        with torch.no_grad():
            _, _, _, b0 = self.coefficients()
        self.scale = torch.stack([row.abs().sum() for row in b0]).clamp_min(1e-12)

    def parameters(self) -> list[torch.Tensor]:
        return [self.u, self.da, self.db]

    def times(self) -> torch.Tensor:
        return _times(self.u, self.t_T, self.t_0)

    def coefficients(self):
        """(times, α, σ, [b_i]) with the base weights b_i (tensors of min(order, i + 1) entries, oldest first)."""
        ts = self.times()
        alpha, sigma = self.ns.marginal_alpha(ts), self.ns.marginal_std(ts)
        lam = torch.log(alpha) - torch.log(sigma)
        rows = []
        for i in range(self.nfe):
            # λ = −∞ (a flow schedule's t = 1) takes no part in an interpolation: its weight is the limit, 0
            hist = [lam[j] for j in range(max(0, i - self.order + 1), i + 1) if torch.isfinite(lam[j])]
            lo, hi = lam[i], lam[i + 1]
            if not torch.isfinite(lo):  # the first step from λ = −∞: first order, α_{i+1}·∫ e^{τ−λ_{i+1}} dτ = α_{i+1}
                rows.append(alpha[i + 1].reshape(1))
                continue
            tau = 0.5 * (hi - lo) * self.nodes + 0.5 * (hi + lo)
            kernel = self.weights * 0.5 * (hi - lo) * torch.exp(tau - hi)  # e^τ·σ_{i+1} = α_{i+1}·e^(τ − λ_{i+1})
            row = []
            for k, lk in enumerate(hist):
                basis = torch.ones_like(tau)
                for j, lj in enumerate(hist):
                    if j != k:
                        basis = basis * (tau - lj) / (lk - lj)
                row.append(alpha[i + 1] * (kernel * basis).sum())
            rows.append(torch.stack(row))
        return ts, alpha, sigma, rows

    def weights_now(self):
        """(times, α, σ, a [nfe], b: per step min(history, i + 1) weights, oldest first)."""
        ts, alpha, sigma, rows = self.coefficients()
        a = sigma[1:] / sigma[:-1] * (1.0 + self.da)
        b = []
        for i, row in enumerate(rows):
            n = min(self.history, i + 1)
            base = torch.cat([torch.zeros(n - row.numel(), dtype=torch.float64), row])
            b.append(base + self.scale[i] * self.db[i, self.history - n:])
        return ts, alpha, sigma, a, b

    def run(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        ts, _, _, a, b = self.weights_now()
        ts, a = (v.to(x.device, x.dtype) for v in (ts, a))  # the graph stays float64
        b = [row.to(x.device, x.dtype) for row in b]
        ms: list[torch.Tensor] = []
        for i in range(self.nfe):
            ms = (ms + [data_prediction(model_fn, self.ns, x, ts[i])])[-b[i].numel():]
            y = a[i] * x
            for w, m in zip(b[i], ms):
                y = y + w * m
            x = y
        return x

    def export(self) -> tuple[list[float], list[float], list[list[float]]]:
        with torch.no_grad():
            ts, _, _, a, b = self.weights_now()
        return ts.tolist(), a.tolist(), [row.tolist() for row in b]


def data_prediction(model_fn, ns, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂₀ at the time t (a 0-d tensor, differentiable) for every row of x: from a `model_wrapper` model's raw
    output(s) through its model type's conversion (finite at α = 0 for velocity and x₀ models), else from the
    noise prediction, (x − σ·ε)/α."""
    t_vec = t.expand(x.shape[0])
    alpha, sigma = ns.marginal_alpha(t), ns.marginal_std(t)
    wrapped = fused_wrapper(model_fn)
    if wrapped:
        out = model_fn.outputs(x, ns.model_time(t_vec.to(getattr(ns, "dtype", x.dtype))))
        if model_fn.pair:
            cond, uncond = out
            out = uncond + model_fn.guidance_scale * (cond - uncond)
    else:
        out = model_fn(x, t_vec)
    if torch.is_grad_enabled() and not out.requires_grad:
        raise TypeError("tune: the model's output does not depend differentiably on its input and time (no grad): "
                        "tune fits the sampler by gradient descent through model_fn")
    k_x, k_out = conversion(model_fn.model_type if wrapped else "noise", alpha, sigma, "data")
    return k_x * x + k_out * out


def _counting(model_fn, count: Callable[[], None]):
    """model_fn with every evaluation counted; a `model_wrapper` model stays one (its conversion and guidance
    still fuse into the samplers' steps)."""
    if isinstance(model_fn, WrappedModel):
        counted = copy.copy(model_fn)
        inner = model_fn.model

        def model(*args, **kwargs):
            count()
            return inner(*args, **kwargs)

        counted.model = model
        return counted

    def fn(x, t):
        count()
        return model_fn(x, t)

    return fn


def _times(u: torch.Tensor, t_T: float, t_0: float) -> torch.Tensor:
    """Decreasing times from t_T to t_0 whose steps are the fractions softmax(u) of the interval (the ends exact)."""
    c = torch.cumsum(torch.softmax(u, 0), 0)
    inner = t_T + (t_0 - t_T) * c[:-1]
    return torch.cat([torch.full((1,), t_T, dtype=torch.float64), inner, torch.full((1,), t_0, dtype=torch.float64)])


def _log_gaps(ts: torch.Tensor) -> torch.Tensor:
    gaps = -ts.diff()
    return torch.log(gaps / gaps.sum())


def _warped(noise_schedule, ts: torch.Tensor, bump: float, centre: float, width: float,
            fine: int = 64) -> torch.Tensor:
    """ts with its steps re-spaced: their density (steps per step of ts) multiplied by
    1 + bump·exp(−(λ − centre)² / (2·width²)), λ the log-SNR; the ends kept. A bump puts more of the steps where
    λ is near `centre` and keeps the grid's shape elsewhere."""
    n = ts.numel() - 1
    u = torch.linspace(0, n, n * fine + 1, dtype=torch.float64)
    t_fine = interpolate_fn(u, torch.arange(n + 1, dtype=torch.float64), ts)
    lam = noise_schedule.marginal_lambda(t_fine)
    density = 1 + bump * torch.exp(-0.5 * ((lam - centre) / width) ** 2)  # λ = −∞ at a flow's start: density 1
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (density[1:] + density[:-1]), 0)])
    out = interpolate_fn(torch.linspace(0, 1, n + 1, dtype=torch.float64), mass / mass[-1], t_fine)
    out[0], out[-1] = ts[0], ts[-1]
    return out


def _warps(noise_schedule, ts: torch.Tensor) -> list[tuple[dict[str, float], torch.Tensor]]:
    """The lattice of warps (`_warped`) the time-step searches start from, with their parameters: bumps ½, 1
    and 2, widths 1/16 and 1/8 of the grid's λ range, centres at its eighths (42 grids)."""
    lam = noise_schedule.marginal_lambda(ts)
    lo = float(lam[0]) if math.isfinite(float(lam[0])) else float(lam[1])
    span = float(lam[-1]) - lo
    lattice = [{"bump": bump, "centre": lo + span * k / 8, "width": span * w}
               for bump in (0.5, 1.0, 2.0) for w in (1 / 16, 1 / 8) for k in range(1, 8)]
    return [(p, _warped(noise_schedule, ts, p["bump"], p["centre"], p["width"])) for p in lattice]


def _standard_configs() -> list[dict[str, Any]]:
    """The standard solver configurations `tune` compares (each on every grid), no two the same sampler: UniPC
    of order 1 is listed once, lower_order_final lowering nothing there."""
    found: list[dict[str, Any]] = []
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for pred in ("data_prediction", "noise_prediction"):
                for lof in (True, False) if order > 1 else (True,):
                    found.append({"class": "UniPC", "init": {"variant": variant, "algorithm_type": pred},
                                  "sample": {"order": order, "lower_order_final": lof}})
    for alg in ("dpmsolver", "dpmsolver++"):
        for order in (2, 3):
            for solver_type in ("dpmsolver", "taylor"):
                for third in ("authors", "corrected") if order == 3 else ("authors",):
                    found.append({"class": "DPMSolver", "init": {"algorithm_type": alg},
                                  "sample": {"order": order, "solver_type": solver_type, "third_order": third}})
    return found


def _nelder_mead(f: Callable[[torch.Tensor], float], x0: torch.Tensor, evaluations: int,
                 step: float = 0.3) -> tuple[torch.Tensor, float]:
    """Minimise f from x0 with the Nelder-Mead simplex (reflection 1, expansion 2, contraction ½, shrink ½)
    within about `evaluations` calls of f; returns the best point and its value."""
    n = x0.numel()
    pts = [x0.clone()] + [x0 + step * torch.eye(n, dtype=x0.dtype)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    used = n + 1
    while used < evaluations:
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centre = torch.stack(pts[:-1]).mean(0)
        xr = centre + (centre - pts[-1])
        fr = f(xr)
        used += 1
        if fr < vals[0]:
            xe = centre + 2.0 * (centre - pts[-1])
            fe = f(xe)
            used += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centre + 0.5 * (pts[-1] - centre)
            fc = f(xc)
            used += 1
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
                used += n
    best = min(range(n + 1), key=lambda i: vals[i])
    return pts[best], vals[best]


def _search_sample(errors: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples a search runs on and their weights, from `errors` [grids, n] (each sample's error on each
    pilot grid): the size // 2 with the largest error on any grid, each weighted 1/n, and a uniform draw of the
    rest's remaining places, each weighted (its stratum's size / the draw's size) / n; so Σ weight·e is an
    unbiased estimate of the mean of e over all n samples, exact on the hard half. All n (weight 1/n) when
    n <= size."""
    n = errors.shape[1]
    if n <= size:
        return torch.arange(n), torch.full((n,), 1.0 / n, dtype=torch.float64)
    ranked = errors.amax(0).nan_to_num(math.inf).argsort(descending=True)
    hard, rest = ranked[:size // 2], ranked[size // 2:]
    drawn = rest[torch.randperm(rest.numel(), generator=generator)[:size - hard.numel()]]
    weights = torch.cat([torch.ones(hard.numel(), dtype=torch.float64),
                         torch.full((drawn.numel(),), rest.numel() / drawn.numel(), dtype=torch.float64)])
    return torch.cat([hard, drawn]), weights / n


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tune: {name}={value!r} must be a positive number")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"tune: {name}={value!r} must be a finite number > 0")
    return float(value)


def tune(model_fn: Callable[..., torch.Tensor], noise_schedule: NoiseScheduleVP | NoiseScheduleFlow, nfe: int, *,
         shape: Sequence[int], n_calibration: int = 1024, n_selection: int | None = None, seed: int = 0,
         history: int = 3, iterations: int = 1500, batch: int = 512, lr: float | None = None,
         reference_steps: int = 500, eval_every: int = 50, search_evaluations: int | None = None,
         search_samples: int = 2048,
         t_start: float | None = None, t_end: float | None = None, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, progress: bool = False, data: torch.Tensor | None = None,
         ems_points: int = 101) -> TunedSampler:
    """Tune a sampler with `nfe` model calls for `model_fn` (see the module docstring for what is learned).

    Args:
        model_fn: the model as a function of (x, t) returning the noise prediction (as the other solvers take
            it: `pydpm.schedules.model_wrapper(...)`, guidance included), differentiable in x and t, for any
            batch size (tuning runs minibatches of calibration noise: under classifier-free guidance the
            condition must serve every row, e.g. one condition broadcast over the batch; a sampler tuned for one
            condition and guidance scale is tuned for those).
        noise_schedule: a `pydpm.schedules.NoiseScheduleVP` (discrete or continuous) or `NoiseScheduleFlow` (from
            t = 1 with a velocity, x₀ or v `model_wrapper` model; see the module docstring).
        nfe: model calls per sample, an int >= 1.
        shape: the shape of one sample (without the batch dimension).
        n_calibration: calibration samples (noise from the tuner's own generator), >= 1; the objective is a
            mean over them, so a few hundred to a few thousand keep it from fitting a few hard trajectories. At
            10-20 NFE more pays: the rare trajectories that carry the error there are what the searches must see
            (on docs/samplers.md's mixtures at 20 NFE, 65536 with search_samples=8192 beat 16384 with 2048, and
            131072 with 16384 beat 65536 with 8192 on the three cases tried).
        n_selection: fresh calibration samples (default n_calibration) on which the candidates are compared
            once they are fitted: no fit, search or checkpoint choice saw them, so the comparison is not biased
            towards the candidate whose checkpoint was picked on the validation set.
        seed: the calibration generator's seed.
        history: the most data predictions a step combines (1-4).
        iterations: Adam steps of the learned multistep method (0: its untuned start).
        batch: calibration samples per Adam step.
        lr: Adam's initial learning rate (cosine-decayed to 0); default 0.25/nfe², which the mixtures of
            bench/tune_accuracy.py favoured (a larger rate diverged at 20 steps, a smaller one under-fitted at 5).
        search_evaluations: objective evaluations of the time-step search on the best standard solver
            (default 40·nfe; 0: no search), after the 43 that choose where it starts (its grid or a warp of it).
            That solver: the four best configurations on the first 1024 samples of the fit set and the best of
            each family there (UniPC with data or noise prediction, DPM-Solver, DPM-Solver++), each then scored
            on every grid over the whole fit set; the pair (configuration, grid) with the lowest mean error.
        search_samples: fit samples (>= 2) the searches and the choice of DPM-Solver-v3's configuration run on:
            the half with the largest error under that solver on any standard grid, and a random draw from the
            rest weighted to stand for all of it (an estimate of the mean over the whole fit set; the few
            trajectories that end in the wrong mixture component carry most of the error at 20 steps and more,
            and a plain subsample misses them). All of the fit set when it is no larger.
        reference_steps: steps of the DPM-Solver++(3M, λ-uniform, corrected third order) reference.
        eval_every: iterations between evaluations on the validation set (the best one is kept).
        t_start, t_end: the interval (default: the schedule's T and 1/N).
        device, dtype: where and in what the calibration runs (float64 makes the objective exact to rounding).
        progress: print the validation error at every evaluation to stderr.
        data: samples x₀ of the data ([N, *shape]): tune then computes DPM-Solver-v3's statistics
            (`compute_ems`, `ems_points` grid points, 3·N·ems_points model calls) and adds two candidates,
            DPM-Solver-v3 (order 2 or 3, corrector on or off, every standard grid; chosen on the fit set) and
            that configuration on searched time steps (`search_evaluations` more evaluations).
        ems_points: grid points of those statistics.

    Returns a `TunedSampler`; its `report` gives the model calls and seconds tuning took, which candidate was
    chosen and every candidate's RMS error on the selection set.
    """
    began = time.perf_counter()
    if not isinstance(noise_schedule, (NoiseScheduleVP, NoiseScheduleFlow)):
        raise TypeError(f"tune: noise_schedule must be a pydpm.schedules.NoiseScheduleVP or NoiseScheduleFlow, got "
                        f"{type(noise_schedule).__name__}")
    nfe = check_int("nfe", nfe, 1, " (model calls per sample)")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise TypeError(f"tune: shape={shape!r} must be the shape of one sample, a sequence of positive ints")
    n_calibration = check_int("n_calibration", n_calibration, 1, " (calibration samples)")
    n_selection = n_calibration if n_selection is None else check_int(
        "n_selection", n_selection, 1, " (samples that choose between the candidates)")
    ems_points = check_int("ems_points", ems_points, 2, " (grid points of the EMS)")
    if data is not None and (not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != tuple(shape)):
        raise ValueError(f"tune: data must be a tensor [N, *shape] of data samples with shape={tuple(shape)}, got "
                         f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
    history = check_int("history", history, 1, " (data predictions per step)")
    if history > 4:
        raise ValueError(f"tune: history={history}; at most 4 predictions per step")
    iterations = check_int("iterations", iterations, 0, " (Adam steps)")
    batch = check_int("batch", batch, 1, " (calibration samples per step)")
    reference_steps = check_int("reference_steps", reference_steps, 1, " (steps of the reference solution)")
    eval_every = check_int("eval_every", eval_every, 1, " (iterations between full evaluations)")
    seed = check_int("seed", seed, 0, " (the calibration generator's seed)")
    lr = 0.25 / nfe ** 2 if lr is None else _positive("lr", lr)
    search_evaluations = 40 * nfe if search_evaluations is None else check_int(
        "search_evaluations", search_evaluations, 0, " (objective evaluations of the time-step search)")
    search_samples = check_int("search_samples", search_samples, 2, " (fit samples of the time-step search)")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"tune: dtype={dtype}; calibrate in torch.float32 or torch.float64")
    reference_solver = DPMSolver(model_fn, noise_schedule)
    t_T, t_0 = reference_solver.time_range(t_start, t_end)
    if not t_T > t_0 > 0:
        raise ValueError(f"tune: needs t_start > t_end > 0, got {t_T} and {t_0}")

    flow_start = not math.isfinite(float(noise_schedule.marginal_lambda(torch.tensor(t_T, dtype=torch.float64))))
    if flow_start and data is not None:
        raise ValueError(f"tune: data (DPM-Solver-v3's statistics) needs a finite λ at t_start; λ = −∞ at "
                         f"t_start={t_T} of this flow schedule: leave data=None, or tune from a t_start < 1")
    if flow_start and not (fused_wrapper(model_fn) and model_fn.model_type in ("flow", "x_start", "v")):
        raise ValueError(f"tune: sampling from t_start={t_T} (α = 0) needs the data prediction there, which a noise "
                         f"prediction does not carry: pass a model_wrapper(..., model_type='flow' | 'x_start' | 'v') "
                         f"model, or a t_start < 1")
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    counted = _counting(model_fn, count)
    gen = torch.Generator().manual_seed(seed)
    x_cal = torch.randn((n_calibration, *shape), generator=gen, dtype=dtype).to(device)
    x_sel = torch.randn((n_selection, *shape), generator=gen, dtype=dtype).to(device)

    def solve(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return DPMSolver(counted, noise_schedule).sample(
                x, steps=reference_steps, order=3, skip_type="time_uniform" if flow_start else "logSNR",
                third_order="corrected", t_start=t_T, t_end=t_0)

    reference, ref_sel = solve(x_cal), solve(x_sel)

    # The fit set trains the learned method and searches the standard solvers; the held-out quarter (the
    # validation set) picks the learned method's checkpoint; the selection set, fresh noise that no fit or
    # checkpoint saw, picks the candidate returned.
    n_val = max(1, n_calibration // 4)
    n_fit = max(1, n_calibration - n_val)
    val = slice(n_calibration - n_val, n_calibration)

    def mse(method: _Multistep) -> float:
        """The method's mean squared error on the validation set."""
        total, count = 0.0, 0
        with torch.no_grad():
            for lo in range(val.start, val.stop, 1024):
                chunk = slice(lo, min(lo + 1024, val.stop))
                y = method.run(counted, x_cal[chunk])
                total += float((y - reference[chunk]).double().square().sum())
                count += y.numel()
        return total / count

    grids = {}
    for grid in SKIP_TYPES:
        try:
            grids[grid] = reference_solver.grid(grid, t_T, t_0, nfe)
        except ValueError:  # a grid uniform in λ cannot start at λ = −∞
            continue
    starts = []
    for grid, ts in grids.items():
        for order in range(1, min(history, nfe) + 1):
            method = _Multistep(noise_schedule, t_T, t_0, nfe, order, history, ts)
            loss = mse(method)
            if math.isfinite(loss):
                starts.append((loss, grid, order, method))
    if not starts:
        raise FloatingPointError("tune: every standard start (grid × order) gave a non-finite error: check that "
                                 "model_fn returns finite values on the calibration noise")
    start_loss, grid, order, method = min(starts, key=lambda s: s[0])
    best = (start_loss, method.export())
    if progress:
        print(f"tune: start {grid}, order {order}: validation RMS {math.sqrt(start_loss):.3e}", file=sys.stderr)

    if iterations:
        optimizer = torch.optim.Adam(method.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
        pick = torch.Generator().manual_seed(seed + 1)
        for it in range(1, iterations + 1):
            idx = torch.randint(0, n_fit, (min(batch, n_fit),), generator=pick).to(device)
            loss = (method.run(counted, x_cal[idx]) - reference[idx]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if it % eval_every == 0 or it == iterations:
                now = mse(method)
                if progress:
                    print(f"tune: iteration {it}/{iterations}: validation RMS {math.sqrt(now):.3e}", file=sys.stderr)
                if math.isfinite(now) and now < best[0]:
                    best = (now, method.export())
    # 2 and 3: the best standard configuration, then its time steps searched
    sub = slice(0, min(n_fit, 1024))

    def sample_errors(sampler: Callable[..., TunedSampler], x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Each sample's squared error (summed over its elements; inf where the sampler cannot run)."""
        try:
            out = []
            with torch.no_grad():
                for lo in range(0, x.shape[0], 1024):
                    y = sampler(counted).sample(x[lo:lo + 1024])
                    out.append((y - ref[lo:lo + 1024]).double().square().reshape(y.shape[0], -1).sum(1))
        except ValueError:  # an order the step count cannot take
            return torch.full((x.shape[0],), math.inf, dtype=torch.float64)
        errors = torch.cat(out).cpu()
        return torch.where(torch.isfinite(errors), errors, math.inf)

    numel = math.prod(shape)

    def sampler_mse(sampler: Callable[..., TunedSampler], x: torch.Tensor, ref: torch.Tensor) -> float:
        return float(sample_errors(sampler, x, ref).mean()) / numel

    def standard(config: dict[str, Any], ts: torch.Tensor, ems: EMS | None = None) -> Callable[..., TunedSampler]:
        return lambda fn, **kw: TunedSampler(fn, noise_schedule, ts, solver=config, ems=ems, **kw)

    configs = _standard_configs()
    ranked = sorted((sampler_mse(standard(c, ts), x_cal[sub], reference[sub]), i)
                    for i, c in enumerate(configs) for ts in grids.values())
    # the finalists: the four best configurations on the subset and the best of each family (class, prediction type)
    leaders: list[int] = []
    families: dict[tuple[str, str], int] = {}
    for _, i in ranked:
        if i not in leaders and len(leaders) < _FINALISTS:
            leaders.append(i)
        families.setdefault((configs[i]["class"], configs[i]["init"]["algorithm_type"]), i)
    finalists = list(dict.fromkeys(leaders + list(families.values())))
    # the finalists on every grid over the whole fit set: the configuration and grid with the lowest mean error,
    # and the samples the searches weigh (the largest errors on any grid in full, a weighted draw from the rest)
    pilots = {i: {g: sample_errors(standard(configs[i], ts), x_cal[:n_fit], reference[:n_fit])
                  for g, ts in grids.items()} for i in finalists}
    fit_rms = {(i, g): math.sqrt(float(e.mean()) / numel) for i in finalists for g, e in pilots[i].items()}
    chosen_index, standard_grid = min(fit_rms, key=lambda k: fit_rms[k])
    config, pilot = configs[chosen_index], pilots[chosen_index]
    standard_times = grids[standard_grid]
    search_idx, search_weights = _search_sample(torch.stack(list(pilot.values())), search_samples,
                                                torch.Generator().manual_seed(seed + 2))
    x_search, ref_search = x_cal[search_idx.to(x_cal.device)], reference[search_idx.to(x_cal.device)]

    def search_mse(config: dict[str, Any], ts: torch.Tensor, ems: EMS | None = None) -> float:
        """The estimate of the mean squared error over the fit set from the search samples."""
        return float((sample_errors(standard(config, ts, ems), x_search, ref_search) * search_weights).sum()) / numel

    def search(config: dict[str, Any], ts: torch.Tensor,
               ems: EMS | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float] | None]:
        """config's times searched from ts: (the times, the start, its warp). The start is the best of ts and its
        warps (warp None: ts itself); Nelder-Mead over the step sizes goes on from it."""
        warp, start = min([(None, ts)] + _warps(noise_schedule, ts),
                          key=lambda w: search_mse(config, w[1], ems))
        z, _ = _nelder_mead(lambda z: search_mse(config, _times(z, t_T, t_0), ems), _log_gaps(start),
                            search_evaluations)
        return _times(z, t_T, t_0), start, warp

    # each candidate as a builder of its sampler for a model function (the counted one while tuning)
    candidates: dict[str, Callable[..., TunedSampler]] = {
        "learned": lambda fn, **kw: TunedSampler(fn, noise_schedule, *best[1], **kw),
        "standard": standard(config, standard_times)}
    warp = None
    if search_evaluations and nfe > 1:
        searched_times, warped_times, warp = search(config, standard_times)
        if warp is not None:  # the search's start is a candidate too: the step-by-step search can fit its samples
            candidates["warped"] = standard(config, warped_times)
        candidates["searched"] = standard(config, searched_times)
    else:
        candidates["searched"] = standard(config, standard_times)
    ems = v3_grid = v3_config = v3_warp = None
    if data is not None:  # 4: DPM-Solver-v3 with statistics from the data
        ems = compute_ems(counted, noise_schedule, data.to(device, dtype), points=ems_points, t_start=t_T, t_end=t_0,
                          seed=seed, progress=progress)
        v3_configs = [{"class": "DPMSolverV3", "init": {}, "sample": {"order": o, "use_corrector": c}}
                      for o in (2, 3) for c in (True, False)]
        _, v3_grid, v3_config = min(((search_mse(c, ts, ems), g, c) for c in v3_configs for g, ts in grids.items()),
                                    key=lambda s: s[0])
        v3_times = grids[v3_grid]
        candidates["v3"] = standard(v3_config, v3_times, ems)
        if search_evaluations and nfe > 1:
            v3_searched, v3_warped, v3_warp = search(v3_config, v3_times, ems)
            if v3_warp is not None:
                candidates["v3-warped"] = standard(v3_config, v3_warped, ems)
            candidates["v3-searched"] = standard(v3_config, v3_searched, ems)
        ems.guidance_scale = guidance_of(model_fn)  # computed through the counting wrapper: it belongs to model_fn
    errors = {k: sampler_mse(make, x_sel, ref_sel) for k, make in candidates.items()}
    if progress:
        print("tune: selection RMS " + ", ".join(f"{k} {math.sqrt(v):.3e}" for k, v in errors.items()),
              file=sys.stderr)
    chosen = min(errors, key=lambda k: errors[k])
    report = {"nfe": nfe, "chosen": chosen, "selection_rms": {k: math.sqrt(v) for k, v in errors.items()},
              "n_selection": n_selection,
              "learned_start": {"grid": grid, "order": order, "validation_rms": math.sqrt(start_loss)},
              "learned_validation_rms": math.sqrt(best[0]),
              "standard": {"grid": standard_grid, **config, "searched_from": warp,
                           "finalists": [{**configs[i], "fit_rms": {g: fit_rms[i, g] for g in grids}}
                                         for i in finalists]},
              "model_calls": calls,
              "seconds": time.perf_counter() - began, "n_calibration": n_calibration, "iterations": iterations,
              "search_evaluations": search_evaluations, "search_samples": int(search_idx.numel()), "seed": seed,
              "reference_steps": reference_steps}
    if ems is not None:
        report["v3"] = {"grid": v3_grid, **v3_config, "ems": ems.info, "searched_from": v3_warp}
    return candidates[chosen](model_fn, report=report)
