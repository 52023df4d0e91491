"""Benchmark cases of `pydpm.ops.solver_step`: a DPM-Solver++(2M) step in the middle of a 20-step sampling
loop, on every pydpm backend, against eager PyTorch, torch.compile and diffusers' schedulers.

Cases (the DPM++ 2M one on every shape, the others on MEDIUM only):
  dpm++2m   x0 = (x − σ·ε)/α from this step's ε, saved as the next step's history; out = a·x + b·x0 + c·x0_prev
  combine   out = a·x + b·m1 + c·m2 (the plain combination, model outputs already converted)
  cfg       dpm++2m on ε = uncond + 7.5·(cond − uncond)
  threshold dpm++2m with Imagen's dynamic thresholding of x0 (per-sample 0.995 quantile of |x0|)
  sde       SDE-DPM-Solver++(2M): dpm++2m plus σ_next·√(1 − e^(−2h))·z, z drawn in the kernel (PhiloxNoise)
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch

from pydpm.ops import PhiloxNoise, Threshold, solver_step, solver_step_reference
from pydpm.ops.solver_step import OP, check_args

from .harness import Case, Impl, Inputs, Row, backend_impls, dtype_str, shape_str

NUM_STEPS, STEP = 20, 10  # diffusers' 20-step schedule, timed at step 10: both history slots are full
GUIDANCE = 7.5
SEED = 2024
SMALL = (1, 4, 64, 64)  # one SD 1.x latent
MEDIUM = (16, 4, 128, 128)  # a batch of SDXL latents
WIDE = (16, 16, 128, 128)


def large(dtype: torch.dtype) -> tuple[int, ...]:
    """A 268 MB (256 MiB) tensor of `dtype`."""
    return (256 // dtype.itemsize, 16, 256, 256)


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]


def shapes(device: torch.device, quick: bool, dtype: torch.dtype) -> list[tuple[int, ...]]:
    if device.type != "cuda":
        return [SMALL, MEDIUM]
    return [SMALL, MEDIUM, WIDE] + ([] if quick else [large(dtype)])


# --------------------------------------------------------------------------------------------------
# Coefficients, from the schedule of diffusers' DPMSolverMultistepScheduler defaults
# --------------------------------------------------------------------------------------------------

def schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) in float64 at the NUM_STEPS + 1 times of diffusers' defaults: linear betas 1e-4..0.02 over 1000
    training steps (cumulative product in float32, as diffusers), 'linspace' spacing, final σ_min."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1 - betas, 0).double()
    t = torch.linspace(0, 999, NUM_STEPS + 1, dtype=torch.float64).round().flip(0)[:-1].long()
    a = torch.cat([alphas_cumprod[t], alphas_cumprod[:1]])
    return a.sqrt(), (1 - a).sqrt()


class Step(NamedTuple):
    """One step from time index i to i + 1: α, σ at i, and the weights of x, x0, x0_prev (, noise)."""

    alpha: float
    sigma: float
    coeffs: list[float]

    @property
    def convert(self) -> list[float]:
        """x0 = (x − σ·ε)/α as solver_step's convert = [1/α, −σ/α]."""
        return [1 / self.alpha, -self.sigma / self.alpha]


def dpm2m(i: int, sde: bool = False) -> Step:
    """DPM-Solver++(2M) from time index i to i + 1, with r = h_prev/h (midpoint form, as diffusers); `sde`:
    SDE-DPM-Solver++(2M), whose last coefficient scales standard normal noise."""
    alpha, sigma = schedule()
    lam = (alpha / sigma).log()
    h, h_prev = (lam[i + 1] - lam[i]).item(), (lam[i] - lam[i - 1]).item()
    r = h_prev / h
    a_next, s_next, a_now, s_now = alpha[i + 1].item(), sigma[i + 1].item(), alpha[i].item(), sigma[i].item()
    if not sde:
        e = math.expm1(-h)
        return Step(a_now, s_now, [s_next / s_now, -a_next * e * (1 + 1 / (2 * r)), a_next * e / (2 * r)])
    g = -math.expm1(-2 * h)
    return Step(a_now, s_now, [s_next / s_now * math.exp(-h), a_next * g * (1 + 1 / (2 * r)),
                               -a_next * g / (2 * r), s_next * math.sqrt(g)])


# --------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------

def diffusers_step(name: str, scheduler: str, model_output: Callable[[Inputs], torch.Tensor], shape, dtype, device,
                   check: bool = True, **config) -> Impl:
    """`scheduler.step(eps, t, x)` of a diffusers scheduler at step STEP of NUM_STEPS. Two warm-up steps fill
    its history; before every call the step index, the order warm-up counter and the last history entry are
    reset, so each call does the same mid-loop step, on this input set's x0_prev."""
    def make():
        import diffusers

        sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, solver_order=2, **config)
        sched.set_timesteps(NUM_STEPS, device=device)
        warm = torch.randn(shape, dtype=dtype, device=device)
        for t in sched.timesteps[:2]:
            sched.step(warm, t, warm)
        t = sched.timesteps[STEP]

        def step(inputs: Inputs) -> torch.Tensor:
            sched._step_index, sched.lower_order_nums = STEP, 2
            sched.model_outputs[-1] = inputs["x0_prev"]
            return sched.step(model_output(inputs), t, inputs["x"]).prev_sample

        return step

    return Impl(name, make, check=check)


def _case(name: str, shape, dtype, device, reads: tuple[str, ...], writes: tuple[str, ...],
          call: Callable[[Callable, Inputs], torch.Tensor], eager: Callable[[Inputs], tuple[torch.Tensor, ...]],
          peers: Sequence[Impl] = (), eager_noise: bool = False) -> Case:
    """A case timing `call(solver_step, inputs)` on every backend against `call(solver_step_reference, ...)`,
    the eager chain `eager(inputs)` (not compared when it draws its own noise), its torch.compile and `peers`.
    Bytes: every read and written tensor once."""
    def inputs() -> Inputs:
        t = {k: torch.randn(shape, dtype=dtype, device=device) for k in reads}
        t.update({k: torch.full(shape, math.nan, dtype=dtype, device=device) for k in writes})
        return t

    def oracle(t: Inputs) -> torch.Tensor:
        return call(solver_step_reference, {k: v.double() for k, v in t.items()})

    impls = backend_impls(OP, partial(call, check_args), partial(call, solver_step)) + [
        Impl("solver_step_reference", lambda: partial(call, solver_step_reference)),
        Impl("eager chain", lambda: eager, check=not eager_noise),
        Impl("torch.compile(eager)", lambda: torch.compile(eager), check=not eager_noise),
        *peers,
    ]
    nbytes = (len(reads) + len(writes)) * math.prod(shape) * dtype.itemsize
    return Case("solver_step", name, shape, dtype, device, inputs, oracle, impls, nbytes=nbytes)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

def dpm2m_case(shape, dtype, device) -> Case:
    k = dpm2m(STEP)
    a, b, c = k.coeffs

    def call(step, t):
        return step(t["x"], [t["x0_prev"]], k.coeffs, model_output=t["eps"], convert=k.convert, save=t["save"],
                    out=t["out"])

    def eager(t):
        x0 = (t["x"] - k.sigma * t["eps"]) / k.alpha
        return a * t["x"] + b * x0 + c * t["x0_prev"], x0

    peers = [diffusers_step("diffusers DPM++2M", "DPMSolverMultistepScheduler", lambda t: t["eps"], shape, dtype,
                            device, algorithm_type="dpmsolver++"),
             diffusers_step("diffusers UniPC-2", "UniPCMultistepScheduler", lambda t: t["eps"], shape, dtype,
                            device, check=False)]  # another method: timed, not compared
    case = _case("dpm++2m", shape, dtype, device, ("x", "eps", "x0_prev"), ("out", "save"), call, eager, peers)
    case.impls.insert(len(OP.backends), graphed(call))
    return case


def graphed(call: Callable[[Callable, Inputs], torch.Tensor]) -> Impl:
    """pydpm's automatic choice captured once per input set in a CUDA graph and replayed: the per-step cost
    inside a captured sampling loop."""
    def make():
        graphs: dict[int, torch.cuda.CUDAGraph] = {}

        def run(t: Inputs) -> torch.Tensor:
            if id(t) not in graphs:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    call(solver_step, t)  # warm-up outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graphs[id(t)] = graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call(solver_step, t)
            graphs[id(t)].replay()
            return t["out"]

        return run

    def reasons(t: Inputs) -> list[str]:
        return [] if t["x"].is_cuda else ["CUDA graphs need a CUDA device"]

    return Impl("pydpm (CUDA graph)", make, ours=True, reasons=reasons)


def combine_case(shape, dtype, device) -> Case:
    coeffs = dpm2m(STEP).coeffs
    a, b, c = coeffs

    def call(step, t):
        return step(t["x"], [t["m1"], t["m2"]], coeffs, out=t["out"])

    def eager(t):
        return (a * t["x"] + b * t["m1"] + c * t["m2"],)

    return _case("combine", shape, dtype, device, ("x", "m1", "m2"), ("out",), call, eager)


def cfg_case(shape, dtype, device) -> Case:
    k = dpm2m(STEP)
    a, b, c = k.coeffs

    def call(step, t):
        return step(t["x"], [t["x0_prev"]], k.coeffs, model_output=(t["cond"], t["uncond"]),
                    guidance_scale=GUIDANCE, convert=k.convert, save=t["save"], out=t["out"])

    def guided(t):
        return t["uncond"] + GUIDANCE * (t["cond"] - t["uncond"])

    def eager(t):
        x0 = (t["x"] - k.sigma * guided(t)) / k.alpha
        return a * t["x"] + b * x0 + c * t["x0_prev"], x0

    peers = [diffusers_step("diffusers CFG+DPM++2M", "DPMSolverMultistepScheduler", guided, shape, dtype, device,
                            algorithm_type="dpmsolver++")]
    return _case("cfg", shape, dtype, device, ("x", "cond", "uncond", "x0_prev"), ("out", "save"), call, eager,
                 peers)


def threshold_case(shape, dtype, device) -> Case:
    """dpm++2m with dynamic thresholding of x0 (diffusers' `thresholding=True`, sample_max_value 2)."""
    k = dpm2m(STEP)
    a, b, c = k.coeffs
    th = Threshold(0.995, 1.0, 2.0)

    def call(step, t):
        return step(t["x"], [t["x0_prev"]], k.coeffs, model_output=t["eps"], convert=k.convert, threshold=th,
                    save=t["save"], out=t["out"])

    def eager(t):
        x0 = (t["x"] - k.sigma * t["eps"]) / k.alpha
        s = torch.quantile(x0.float().abs().reshape(x0.shape[0], -1), th.ratio, dim=1)
        s = s.clamp(th.min_scale, th.max_scale).reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x0 = torch.clamp(x0, -s, s) / s
        return a * t["x"] + b * x0 + c * t["x0_prev"], x0

    peers = [diffusers_step("diffusers +threshold", "DPMSolverMultistepScheduler", lambda t: t["eps"],
                            shape, dtype, device, algorithm_type="dpmsolver++", thresholding=True,
                            dynamic_thresholding_ratio=th.ratio, sample_max_value=th.max_scale)]
    return _case("threshold", shape, dtype, device, ("x", "eps", "x0_prev"), ("out", "save"), call, eager, peers)


def sde_case(shape, dtype, device) -> Case:
    k = dpm2m(STEP, sde=True)
    a, b, c, s = k.coeffs

    def call(step, t):
        return step(t["x"], [t["x0_prev"]], k.coeffs, model_output=t["eps"], convert=k.convert, save=t["save"],
                    noise=PhiloxNoise(SEED, STEP), out=t["out"])

    def eager(t):
        x0 = (t["x"] - k.sigma * t["eps"]) / k.alpha
        return a * t["x"] + b * x0 + c * t["x0_prev"] + s * torch.randn_like(t["x"]), x0

    peers = [diffusers_step("diffusers SDE-DPM++2M", "DPMSolverMultistepScheduler", lambda t: t["eps"], shape,
                            dtype, device, check=False, algorithm_type="sde-dpmsolver++")]  # draws its own noise
    return _case("sde", shape, dtype, device, ("x", "eps", "x0_prev"), ("out", "save"), call, eager, peers,
                 eager_noise=True)


def cases(device: torch.device, quick: bool) -> list[Case]:
    found = [dpm2m_case(shape, dtype, device) for dtype in dtypes(device) for shape in shapes(device, quick, dtype)]
    dtype = dtypes(device)[0]
    return found + [make(MEDIUM, dtype, device) for make in (combine_case, cfg_case, threshold_case, sde_case)]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The DPM++ 2M targets, per pydpm backend, read off the rows (the worst case where several apply)."""
    fp16 = any(case.dtype == torch.float16 for case, _ in results)
    vs_dtype = torch.float16 if fp16 else results[0][0].dtype

    def per_backend(keep: Callable[[Case], bool], value: Callable[[list[Row], Row], float | None], worst):
        found: dict[str, list[float]] = {}
        for case, rows in results:
            for r in rows:
                v = value(rows, r) if case.name == "dpm++2m" and keep(case) and r.ours and r.median_ms else None
                if v is not None:
                    found.setdefault(r.impl, []).append(v)
        return {impl: worst(values) for impl, values in found.items()}

    def vs_diffusers(field: str) -> Callable[[list[Row], Row], float | None]:
        def ratio(rows: list[Row], r: Row) -> float | None:
            peer = next((getattr(p, field) for p in rows if p.impl == "diffusers DPM++2M" and p.median_ms), None)
            return peer and peer / getattr(r, field)
        return ratio

    def line(target: str, values: dict[str, float], fmt: str, met: Callable[[float], bool]) -> str:
        parts = [f"{impl} {fmt.format(v)} ({'met' if met(v) else 'NOT met'})" for impl, v in values.items()]
        return f"{target}: {', '.join(parts) or 'not measured in this run'}"

    return [
        line(">= 80% of copy bandwidth on >= 64 MB tensors",
             per_backend(lambda c: math.prod(c.shape) * c.dtype.itemsize >= 64e6, lambda rows, r: r.of_ceiling, min),
             "{:.0%}", lambda v: v >= 0.8),
        *(line(f"<= 10 us per call, {what}, at {shape_str(SMALL)}",
               per_backend(lambda c: c.shape == SMALL, lambda rows, r: getattr(r, field), max), "{:.1f} us",
               lambda v: v <= 10)
          for what, field in (("in a loop", "loop_us"), ("host+device with a sync per call", "host_device_us"))),
        *(line(f">= 20x diffusers DPM++2M step() at {shape_str(MEDIUM)} {dtype_str(vs_dtype)}, {what}",
               per_backend(lambda c: c.shape == MEDIUM and c.dtype == vs_dtype, vs_diffusers(field), min),
               "{:.1f}x", lambda v: v >= 20)
          for what, field in (("per step in a loop", "loop_us"), ("host+device with a sync per call", "host_device_us"),
                              ("device time", "median_ms"))),
    ]
