"""The time-shift sampler (Li et al., "Alleviating exposure bias in diffusion models through sampling with
shifted time steps", ICLR 2024) on the multistep DPM-Solver(++).

A trained model's samples drift from the noise level their time step promises (exposure bias). Before each model
call above a cut-off time, the time-shift sampler relabels every sample with the time, within a small window
around the nominal one, whose marginal variance best matches the sample's own:

    t_s = argmin over τ ∈ {t + k/N : |k| ≤ window} of | Var(x) − (α_τ²·v + σ_τ²) |

(Var over the sample's elements; v the data's per-sample variance, 0 in the paper, which compares with
σ_τ² = 1 − ᾱ_τ). The model is called at t_s and the next step starts from t_s; the multistep update then reads
per-sample times, so its coefficients differ per sample. They are computed once per grid and settings, in
float64, by the same update code as the plain solver (`multistep_update`, evaluated over points that hold every
allowed candidate of each time it reads) for every combination of candidates; at run time each sample's row is
gathered from that table and the step is one `solver_step` launch with a per-sample [B, n] coefficient table,
which also converts the model's output (its model-output stage, as the fused solvers). No extra model calls and
no host synchronisation: a shifted model call is preceded by one `time_shift_pick` launch (the variance, the
nearest candidate, the sample's row, and the gathers of that row's model time, output conversion and next-step
coefficients, fused), which, after the first call, also makes the update that produced the samples (the pick's
kernel writes the step's result and picks on it: one launch per model call, as the plain solvers), so the whole
loop can be captured in one CUDA graph (`cuda_graph=True`). Eagerly the loop runs on a workspace per input layout:
fixed buffers, and each pick and update checked once (`PlannedPick`, `PlannedStep`); where the pick's kernel
cannot make the update (a model output of another layout, float64 x, a backend other than Triton), they are two
launches.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from pydpm._cache import BoundedCache
from pydpm.ops import solver_step
from pydpm.ops.solver_step import PlannedStep, check_args
from pydpm.ops.time_shift import PlannedPick
from pydpm.samplers._program import (MAX_GRAPHS, MAX_LAYOUTS, Lin, Point, _check_model_output, capture,
                                     check_graph_input, layout_key, points)
from pydpm.schedules import conversion, fused_wrapper


# The most candidate combinations one step's coefficient table holds (float64 rows of up to 4 coefficients).
MAX_ROWS = 1 << 20


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


class Call(NamedTuple):
    """Model call i of the loop: what the row (each sample's index into the next step's tables) becomes there.
    A point that shifts picks its candidate (`time_shift_pick`): row ← (row mod modulus)·K + pick, with
    `promised` [K] its candidates' variances and `times` [R] / `convert` [R, 2] the model's time and output
    conversion per row of the next step (the candidate is the row's last digit). A point that does not shift
    but precedes a step that reads earlier shifted points drops the oldest digits: row ← row mod modulus.
    Otherwise (`modulus` 0) the row is not used."""

    promised: torch.Tensor | None
    modulus: int
    times: torch.Tensor | None
    convert: torch.Tensor | None


class Plan(NamedTuple):
    """What a time-shifted loop needs, built once per model, grid, settings and device."""

    calls: list[Call]             # per model call before the last step
    nominal: list[Point]          # the grid's points
    # per update: host coefficients, or an [R, n] float64 table per row; for x, the newest prediction (converted in
    # the update's launch), then the older ones, oldest first
    steps: list[list[float] | torch.Tensor]


def plan(model_fn: Any, noise_schedule: Any, ts: torch.Tensor, shift: TimeShift, device: torch.device,
         orders: list[int], predict: str, update: Callable[..., Any]) -> Plan:
    """The loop's tables. Step s's update reads the last orders[s] points; evaluated once over Points whose fields
    are tensors holding every candidate of each shifted point along its own axis, the update's Lin gives each
    coefficient for every combination of candidates at once, flattened row-major (the newest point fastest)
    into the step's table. A sample's row in it is the mixed-radix number of its picks at those points, which
    each model call extends by one digit and truncates to the points the next step reads (`Call`): one
    `time_shift_pick` launch per shifted model call at run time, which also gathers the row's entries (and makes
    the update before it)."""
    field = candidate_tables(noise_schedule, ts, shift)
    shifted = field["shifted"].tolist()
    nominal = points(noise_schedule, ts)
    # each point's allowed candidates, moved to the front of its row (the rest stay +inf: never picked)
    order_in_row = torch.argsort(torch.isinf(field["promised"]).to(torch.int8), dim=1, stable=True)
    field = {k: v.gather(1, order_in_row) if v.dim() == 2 else v for k, v in field.items()}
    allowed = torch.isfinite(field["promised"]).sum(1).tolist()
    cand = [Point(*(field[name][i, :allowed[i]] for name in ("t", "log_alpha", "sigma", "lam")))
            for i in range(len(shifted))]
    alpha, sigma = field["log_alpha"].exp(), field["sigma"]
    model_type = model_fn.model_type if fused_wrapper(model_fn) else "noise"
    convert = torch.stack([torch.as_tensor(c, dtype=torch.float64).expand_as(alpha)
                           for c in conversion(model_type, alpha, sigma, predict)], -1)
    times = noise_schedule.model_time(field["t"]) if fused_wrapper(model_fn) else field["t"]
    time_dtype = getattr(noise_schedule, "dtype", torch.float32)
    keep = max(orders)
    steps: list[list[float] | torch.Tensor] = []
    calls = []
    previous: list[int] = []                                        # the shifted points the last row numbers
    for step, order in enumerate(orders, start=1):
        reads = list(range(step - order, step))                     # the points the update reads, oldest first
        axes = [i for i in reads if shifted[i]]
        ps = []
        for i in reads:
            shape = [1] * len(axes)
            if shifted[i]:
                shape[axes.index(i)] = -1
            ps.append(Point(*(v.reshape(shape) for v in cand[i])) if axes else nominal[i])
        stored = min(keep, step)
        y = update(Lin({0: 1.0}), [Lin({j + 1: 1.0}) for j in range(stored)], ps, nominal[step], order)
        cs = [y.c.get(j, 0.0) for j in range(stored + 1)]
        cs = [cs[0], cs[-1], *cs[1:-1]]                             # the order of Plan.steps
        if not axes:
            steps.append([float(c) for c in cs])
            calls.append(Call(None, 0, None, None))
            previous = []
            continue
        sizes = [cand[i].t.numel() for i in axes]
        if math.prod(sizes) > MAX_ROWS:
            raise ValueError(f"time_shift: step {step} reads {len(axes)} shifted times with {sizes} candidates: "
                             f"{math.prod(sizes)} combinations, more than the {MAX_ROWS} its coefficient table "
                             f"holds; use a smaller TimeShift window or a lower order")
        newest = step - 1
        kept = axes[:-1] if shifted[newest] else axes               # the digits the row carries over
        if previous[len(previous) - len(kept):] != kept:
            raise ValueError(f"time_shift: step {step} reads shifted points {axes} but the step before read "
                             f"{previous}; orders may rise by at most one per step (got {orders})")
        modulus = math.prod(sizes[:len(kept)])
        table = torch.stack([torch.as_tensor(c, dtype=torch.float64).expand(sizes).reshape(-1) for c in cs], 1)
        steps.append(table.to(device))
        if shifted[newest]:
            k = allowed[newest]
            calls.append(Call(field["promised"][newest, :k].to(device), modulus,
                              times[newest, :k].repeat(modulus).to(device, time_dtype),
                              convert[newest, :k].repeat(modulus, 1).to(device)))
        else:
            calls.append(Call(None, modulus, None, None))
        previous = axes
    return Plan(calls, nominal, steps)


class _Workspace:
    """One input layout's buffers and pre-checked launches, kept between runs: each sample's row; per shifted call
    its model time and output conversion, per step its coefficients, gathered into fixed buffers (by the shifted
    call's `PlannedPick`, else `index_select(out=)`); per nominal call its model time and conversion, computed
    once; the prediction slots; the samples between steps, two buffers used in turn; per step a `PlannedStep`
    over those buffers, so that a step costs a pointer swap and the C call where the C kernels take it (the
    checked op elsewhere); and each shifted call's `PlannedPick`, planned with the step before it, which it makes in
    its own launch where its kernel can (`PlannedPick.after_step`)."""

    def __init__(self, model_fn: Any, noise_schedule: Any, p: Plan, predict: str, x: torch.Tensor):
        batch, device = x.shape[0], x.device
        self.wrapped = wrapped = fused_wrapper(model_fn)
        time_dtype = getattr(noise_schedule, "dtype", torch.float32)
        model_type = model_fn.model_type if wrapped else "noise"
        self.pair = wrapped and model_fn.pair
        self.guidance = model_fn.guidance_scale if self.pair else None
        keep = max(len(st) if isinstance(st, list) else st.shape[1] for st in p.steps) - 1
        self.row = torch.zeros(batch, dtype=torch.int64, device=device)
        self.coefs = [st if isinstance(st, list) else torch.empty(batch, st.shape[1], dtype=torch.float64,
                                                                  device=device) for st in p.steps]
        self.times: list[torch.Tensor] = []
        self.convert: list[torch.Tensor | list[float]] = []
        picks: list[tuple | None] = []                              # per call: its pick's arguments, if it shifts
        for i, pt in enumerate(p.nominal[:len(p.steps) + 1]):  # every model call, the final denoising one last
            c = p.calls[i] if i < len(p.calls) else None
            if c is not None and c.promised is not None:
                assert c.times is not None and c.convert is not None
                table, coefs = p.steps[i], self.coefs[i]
                assert isinstance(table, torch.Tensor) and isinstance(coefs, torch.Tensor)
                first = not any(picks)                              # the first pick starts the row
                self.times.append(torch.empty(batch, dtype=c.times.dtype, device=device))
                self.convert.append(torch.empty(batch, 2, dtype=torch.float64, device=device))
                picks.append((c.promised, None if first else self.row, c.modulus,
                              ((c.times, self.times[i]), (c.convert, self.convert[i]), (table, coefs))))
                continue
            picks.append(None)
            t_cont = torch.full((batch,), pt.t, dtype=time_dtype, device=device)
            self.times.append(noise_schedule.model_time(t_cont) if wrapped else t_cont)
            self.convert.append([float(k) for k in conversion(model_type, pt.alpha, pt.sigma,
                                                              predict if i < len(p.steps) else "data")])
        slots = [torch.empty_like(x) for _ in range(keep)]
        self.xs = (torch.empty_like(x), torch.empty_like(x))
        # step s (from 1) saves its prediction to slot (s − 1) mod keep and reads the keep − 1 saved before it
        self.steps = []
        for s in range(1, len(p.steps) + 1):
            older = [slots[(j - 1) % keep] for j in range(max(1, s - keep + 1), s)]
            self.steps.append(self._planned(x, older, self.coefs[s - 1], self.convert[s - 1], slots[(s - 1) % keep]))
        self.final = self._planned(x, [], [0.0, 1.0], self.convert[len(p.steps)], None)
        # per call: its pick into row, if it shifts, planned with the update before it (made in one launch where
        # the pick's kernel takes that update)
        self.picks: list[PlannedPick | None] = [
            None if spec is None else PlannedPick(torch.empty_like(x), *spec[:3], self.row, gathers=spec[3],
                                                  step=self.steps[i - 1][0].args if i else None)
            for i, spec in enumerate(picks)]

    def _planned(self, x: torch.Tensor, older: list[torch.Tensor], coefs: Any, convert: Any,
                 save: torch.Tensor | None) -> tuple[PlannedStep, dict[str, Any]]:
        """A step's planned launch and the checked op's arguments for when the planned one does not take it."""
        kw = dict(older=older, coefs=coefs, convert=convert, save=save)
        mo = (torch.empty_like(x), torch.empty_like(x)) if self.pair else torch.empty_like(x)
        return PlannedStep(check_args(torch.empty_like(x), older, coefs, model_output=mo, convert=convert,
                                      guidance_scale=self.guidance, save=save, out=torch.empty_like(x))), kw

    def step(self, which: tuple[PlannedStep, dict[str, Any]], x: torch.Tensor, out: Any,
             result: torch.Tensor) -> torch.Tensor:
        """One update of x with the model's output `out` into `result`."""
        planned, kw = which
        cond, uncond = out if self.pair else (out, None)
        if not planned.launch_planned(x, cond, uncond, result):
            solver_step(x, kw["older"], kw["coefs"], model_output=out, convert=kw["convert"],
                        guidance_scale=self.guidance, save=kw["save"], out=result)
        return result


def time_shifted_multistep(model_fn: Callable[..., torch.Tensor], p: Plan, ws: _Workspace, x: torch.Tensor,
                           denoise_to_zero: bool, intermediates: list[torch.Tensor] | None) -> torch.Tensor:
    """The multistep loop of `DPMSolver.sample` with per-sample shifted times, on the tables of `plan` and the
    buffers of `ws`. x is not modified; the result is a new tensor."""
    def call(x: torch.Tensor, i: int, picked: bool = False) -> Any:
        """The model at call i, at each sample's picked candidate time when point i shifts (picked: in the update's
        launch already), else at the nominal one; the raw output (or classifier-free pair), which the next step
        converts in its own launch."""
        c = p.calls[i] if i < len(p.calls) else None
        pick = ws.picks[i]
        if pick is not None:
            if not picked:
                pick(x)                           # the row, and the model's time, conversion and next coefficients
        elif c is not None and c.modulus:
            torch.remainder(ws.row, c.modulus, out=ws.row)
        out = model_fn.outputs(x, ws.times[i]) if ws.wrapped else model_fn(x, ws.times[i])
        _check_model_output(out, x)
        return out

    out = call(x, 0)
    if intermediates is not None:
        intermediates.append(x.clone())
    for step, table in enumerate(p.steps, start=1):
        if not isinstance(table, list) and ws.picks[step - 1] is None:  # a pick gathers its step's coefficients
            torch.index_select(table, 0, ws.row, out=ws.coefs[step - 1])
        last = step == len(p.steps) and not denoise_to_zero
        result = torch.empty_like(x) if last else ws.xs[step % 2]
        pick = ws.picks[step] if step < len(p.steps) else None
        cond, uncond = out if ws.pair else (out, None)
        picked = pick is not None and pick.after_step(x, cond, uncond, result)    # the update and the next pick
        x = result if picked else ws.step(ws.steps[step - 1], x, out, result)
        if intermediates is not None:
            intermediates.append(x.clone())
        if step < len(p.steps):
            out = call(x, step, picked)
    if denoise_to_zero:
        x = ws.step(ws.final, x, call(x, len(p.steps)), torch.empty_like(x))
        if intermediates is not None:
            intermediates.append(x.clone())
    return x


class Runner:
    """A time-shifted loop (its `Plan`, for one model and schedule), run eagerly on a workspace kept per input
    layout, or replayed from a CUDA graph captured on first use per input layout and setting (with its own
    workspace)."""

    def __init__(self, model_fn: Callable[..., torch.Tensor], noise_schedule: Any, p: Plan, predict: str):
        self.model_fn, self.noise_schedule, self.plan, self.predict = model_fn, noise_schedule, p, predict
        self._workspaces = BoundedCache(MAX_LAYOUTS)
        self._graphs = BoundedCache(MAX_GRAPHS)  # each entry holds its graph's memory pool; the plan's tables live here

    def _workspace(self, x: torch.Tensor) -> _Workspace:
        return _Workspace(self.model_fn, self.noise_schedule, self.plan, self.predict, x)

    def __call__(self, x: torch.Tensor, denoise_to_zero: bool, return_intermediate: bool,
                 cuda_graph: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        def run(x: torch.Tensor, ws: _Workspace) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
            inter: list[torch.Tensor] | None = [] if return_intermediate else None
            return time_shifted_multistep(self.model_fn, self.plan, ws, x, denoise_to_zero, inter), inter

        if not cuda_graph:
            key = layout_key(x)
            ws = self._workspaces.get(key)
            if ws is None:
                ws = self._workspaces.put(key, self._workspace(x))
            return run(x, ws)
        check_graph_input(x, False)
        key = (layout_key(x), bool(denoise_to_zero), bool(return_intermediate))
        entry = self._graphs.get(key)
        if entry is None:
            ws = self._workspace(x)
            entry = self._graphs.put(key, (*capture(lambda x: run(x, ws), x), ws))
        graph, static_in, (out, inter), _ = entry
        static_in.copy_(x)
        graph.replay()
        return out.clone(), None if inter is None else [t.clone() for t in inter]
