"""Sampling programs: a sampler is written once, like the paper, over "vectors" and a model; the same
code runs traced (the default) or eagerly on tensors (adaptive stepping).

Traced, the vectors are `Lin`s, exact float64 linear combinations of symbols: the starting sample, each
model prediction d (x₀ or ε), each injected noise z. A model call needs its input as a tensor, so the
tracer materialises the vector there. `compile_plan` turns the trace into one fused
`pydpm.ops.solver_step` launch per materialisation:

    x_new = a·x_cur + c_d·d_new + Σ c_j·(stored d's) (+ c_z·z)

where x_cur is the last model input, d_new the prediction of the call on x_cur (converted from the raw
model output inside the launch: model type and classifier-free guidance are folded into `convert`; a
prediction is x₀, ε, or any fixed affine k_x·x + k_ε·ε), and the stored d's are the history slots. A
sampler may also add constant tensors (one sample's shape, e.g. DPM-Solver-v3's bias terms): each launch
reads the sum of its constant terms as one more stored operand, built in float64 when a workspace is made and
stored as one sample that the step reads for every sample. Writing every vector in terms of the latest buffer is
what makes UniPC's corrector and the next predictor one launch: the corrected sample is never materialised.

All coefficients are computed once, in float64, when the plan is compiled; at run time they sit in a
device table, so the loop has no host-device synchronisation and can be captured in one CUDA graph.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from typing import Any, Callable, NamedTuple

import torch

from pydpm._cache import BoundedCache
from pydpm.ops import solver_step
from pydpm.ops._framework import forced_backend
from pydpm.ops.solver_step import MAX_MODELS, PhiloxNoise, PlannedStep, Threshold, check_args, philox_normal
from pydpm.schedules import conversion, fused_wrapper

# Residual coefficients this small relative to the terms that produced them are float64 cancellation
# noise of an exact identity (e.g. an old history entry that UniPC's corrector folds away): dropped.
_CANCEL_RTOL = 1e-9
# Per plan: workspaces and bound schedules kept per input layout (`layout_key`), CUDA graphs per layout and, where
# the plan draws noise, seed (each holds its own memory pool: the whole loop's activations).
MAX_LAYOUTS = 8
MAX_GRAPHS = 4


def layout_key(x: torch.Tensor) -> tuple:
    """What a workspace's buffers and planned launches depend on: x's shape, strides, dtype and device, and the
    forced backend."""
    return x.shape, x.stride(), x.dtype, x.device, forced_backend()


class Point(NamedTuple):
    """A time of the schedule with everything a solver reads there (float64). The fields are floats, or float64
    tensors [B] for a point whose time differs per sample (the time-shift sampler)."""

    t: Any
    log_alpha: Any
    sigma: Any
    lam: Any

    @property
    def alpha(self) -> Any:
        return exp(self.log_alpha)


def exp(v: Any) -> Any:
    """e^v of a float or a tensor (a per-sample point's field)."""
    return torch.exp(v) if isinstance(v, torch.Tensor) else math.exp(v)


def expm1(v: Any) -> Any:
    """e^v − 1 of a float or a tensor."""
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def points(noise_schedule, ts: torch.Tensor) -> list[Point]:
    """Points of `noise_schedule` at the float64 times `ts`. t = 0 is the data on every schedule: α = 1,
    σ = 0, λ = +∞ exactly (a discrete schedule would extrapolate its table there)."""
    ts = ts.to(torch.float64).cpu()
    la = noise_schedule.marginal_log_mean_coeff(ts).tolist()
    sig = noise_schedule.marginal_std(ts).tolist()
    lam = noise_schedule.marginal_lambda(ts).tolist()
    return [Point(t, 0.0, 0.0, math.inf) if t == 0 else Point(t, *v) for t, *v in zip(ts.tolist(), la, sig, lam)]


class Lin:
    """A linear combination Σ c_s·s of trace symbols with float64 coefficients (floats, or per-sample float64
    tensors [B] when the time-shift sampler evaluates an update at per-sample points)."""

    __slots__ = ("c",)

    def __init__(self, c: dict[int, float]):
        self.c = c

    def _combine(self, other, sign: float) -> Lin:
        if isinstance(other, (int, float)) and other == 0:
            return self
        if not isinstance(other, Lin):
            return NotImplemented
        c = dict(self.c)
        for s, v in other.c.items():
            c[s] = c.get(s, 0.0) + sign * v
        return Lin(c)

    def __add__(self, other):
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __rsub__(self, other):
        return (-self)._combine(other, 1.0)

    def __neg__(self):
        return Lin({s: -v for s, v in self.c.items()})

    def __mul__(self, k):
        if not isinstance(k, (int, float, torch.Tensor)):  # a tensor: per-sample coefficients [B]
            return NotImplemented
        return Lin({s: k * v for s, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / k)


@dataclasses.dataclass
class Call:
    """A model evaluation on buffer `x` at `point`, predicting `predict` ('data', 'noise', or 'affine':
    affine[0]·x + affine[1]·ε) as `sym`."""

    x: int
    point: Point
    predict: str
    sym: int
    affine: tuple[float, float] | None = None


@dataclasses.dataclass
class Launch:
    """One fused solver_step: out = coef·[x, d?, *models, z?]."""

    x: int                          # symbol of the operand x (the input of `call`, when there is one)
    out: int                        # symbol of the buffer written
    call: Call | None               # the model output consumed (converted to d inside the launch)
    models: list[int]               # stored symbols read
    coefs: list[float]              # [x, d?, *models, z?]
    noise: int | None = None        # index of the Philox stream (offset) when the launch adds noise
    save: bool = False              # write d to its slot (read by a later launch)


@dataclasses.dataclass
class Hook:
    """Hand the current buffer to a user function (`correcting_xt_fn`) or keep a copy (intermediates)."""

    x: int
    point: Point
    step: int
    out: int | None                 # the new root the function's result becomes; None: keep a copy


class _Times:
    """Points of the tracer's schedule (what the sampler programs read)."""

    schedule: Any

    def points(self, ts: torch.Tensor) -> list[Point]:
        return points(self.schedule, ts)

    def point(self, t: float) -> Point:
        return points(self.schedule, torch.tensor([t], dtype=torch.float64))[0]

    def point_at_lambda(self, lam: float) -> Point:
        return self.point(float(self.schedule.inverse_lambda(torch.tensor([lam], dtype=torch.float64))[0]))


class Tracer(_Times):
    """Records a sampler run. `predict` is what `model()` returns: 'data' (x₀) or 'noise' (ε)."""

    def __init__(self, predict: str, schedule):
        self.predict, self.schedule = predict, schedule
        self.kind: list[str] = ["root"]
        self.defn: dict[int, dict[int, float]] = {}
        self.events: list[Any] = []
        self.x = Lin({0: 1.0})
        self.cur = 0
        self.pending: Call | None = None
        self.constants: dict[int, torch.Tensor] = {}

    def _new(self, kind: str) -> int:
        self.kind.append(kind)
        return len(self.kind) - 1

    def _materialise(self, x: Lin) -> int:
        if len(x.c) == 1:
            (s, v), = x.c.items()
            if v == 1.0 and s == self.cur:
                return s
        buf = self._new("buf")
        self.defn[buf] = dict(x.c)
        self.events.append(("launch", buf))
        self.cur, self.pending = buf, None
        return buf

    def _flush(self) -> None:
        """Convert a pending model output whose input is about to stop being the current buffer."""
        if self.pending is not None:
            self.events.append(("flush", self.pending.sym))
            self.pending = None

    def model(self, x: Lin, point: Point, predict: str | None = None,
              affine: tuple[float, float] | None = None) -> Lin:
        buf = self._materialise(x)
        self._flush()
        call = Call(buf, point, "affine" if affine else predict or self.predict, self._new("d"), affine)
        self.events.append(("call", call))
        self.pending = call
        return Lin({call.sym: 1.0})

    def constant(self, value: torch.Tensor) -> Lin:
        """A constant tensor of one sample's shape (float64), added to every sample of the batch."""
        c = self._new("c")
        self.constants[c] = value.detach().to("cpu", torch.float64)
        return Lin({c: 1.0})

    def noise(self) -> Lin:
        z = self._new("z")
        return Lin({z: 1.0})

    def hook(self, x: Lin, point: Point, step: int, fn: bool) -> Lin:
        buf = self._materialise(x)
        if not fn:
            self.events.append(("hook", Hook(buf, point, step, None)))
            return x
        self._flush()
        root = self._new("root")
        self.events.append(("hook", Hook(buf, point, step, root)))
        self.cur = root
        return Lin({root: 1.0})

    def output(self, x: Lin) -> None:
        self.events.append(("output", self._materialise(x)))


@dataclasses.dataclass
class Plan:
    """A compiled trace: the events in order with every launch's coefficients and storage."""

    events: list[Any]
    storage: dict[int, int]          # symbol -> storage index (root 0 is the caller's tensor: no storage)
    n_storage: int
    n_calls: int
    predict: str
    kinds: list[str]                 # symbol -> 'root', 'buf', 'd', 'z' or 'c'
    constants: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # a launch's summed constant

    def kind_of(self, sym: int) -> str:
        return self.kinds[sym]

    @property
    def launches(self) -> list[Launch]:
        return [e[1] for e in self.events if e[0] == "launch"]


def _vec(tr: Tracer, s: int) -> dict[int, float]:
    return tr.defn.get(s, {s: 1.0})


def _decompose(tr: Tracer, target: dict[int, float], cur: int) -> tuple[float, dict[int, float]]:
    """target = a·cur + residual, with a chosen so that cur's dominant unstorable part cancels: its root
    (the starting sample or a correcting_xt_fn result), or, where the root's weight is zero (a step from
    α = 0), the noise it took in. Non-finite coefficients are kept so that the caller refuses them."""
    cv = _vec(tr, cur)
    pivots = [s for s in cv if tr.kind[s] in ("root", "z") and cv[s] != 0.0 and math.isfinite(cv[s])]
    roots = [s for s in pivots if tr.kind[s] == "root"]
    a = 0.0
    if pivots:
        p = max(roots or pivots, key=lambda s: abs(cv[s]))
        a = target.get(p, 0.0) / cv[p]
    res = {}
    for s in set(target) | set(cv):
        t, c = target.get(s, 0.0), a * cv.get(s, 0.0)
        v = t - c
        if not math.isfinite(v) or (v != 0.0 and abs(v) > _CANCEL_RTOL * max(abs(t), abs(c))):
            res[s] = v
    return a, res


_NOT_FINITE = ("the sampler's update is not finite on this time grid (e.g. a noise-prediction update or UniPC's "
               "B(h) = h at α = 0, the start of a flow schedule): use a data-prediction solver (UniPC: "
               "variant='bh2'), or t_start/t_end inside the schedule's open interval (a discrete schedule's σ is "
               "NaN before about half its first time 1/N: use times >= 1/N)")


def compile_plan(tr: Tracer) -> Plan:
    """Turn a trace into launches (coefficients, operands, slots) and assign storage by liveness."""
    events, cur, pending, noise_used, n_calls = [], 0, None, 0, 0
    z_index: dict[int, int] = {}
    kinds, constants = list(tr.kind), {}
    for ev in tr.events:
        kind = ev[0]
        if kind == "call":
            pending = ev[1]
            n_calls += 1
            events.append(ev)
        elif kind == "flush":
            launch = Launch(x=cur, out=ev[1], call=pending, models=[], coefs=[0.0, 1.0])
            events.append(("launch", launch))
            pending = None
        elif kind == "launch":
            buf = ev[1]
            if not all(map(math.isfinite, tr.defn[buf].values())):
                raise ValueError(_NOT_FINITE)
            a, res = _decompose(tr, tr.defn[buf], cur)
            coefs, models, noise = [a], [], None
            if pending is not None:
                coefs.append(res.pop(pending.sym, 0.0))
            zs = [s for s in res if tr.kind[s] == "z"]
            if len(zs) > 1 or any(s in z_index for s in zs):
                raise RuntimeError("a noise term must be consumed by the launch that introduces it")
            const = None
            for s, v in sorted(res.items()):
                if tr.kind[s] == "c":
                    const = v * tr.constants[s] if const is None else const + v * tr.constants[s]
                    continue
                if tr.kind[s] == "z":
                    continue
                models.append(s)
                coefs.append(v)
            if const is not None:  # the launch's constant terms, summed into one operand
                models.append(len(kinds))
                coefs.append(1.0)
                constants[len(kinds)] = const
                kinds.append("c")
            if zs:
                z_index[zs[0]] = noise = noise_used
                noise_used += 1
                coefs.append(res[zs[0]])
            if len(models) > MAX_MODELS:
                raise RuntimeError(f"a launch reads {len(models)} stored tensors; the fused step takes at most "
                                   f"{MAX_MODELS}")
            if not all(map(math.isfinite, coefs)):
                raise ValueError(_NOT_FINITE)
            events.append(("launch", Launch(x=cur, out=buf, call=pending, models=models, coefs=coefs, noise=noise)))
            cur, pending = buf, None
        elif kind == "hook":
            events.append(ev)
            if ev[1].out is not None:
                cur = ev[1].out
        else:
            events.append(ev)
    # Which d's are read after the launch that converts them: those launches save them to a slot.
    read_later = {s for e in events if e[0] == "launch" for s in e[1].models}
    for e in events:
        if e[0] == "launch" and e[1].call is not None and e[1].call.sym in read_later and e[1].out != e[1].call.sym:
            e[1].save = True
    storage, n_storage = _allocate(kinds, events)
    for c in constants:  # constants are written once per workspace and never reused
        storage[c], n_storage = n_storage, n_storage + 1
    return Plan(events, storage, n_storage, n_calls, tr.predict, kinds, constants)


def _allocate(kinds: list[str], events: list[Any]) -> tuple[dict[int, int], int]:
    """Storage for buffers and slots, reusing a tensor once its symbol is dead. Buffers and d slots use
    separate pools so an output never aliases a model operand other than x."""
    last: dict[int, int] = {}
    for i, (kind, e) in enumerate(events):
        if kind == "launch":
            for s in [e.x, *e.models]:
                last[s] = i
        elif kind == "hook":
            last[e.x] = i
        elif kind == "output":
            last[e] = len(events)
    storage: dict[int, int] = {}
    free: dict[str, list[int]] = {"buf": [], "d": []}
    n = 0

    def take(sym: int, pool: str) -> None:
        nonlocal n
        if free[pool]:
            storage[sym] = free[pool].pop()
        else:
            storage[sym], n = n, n + 1

    for i, (kind, e) in enumerate(events):
        if kind == "launch":
            for s in {e.x, *e.models}:  # operands read for the last time: an output may reuse them
                if last.get(s) == i and s in storage:
                    free["d" if kinds[s] == "d" else "buf"].append(storage[s])
            take(e.out, "d" if kinds[e.out] == "d" else "buf")
            if e.save and e.call.sym not in storage:
                take(e.call.sym, "d")
        elif kind == "hook" and e.out is not None:
            take(e.out, "buf")
    return storage, n


# --------------------------------------------------------------------------------------------------
# Running a plan
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
    """What a run needs besides the plan: how to call the model, corrections, noise, progress."""

    model_fn: Callable
    noise_schedule: Any
    threshold: Threshold | None = None             # fused dynamic thresholding of data predictions
    correcting_x0_fn: Callable | None = None       # a user function on x₀ (not fused)
    correcting_xt_fn: Callable | None = None
    seed: int = 0
    progress: bool = False
    model_type: str | None = None                  # what raw outputs are when model_fn is no WrappedModel
                                                   # (a step()-API caller evaluates the model): default 'noise'


class _Bound:
    """A plan bound to a device, dtype and batch size: coefficient and time tables on the device."""

    def __init__(self, plan: Plan, opts: Options, x: torch.Tensor):
        dev, batch = x.device, x.shape[0]
        launches = plan.launches
        width = max((len(l.coefs) for l in launches), default=1)
        table = torch.zeros(max(len(launches), 1), width, dtype=torch.float64)
        conv = torch.zeros(max(len(launches), 1), 2, dtype=torch.float64)
        wrapped = fused_wrapper(opts.model_fn)
        model_type = opts.model_fn.model_type if wrapped else (opts.model_type or "noise")
        for i, l in enumerate(launches):
            table[i, :len(l.coefs)] = torch.tensor(l.coefs, dtype=torch.float64)
            if l.call is not None:
                p = l.call.point
                mt = "data" if opts.correcting_x0_fn is not None and l.call.predict == "data" else model_type
                try:
                    conv[i] = torch.tensor(_convert(mt, p, l.call.predict, l.call.affine), dtype=torch.float64)
                except ZeroDivisionError:
                    raise ValueError(f"the model output cannot be converted to a {l.call.predict} prediction at "
                                     f"t = {p.t} (α = {p.alpha}, σ = {p.sigma}); move t_start/t_end inside the "
                                     f"schedule's open interval") from None
        if not bool(torch.isfinite(conv).all()):
            raise ValueError("converting the model output at this time grid gives non-finite coefficients; move "
                             "t_start/t_end inside the schedule's open interval")
        self.table, self.conv = table.to(dev), conv.to(dev)
        self.rows = [self.table[i, :len(l.coefs)] for i, l in enumerate(launches)]
        self.convs = [self.conv[i] for i in range(len(launches))]
        calls = [e[1] for e in plan.events if e[0] == "call"]
        ts = torch.tensor([c.point.t for c in calls] or [0.0], dtype=torch.float64)
        sdtype = getattr(opts.noise_schedule, "dtype", torch.float32)
        t_cont = ts.to(sdtype).unsqueeze(1).expand(-1, batch).contiguous()
        self.t_cont = t_cont.to(dev)
        self.t_input = opts.noise_schedule.model_time(t_cont).contiguous().to(dev)
        self.t_conts, self.t_inputs = list(self.t_cont.unbind(0)), list(self.t_input.unbind(0))
        self.wrapped = wrapped


def _convert(model_type: str, p: Point, predict: str, affine: tuple[float, float] | None = None) -> tuple[float, float]:
    if model_type == "data":  # already an x₀ tensor (a user correcting_x0_fn ran on it)
        return (0.0, 1.0)
    if predict == "affine":
        assert affine is not None
        e0, e1 = conversion(model_type, p.alpha, p.sigma, "noise")
        return (affine[0] + affine[1] * e0, affine[1] * e1)
    return conversion(model_type, p.alpha, p.sigma, "data" if predict == "data" else "noise")


class _Workspace:
    """Buffers and pre-checked launches (`PlannedStep`s) for one input layout, kept between runs: a
    launch then costs a pointer swap and the C call. The launch writing the plan's output gets a fresh
    tensor every run (the caller keeps it)."""

    def __init__(self, plan: Plan, opts: Options, b: _Bound, x: torch.Tensor):
        self.bound, self.seed = b, opts.seed
        self.layout = (x.shape, x.dtype, x.device)  # what every sample of the workspace shares
        self.store: list[torch.Tensor | None] = [None] * plan.n_storage
        for c, value in plan.constants.items():  # one sample in x's layout, which the step reads for every sample
            self.store[plan.storage[c]] = torch.empty_like(x[:1]).copy_(value.to(x.device))
        self.output = next((e for kind, e in plan.events if kind == "output"), 0)
        self.steps: list[PlannedStep | None] = []
        li = 0
        for kind, e in plan.events:
            if kind != "launch":
                continue
            out = _slot(self.store, plan.storage[e.out], x)
            save = _slot(self.store, plan.storage[e.call.sym], x) if e.save else None
            if all(plan.kind_of(s) in ("d", "c") for s in e.models):  # every operand but x stays put between runs
                has_d = e.call is not None
                pair = has_d and _pair(opts, b.wrapped, e.call)
                mo = (torch.empty_like(x), torch.empty_like(x)) if pair else (torch.empty_like(x) if has_d else None)
                args = check_args(torch.empty_like(x), [self.store[plan.storage[s]] for s in e.models], b.rows[li],
                                  model_output=mo, convert=b.convs[li] if has_d else None,
                                  guidance_scale=opts.model_fn.guidance_scale if pair else None,
                                  threshold=_threshold(opts, e.call), save=save,
                                  noise=PhiloxNoise(opts.seed, e.noise) if e.noise is not None else None, out=out)
                self.steps.append(PlannedStep(args))
            else:
                self.steps.append(None)
            li += 1

    def reseed(self, seed: int) -> None:
        """The planned launches that draw noise draw it from `seed` from now on."""
        for st in self.steps:
            if st is not None and st.args.philox is not None:
                st.reseed(seed)
        self.seed = seed

    def __deepcopy__(self, memo: dict) -> _Workspace:
        """A copy with its own buffers (a scheduler deep-copied mid-run keeps its history). Each PlannedStep holds
        raw pointers into these buffers and the address of its own C parameters, so copying one would launch on
        the original's memory (garbage, or a crash once that is freed): they are rebuilt on the copied buffers."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "steps":
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.steps = [None if st is None else PlannedStep(copy.deepcopy(st.args, memo)) for st in self.steps]
        return new


def _slot(store: list, i: int, like: torch.Tensor) -> torch.Tensor:
    """The tensor of storage index i, allocated like `like` on first use."""
    if store[i] is None:
        store[i] = torch.empty_like(like)
    return store[i]


def _launch(e: Launch, tensor, b: _Bound, li: int, opts: Options, model_output, guidance, save, out) -> None:
    """Launch e through the checked op (the path for launches a PlannedStep does not take). model_output
    is a tensor or a (cond, uncond) pair with its guidance scale."""
    has_d = e.call is not None
    solver_step(tensor(e.x), [tensor(s) for s in e.models], b.rows[li],
                model_output=model_output if has_d else None, convert=b.convs[li] if has_d else None,
                guidance_scale=guidance if has_d else None, threshold=_threshold(opts, e.call), save=save,
                noise=PhiloxNoise(opts.seed, e.noise) if e.noise is not None else None, out=out)


def _pair(opts: Options, wrapped: bool, call: Call) -> bool:
    """Whether call's output reaches the step as a (cond, uncond) pair."""
    corrected = opts.correcting_x0_fn is not None and call.predict == "data"
    return wrapped and opts.model_fn.pair and not corrected


def _threshold(opts: Options, call: Call | None) -> Threshold | None:
    if call is None or call.predict != "data" or opts.correcting_x0_fn is not None:
        return None
    return opts.threshold


def check_graph_input(x: torch.Tensor, progress: bool) -> None:
    if not x.is_cuda:
        raise ValueError("cuda_graph=True needs a CUDA tensor x")
    if progress:
        raise ValueError("cuda_graph=True replays the whole loop at once; it cannot show progress")


def capture(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]:
    """`run` (a sampling loop on device tensors, no host synchronisation) captured in a CUDA graph on a static copy
    of x, after one warm-up run on a side stream (kernels compiled, buffers allocated): (graph, static input, static
    output). To replay: copy the input into the static one, `graph.replay()`, read (and clone) the static output."""
    static_in = x.clone()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        run(static_in)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = run(static_in)
    except Exception as err:  # the model (or a hook) did something a graph cannot hold
        raise RuntimeError(f"capturing the sampling loop in a CUDA graph failed ({err}); the model must be "
                           f"capturable (no host syncs, no CPU tensors, static shapes): run with "
                           f"cuda_graph=False") from err
    return graph, static_in, static_out


class Runner:
    """Executes a plan: model calls and fused launches, eagerly or captured in a CUDA graph."""

    def __init__(self, plan: Plan, opts: Options):
        self.plan, self.opts = plan, opts
        # Where the plan draws noise, a workspace's planned launches are reseeded per run and a captured graph
        # (whose launches hold the seed) is kept per seed.
        self.stochastic = any(kind == "launch" and e.noise is not None for kind, e in plan.events)
        self._bound = BoundedCache(MAX_LAYOUTS)
        self._workspaces = BoundedCache(MAX_LAYOUTS)
        self._graphs = BoundedCache(MAX_GRAPHS)

    def bound(self, x: torch.Tensor) -> _Bound:
        key = (x.device, x.shape[0])
        b = self._bound.get(key)
        if b is None:
            b = self._bound.put(key, _Bound(self.plan, self.opts, x))
        return b

    def workspace(self, x: torch.Tensor, b: _Bound) -> _Workspace:
        key = layout_key(x)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._workspaces.put(key, _Workspace(self.plan, self.opts, b, x))
        elif self.stochastic and ws.seed != self.opts.seed:
            ws.reseed(self.opts.seed)
        return ws

    def __call__(self, x: torch.Tensor, cuda_graph: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not cuda_graph:
            return self._run(x)
        check_graph_input(x, self.opts.progress)
        key = (layout_key(x), self.opts.seed if self.stochastic else None)
        entry = self._graphs.get(key)
        if entry is None:
            graph, static_in, static_out = capture(self._run, x)
            # The graph's launches point into the workspace's buffers and device tables: the entry keeps them
            # alive (the workspace cache may evict it).
            ws = self.workspace(static_in, self.bound(static_in))
            entry = self._graphs.put(key, (graph, static_in, static_out, ws))
        graph, static_in, (out, inter), _ = entry
        static_in.copy_(x)
        graph.replay()
        return out.clone(), [t.clone() for t in inter]

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        plan, opts = self.plan, self.opts
        b = self.bound(x)
        ws = self.workspace(x, b)
        store = ws.store

        def tensor(sym: int) -> torch.Tensor:
            return x if sym == 0 else store[plan.storage[sym]]

        intermediates: list[torch.Tensor] = []
        result = None
        j = li = 0
        cond = uncond = guidance = None
        progress = _Progress(plan.n_calls) if opts.progress else None
        for kind, e in plan.events:
            if kind == "call":
                xin = tensor(e.x)
                raw, guidance = model_outputs(opts, b.wrapped, xin, b.t_conts[j], b.t_inputs[j], e)
                cond, uncond = raw if isinstance(raw, tuple) else (raw, None)
                j += 1
                if progress:
                    progress.update()
            elif kind == "launch":
                has_d = e.call is not None
                out = torch.empty_like(x) if e.out == ws.output else tensor(e.out)
                step = ws.steps[li]
                if step is None or not step.launch_planned(tensor(e.x), cond if has_d else None,
                                                           uncond if has_d else None, out):
                    if has_d:
                        _check_model_output(raw, tensor(e.call.x))
                    _launch(e, tensor, b, li, opts, raw, guidance, tensor(e.call.sym) if e.save else None, out)
                if e.out == ws.output:
                    result = out
                li += 1
            elif kind == "hook":
                xin = tensor(e.x)
                if e.out is None:
                    intermediates.append(xin.clone())
                    continue
                t = torch.full((x.shape[0],), e.point.t, dtype=b.t_cont.dtype, device=x.device)
                r = opts.correcting_xt_fn(xin, t, e.step)
                _check_model_output(r, xin, what="correcting_xt_fn")
                # The result becomes a buffer the plan may overwrite later: never alias caller or plan memory.
                if any(u is not None and u.untyped_storage().data_ptr() == r.untyped_storage().data_ptr()
                       for u in [x, *store]):
                    r = r.clone()
                store[plan.storage[e.out]] = r
        if progress:
            progress.close()
        if result is None:  # the output is x itself or a correcting_xt_fn result: hand out a copy
            result = tensor(ws.output).clone()
        return result, intermediates


def model_outputs(opts: Options, wrapped: bool, x: torch.Tensor, t_cont: torch.Tensor, t_input: torch.Tensor,
                  call: Call):
    """Raw output(s) of a model call on x: a tensor or a (cond, uncond) pair, and the guidance scale (None
    for one tensor). With a user correcting_x0_fn the data prediction is formed here and corrected."""
    fn = opts.model_fn
    if wrapped:
        out, g = fn.outputs(x, t_input), (fn.guidance_scale if fn.pair else None)
    else:
        out, g = fn(x, t_cont), None
    if opts.correcting_x0_fn is not None and call.predict == "data":
        conv = _convert(fn.model_type if wrapped else "noise", call.point, "data")
        x0 = solver_step(x, [], [0.0, 1.0], model_output=out, convert=list(conv), guidance_scale=g)
        return opts.correcting_x0_fn(x0, t_cont), None
    return out, g


class EagerTracer(_Times):
    """Runs a sampler program on tensors: `model()` returns the converted prediction at once (one fused
    conversion launch). For programs whose control flow reads the samples (adaptive stepping)."""

    def __init__(self, predict: str, opts: Options, x: torch.Tensor):
        self.predict, self.opts, self.schedule, self.x = predict, opts, opts.noise_schedule, x
        self.wrapped = fused_wrapper(opts.model_fn)
        self.intermediates: list[torch.Tensor] = []
        self.n_noise = 0

    def noise(self) -> torch.Tensor:
        """The normals the fused launch would draw: Philox(seed, i) for the i-th noise, in memory order."""
        x = self.x
        z = philox_normal(self.opts.seed, self.n_noise, x.numel(), x.device, torch.float64)
        self.n_noise += 1
        return torch.empty_like(x, dtype=torch.float64).copy_(z.as_strided(x.shape, torch.empty_like(x).stride()))

    def hook(self, x: torch.Tensor, point: Point, step: int, fn: bool) -> torch.Tensor:
        if not fn:
            self.intermediates.append(x.clone())
            return x
        t = torch.full((x.shape[0],), point.t, dtype=getattr(self.schedule, "dtype", torch.float32), device=x.device)
        return self.opts.correcting_xt_fn(x, t, step)

    def constant(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.x.device, self.x.dtype)

    def model(self, x: torch.Tensor, point: Point, predict: str | None = None,
              affine: tuple[float, float] | None = None) -> torch.Tensor:
        call = Call(0, point, "affine" if affine else predict or self.predict, 0, affine)
        opts, batch = self.opts, x.shape[0]
        t_cont = torch.full((batch,), point.t, dtype=getattr(self.schedule, "dtype", torch.float32), device=x.device)
        raw, g = model_outputs(opts, self.wrapped, x, t_cont, self.schedule.model_time(t_cont), call)
        _check_model_output(raw, x)
        corrected = opts.correcting_x0_fn is not None and call.predict == "data"
        mt = "data" if corrected else (opts.model_fn.model_type if self.wrapped else "noise")
        thr = opts.threshold if call.predict == "data" and not corrected else None
        return solver_step(x, [], [0.0, 1.0], model_output=raw, convert=list(_convert(mt, point, call.predict, affine)),
                           guidance_scale=g, threshold=thr)


def _check_model_output(out, x: torch.Tensor, what: str = "the model") -> None:
    for o in (out if isinstance(out, tuple) else (out,)):
        if not isinstance(o, torch.Tensor) or o.shape != x.shape or o.dtype != x.dtype or o.device != x.device:
            if isinstance(getattr(o, "sample", None), torch.Tensor):
                raise ValueError(f"{what} returned a {type(o).__name__} (a diffusers output object), not a tensor: "
                                 f"return its tensor, e.g. model_wrapper(lambda x, t: net(x, t).sample, "
                                 f"noise_schedule, ...)")
            got = (f"{type(o).__name__}" if not isinstance(o, torch.Tensor)
                   else f"shape {tuple(o.shape)}, {o.dtype} on {o.device}")
            raise ValueError(f"{what} returned {got}; it must return a tensor shaped like x "
                             f"({tuple(x.shape)}, {x.dtype} on {x.device}). Cast or reshape the model output "
                             f"(e.g. drop learned-variance channels) inside the model function")


class _Progress:
    """A progress bar over model calls: tqdm when installed, else one line on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="pydpm", unit="nfe")
        except ImportError:
            self.bar, self.n, self.total = None, 0, total

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        else:
            self.n += 1
            print(f"\rpydpm: {self.n}/{self.total} model evaluations", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


class Stepper:
    """Drives a plan one model call at a time, for step()-style APIs (diffusers schedulers): the caller
    evaluates the model on the sample it holds and hands the raw output to `step`, which runs the fused
    launch(es) up to the next model input and returns it (a fresh tensor; the caller's sample is never
    written). History slots persist between steps; `start` begins a new run. Launches are pre-checked
    (`PlannedStep`s of a `_Workspace` per sample layout): a step swaps pointers and launches; a sample or model
    output of another layout goes through the checked op, whose messages name what differs."""

    def __init__(self, plan: Plan, opts: Options):
        if any(kind == "hook" for kind, _ in plan.events) or any(
                plan.kind_of(s) not in ("d", "c") for kind, e in plan.events if kind == "launch" for s in e.models):
            raise ValueError("a Stepper drives plans whose launches read only the caller's sample and stored "
                             "predictions (no correcting_xt_fn or intermediates)")
        self.plan, self.opts = plan, opts
        self.segments: list[list[Any]] = []     # events after call k, up to the next call
        for kind, e in plan.events:
            if kind == "call":
                self.segments.append([])
            elif self.segments:
                self.segments[-1].append((kind, e))
        self.calls = [e for kind, e in plan.events if kind == "call"]
        self.first_launch = [0]
        for seg in self.segments:
            self.first_launch.append(self.first_launch[-1] + sum(kind == "launch" for kind, _ in seg))
        self._bound = BoundedCache(MAX_LAYOUTS)
        self._workspaces = BoundedCache(MAX_LAYOUTS)
        self.start()

    @property
    def done(self) -> bool:
        return self.k >= len(self.calls)

    def start(self) -> None:
        """Begin a new run (history slots are written before they are read, so none need clearing)."""
        self.k, self.ws = 0, None

    def _workspace(self, sample: torch.Tensor) -> _Workspace:
        """The run's workspace: its history slots hold this run's predictions, so the sample keeps the shape,
        dtype and device of the run's first step."""
        ws = self.ws
        if ws is not None:
            return ws
        key = layout_key(sample)
        ws = self._workspaces.get(key)
        if ws is None:
            bkey = (sample.device, sample.shape[0])
            b = self._bound.get(bkey) or self._bound.put(bkey, _Bound(self.plan, self.opts, sample))
            ws = self._workspaces.put(key, _Workspace(self.plan, self.opts, b, sample))
        self.ws = ws
        return ws

    def step(self, sample: torch.Tensor, model_output) -> torch.Tensor:
        """Consume the raw model output of the next call (evaluated at `sample`); return the next input."""
        if self.done:
            raise RuntimeError(f"all {len(self.calls)} steps of this schedule have run; call set_timesteps again")
        plan = self.plan
        ws = self._workspace(sample)
        store = ws.store
        given = {self.calls[self.k].x: sample}

        def tensor(sym: int) -> torch.Tensor:
            return given[sym] if sym in given else store[plan.storage[sym]]

        li, result = self.first_launch[self.k], None
        for kind, e in self.segments[self.k]:
            if kind == "launch":
                out = torch.empty_like(sample) if plan.kind_of(e.out) == "buf" else store[plan.storage[e.out]]
                step = ws.steps[li]
                cond = model_output if e.call is not None else None
                if step is None or not step.launch_planned(tensor(e.x), cond, None, out):
                    shape, dtype, device = ws.layout
                    if (sample.shape, sample.dtype, sample.device) != ws.layout:
                        raise ValueError(
                            f"the sample is {tuple(sample.shape)} {sample.dtype} on {sample.device}, but this sampling "
                            f"run began with {tuple(shape)} {dtype} on {device}: keep them for the whole run, or "
                            f"start a new run (set_timesteps)")
                    _check_model_output(model_output, sample)
                    save = store[plan.storage[e.call.sym]] if e.save else None
                    _launch(e, tensor, ws.bound, li, self.opts, model_output, None, save, out)
                given[e.out] = result = out
                li += 1
            elif kind == "output":
                result = tensor(e)
        self.k += 1
        return result
