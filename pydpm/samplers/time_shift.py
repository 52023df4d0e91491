"""The time-shift sampler (Li et al., "Alleviating exposure bias in diffusion models through sampling with
shifted time steps", ICLR 2024) on the multistep DPM-Solver(++).

A trained model's samples drift from the noise level their time step promises (exposure bias). Before each model
call above a cut-off time, the time-shift sampler relabels every sample with the time, within a small window
around the nominal one, whose marginal variance best matches the sample's own:

    t_s = argmin over τ ∈ {t + k/N : |k| ≤ window} of | Var(x) − (α_τ²·v + σ_τ²) |

(Var over the sample's elements; v the data's per-sample variance, 0 in the paper, which compares with
σ_τ² = 1 − ᾱ_τ). The model is called at t_s and the next step starts from t_s; the multistep update then reads
per-sample times, so its coefficients differ per sample: they are computed on the device from the chosen times
by the same update code as the plain solver (`multistep_update` over per-sample points) and the step runs as
one `solver_step` launch with a per-sample [B, n] coefficient table. No extra model calls, no host
synchronisation; one variance reduction per shifted step.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from pydpm.ops import solver_step
from pydpm.samplers._program import Lin, Point, _check_model_output, points


@dataclasses.dataclass(frozen=True)
class TimeShift:
    """The time-shift sampler's settings.

    Args:
        window: candidate times on each side of the nominal one, 1/N apart (N: the schedule's total_N, 1000 for
            the usual schedules): 2·window + 1 candidates; 0 switches the shift off. The paper's window sizes
            (10 to 40 discrete steps in all) are window = 5 to 20 here.
        cutoff: shift only at nominal times t > cutoff (the paper's cut-off step c is cutoff = c/N): near the
            data the variance says little about the noise level.
        data_variance: v, the data's variance per sample (over its elements); 0 (the paper's rule) compares the
            sample's variance with σ_τ² alone.
    """

    window: int = 10
    cutoff: float = 0.2
    data_variance: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral) or self.window < 0:
            raise ValueError(f"TimeShift: window={self.window!r} must be an int >= 0 (candidates on each side of "
                             f"the nominal time, 1/N apart)")
        for name, value in (("cutoff", self.cutoff), ("data_variance", self.data_variance)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TimeShift: {name}={value!r} must be a finite number >= 0")


def candidate_tables(noise_schedule: Any, ts: torch.Tensor, shift: TimeShift) -> dict[str, torch.Tensor]:
    """Per model-call point i of the decreasing grid ts (all but the last): the candidate times [P, K] and the
    schedule there (log α, σ, λ), and the variance each candidate promises, +inf where a candidate may not be
    taken: a point at or below the cut-off keeps its nominal time; a shifted time stays within (0, T] and
    between the midpoints to the neighbouring nominal times, so every sample's times keep decreasing. Column
    `window` is the nominal time."""
    n_points, w = ts.numel() - 1, shift.window
    offsets = torch.arange(-w, w + 1, dtype=torch.float64) / noise_schedule.total_N
    tau = ts[:-1, None] + offsets[None, :]
    mids = 0.5 * (ts[:-1] + ts[1:])
    upper = torch.cat([torch.full((1,), float(noise_schedule.T), dtype=torch.float64), mids[:-1]])
    ok = (tau > mids[:, None]) & (tau <= upper[:, None]) & (ts[:-1, None] > shift.cutoff)
    ok |= offsets[None, :] == 0
    flat = torch.where(ok, tau, ts[:-1, None]).reshape(-1)
    pts = points(noise_schedule, flat)
    field = {name: torch.tensor([getattr(p, name) for p in pts], dtype=torch.float64).reshape(n_points, 2 * w + 1)
             for name in ("t", "log_alpha", "sigma", "lam")}
    promised = torch.exp(2 * field["log_alpha"]) * shift.data_variance + field["sigma"] ** 2
    field["promised"] = torch.where(ok, promised, torch.full_like(promised, math.inf))
    field["shifted"] = ok.sum(1) > 1
    return field


def _per_sample(tables: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> Point:
    """The point of model call i for every sample: the candidate whose promised variance is nearest x's."""
    var = x.reshape(x.shape[0], -1).to(torch.float32 if x.dtype != torch.float64 else x.dtype).var(dim=1)
    pick = (var.double()[:, None] - tables["promised"][i][None, :]).abs().argmin(dim=1)
    return Point(*(tables[name][i][pick] for name in ("t", "log_alpha", "sigma", "lam")))


def _table(coefficients: list[Any], batch: int, device: torch.device) -> torch.Tensor | list[float]:
    """solver_step's coefficients: a list of floats, or a per-sample [B, n] float64 table on the device."""
    if not any(isinstance(c, torch.Tensor) for c in coefficients):
        return [float(c) for c in coefficients]
    return torch.stack([c.expand(batch) if isinstance(c, torch.Tensor) else
                        torch.full((batch,), float(c), dtype=torch.float64, device=device) for c in coefficients], 1)


class Plan(NamedTuple):
    """What a time-shifted loop needs, built once per grid, settings and device: the candidate tables on the
    device, which points shift, and the nominal points."""

    tables: dict[str, torch.Tensor]
    shifted: list[bool]
    nominal: list[Point]


def plan(noise_schedule: Any, ts: torch.Tensor, shift: TimeShift, device: torch.device) -> Plan:
    tables = {k: v.to(device) for k, v in candidate_tables(noise_schedule, ts, shift).items()}
    return Plan(tables, tables["shifted"].tolist(), points(noise_schedule, ts))


def time_shifted_multistep(model_fn: Callable[..., torch.Tensor], noise_schedule: Any, x: torch.Tensor, p: Plan,
                           orders: list[int], predict: str, update: Callable[..., Any], denoise_to_zero: bool,
                           intermediates: list[torch.Tensor] | None) -> torch.Tensor:
    """The multistep loop of `DPMSolver.sample` with per-sample shifted times: `update(x, ms, ps, t, order)` is
    the solver's multistep update over Lin vectors (x: symbol 0, ms[j]: symbol j + 1)."""
    batch, device = x.shape[0], x.device
    tables, shifted, nominal = p
    time_dtype = getattr(noise_schedule, "dtype", torch.float32)
    keep = max(orders)

    def prediction(x: torch.Tensor, pt: Point, predict: str) -> torch.Tensor:
        t = pt.t.to(time_dtype) if isinstance(pt.t, torch.Tensor) else torch.full((batch,), pt.t, dtype=time_dtype,
                                                                                  device=device)
        eps = model_fn(x, t)
        _check_model_output(eps, x)
        if predict == "noise":
            return eps
        return solver_step(x, [eps], _table([1.0 / pt.alpha, -pt.sigma / pt.alpha], batch, device))  # (x − σ·ε)/α

    def point(i: int, x: torch.Tensor) -> Point:
        return _per_sample(tables, i, x) if shifted[i] else nominal[i]

    steps = len(orders)
    ps = [point(0, x)]
    ms = [prediction(x, ps[0], predict)]
    if intermediates is not None:
        intermediates.append(x.clone())
    for step in range(1, steps + 1):
        y = update(Lin({0: 1.0}), [Lin({j + 1: 1.0}) for j in range(len(ms))], ps, nominal[step], orders[step - 1])
        x = solver_step(x, ms, _table([y.c.get(s, 0.0) for s in range(len(ms) + 1)], batch, device))
        if intermediates is not None:
            intermediates.append(x.clone())
        if step < steps:
            ps = (ps + [point(step, x)])[-keep:]
            ms = (ms + [prediction(x, ps[-1], predict)])[-keep:]
    if denoise_to_zero:
        x = prediction(x, nominal[-1], "data")
        if intermediates is not None:
            intermediates.append(x.clone())
    return x
