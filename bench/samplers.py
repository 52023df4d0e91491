"""Benchmark cases of the samplers: the overhead of a whole 20-step sampling loop with an
identity-cost model, pydpm eager and captured in a CUDA graph, against diffusers' scheduler loops.

The model returns its input as the noise prediction (ε = x), so it costs nothing on the device and the loop
time is the sampler's own: the per-step arithmetic, the launches and the host work around them. A call of an
implementation is one whole sampling loop from fresh noise x:

  pydpm ... eager    DPMSolver(dpmsolver++).sample / UniPC(bh2).sample(x, steps=20, order=2): one fused
                     solver_step launch per model call, coefficients precomputed on the device
  pydpm ... graph    the same with cuda_graph=True: captured on the first call, replayed after (copy x in,
                     replay, clone the result out)
  diffusers ...      DPMSolverMultistepScheduler / UniPCMultistepScheduler with the default config
                     (dpmsolver++ midpoint, order 2 / bh2, order 2): set_timesteps(20, device) (as a pipeline
                     does for every image; it also resets the scheduler's history), then
                     `for t in timesteps: x = step(x, t, x).prev_sample`

Cases: `dpm2m-20` (DPM-Solver++(2M)) and `unipc-20` (UniPC-bh2, order 2), each with pydpm eager, pydpm graph
and diffusers' loop of the same algorithm, so `vs peer` is the ratio to diffusers' loop of that algorithm;
`fewer-steps-20`: DPM-Solver-v3, a tuned sampler and the time-shift sampler beside DPM-Solver++(3M) (whether
the samplers for fewer steps keep the loop's speed: the footer gives each loop's time over DPM++3M's); at
(1,4,64,64) and (16,4,128,128), fp16 and fp32 on CUDA; on the CPU (1,4,64,64) fp32 only, to stay short,
and the CUDA graph rows are skipped with the reason.

Columns, for one call = one 20-step loop: `eager us` loops back to back with one synchronisation at the end,
per loop (the wall time a sampling loop costs; a host-bound loop is judged by it), `vs peer` its ratio to
diffusers' loop; `device us` CUDA events around the loop with its launches queued behind a blocking kernel
(a loop that synchronises inside, as diffusers' first step and its set_timesteps do, shows its host time there
too); `host us` the cost of issuing a loop. The footer gives, per row, the eager wall time per loop, per step
(/20) and the ratio to diffusers' loop, and reads the targets off them.

Checks, so a broken sampler cannot post a good time: the pydpm rows are compared by the harness with the
same sampler program run unfused on tensors (`solver.eager = True`: float64 arithmetic, no plan, no fused
launch); the graph row must reproduce the eager loop bit for bit; and when the eager row is built,
pydpm.integrations.diffusers' scheduler of the same algorithm (the same programs and fused steps, driven
through step() on diffusers' grid) must give diffusers' own loop output to the dtype's tolerance — the direct
pydpm-vs-diffusers check (the footer lists what it found). The algorithms themselves are checked against
the published update formulas in tests/test_samplers_oracle.py.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .harness import Case, Impl, Inputs, Row, check, dtype_str, shape_str

NUM_STEPS, ORDER = 20, 2
SMALL = (1, 4, 64, 64)  # one SD 1.x latent
MEDIUM = (16, 4, 128, 128)  # a batch of SDXL latents
LOOP_TARGET_MS = 0.3  # whole 20-step loop, identity model, CUDA graph
SPEEDUP_TARGET = 20.0  # >= 20x diffusers per step
EAGER_STEP_US = 10.0  # the native eager loop: <= 10 us per step
DROPIN_STEP_US = 15.0  # a drop-in scheduler's step(): <= 15 us per call
DROPIN_SPEEDUP = {"DPM++2M": 15.0, "UniPC": 20.0}  # the drop-in's 20-step loop against diffusers' own


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]


def shapes(device: torch.device, quick: bool) -> list[tuple[int, ...]]:
    """Both shapes on CUDA; the small one on the CPU, where a diffusers loop at MEDIUM takes ~0.4 s."""
    return [SMALL, MEDIUM] if device.type == "cuda" else [SMALL]


def betas() -> torch.Tensor:
    """diffusers' default training schedule: linear betas 1e-4 … 0.02 over 1000 steps."""
    return torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)


def identity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The identity-cost model: its noise prediction is its input."""
    return x


class Algorithm(NamedTuple):
    """One sampler in both libraries: its case name, pydpm's solver and diffusers' scheduler."""

    case: str
    label: str
    scheduler: str
    make_solver: Callable  # (model_fn, schedule) -> a pydpm solver with .sample


def _dpm_solver(model_fn, ns):
    from pydpm.samplers import DPMSolver

    return DPMSolver(model_fn, ns, algorithm_type="dpmsolver++")


def _unipc(model_fn, ns):
    from pydpm.samplers import UniPC

    return UniPC(model_fn, ns, variant="bh2")


DPM = Algorithm("dpm2m-20", "DPM++2M", "DPMSolverMultistepScheduler", _dpm_solver)
UNIPC = Algorithm("unipc-20", "UniPC", "UniPCMultistepScheduler", _unipc)


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------

def schedule():
    from pydpm.schedules import NoiseScheduleVP

    return NoiseScheduleVP("discrete", betas=betas())


def scheduler_loop(module, algorithm: Algorithm, device) -> tuple[Callable[[Inputs], torch.Tensor], object]:
    """(loop, scheduler): the diffusers-style loop over `module`'s scheduler class of `algorithm` with its
    default config (order 2; dpmsolver++ midpoint / bh2): set_timesteps(20, device) (as a pipeline does for
    every image; it also resets the history), then x = step(x, t, x).prev_sample for every timestep."""
    sched = getattr(module, algorithm.scheduler)()

    def loop(t: Inputs) -> torch.Tensor:
        sched.set_timesteps(NUM_STEPS, device=device)
        x = t["x"]
        for step_t in sched.timesteps:
            x = sched.step(x, step_t, x).prev_sample
        return x

    return loop, sched


# What the pydpm-vs-diffusers check found per case label (read by footer()).
AGREEMENT: dict[str, str] = {}


def integration_mismatch(algorithm: Algorithm, probe: torch.Tensor) -> str:
    """Runs pydpm's diffusers scheduler of `algorithm` (pydpm.integrations.diffusers: the same sampler
    programs and fused steps as pydpm's samplers, on diffusers' grid) and diffusers' own loop on `probe`;
    '' when they agree to the dtype's tolerance, else what differs. Records the outcome in AGREEMENT."""
    label = f"{algorithm.case} {shape_str(tuple(probe.shape))} {dtype_str(probe.dtype)}"
    try:
        import diffusers

        from pydpm.integrations import diffusers as integration
    except ImportError as exc:
        AGREEMENT[label] = f"not checked ({exc})"
        return ""
    ours, _ = scheduler_loop(integration, algorithm, probe.device)
    theirs, _ = scheduler_loop(diffusers, algorithm, probe.device)
    y, expected = ours({"x": probe}).double(), theirs({"x": probe}).double()
    err = ((y - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    mismatch = check(y, expected, probe.dtype)
    AGREEMENT[label] = f"max error {err:.1e} of max |diffusers| ({'MISMATCH' if mismatch else 'ok'})"
    return mismatch


def pydpm_impl(algorithm: Algorithm, graph: bool, shape, dtype, device) -> Impl:
    """pydpm's sampler on the identity model, eager or with cuda_graph=True. Checked once when built, on a
    fresh input: the eager row runs pydpm.integrations.diffusers' scheduler of the same algorithm against
    diffusers' loop (same grid: a direct pydpm-vs-diffusers check); the graph row must reproduce the eager
    loop bit for bit (this also captures the graph)."""
    def make():
        from pydpm.schedules import model_wrapper

        ns = schedule()
        solver = algorithm.make_solver(model_wrapper(identity, ns, model_type="noise"), ns)

        def loop(t: Inputs) -> torch.Tensor:
            return solver.sample(t["x"], steps=NUM_STEPS, order=ORDER, cuda_graph=graph)

        probe = torch.randn(shape, dtype=dtype, device=device)
        if graph:
            eager = solver.sample(probe, steps=NUM_STEPS, order=ORDER)
            loop({"x": probe})  # captures
            replayed = loop({"x": probe})
            if not torch.equal(eager, replayed):
                err = (eager.double() - replayed.double()).abs().max().item()
                raise RuntimeError(f"the CUDA graph replay differs from the eager loop (max |diff| {err:.2e}); "
                                   f"it must match bit for bit")
        else:
            mismatch = integration_mismatch(algorithm, probe)
            if mismatch:
                raise RuntimeError(f"pydpm.integrations.diffusers.{algorithm.scheduler} disagrees with diffusers' "
                                   f"loop: {mismatch}")
        return loop

    def reasons(t: Inputs) -> list[str]:
        return ["CUDA graphs need a CUDA device"] if graph and not t["x"].is_cuda else []

    return Impl(f"pydpm {algorithm.label} {'graph' if graph else 'eager'}", make, ours=True, reasons=reasons)


def dropin_impl(algorithm: Algorithm, device) -> Impl:
    """pydpm.integrations.diffusers' scheduler of the same class and config, driven by the same diffusers-style
    loop as diffusers' own: what a pipeline gets by swapping its scheduler (one fused launch per step())."""
    def make():
        from pydpm.integrations import diffusers as integration

        return scheduler_loop(integration, algorithm, device)[0]

    return Impl(f"pydpm drop-in {algorithm.label}", make, ours=True, check=False)


def diffusers_impl(algorithm: Algorithm, shape, dtype, device) -> Impl:
    """diffusers' scheduler loop with the default config. It runs on diffusers' own time grid, so it is not
    compared with the case oracle; pydpm's scheduler on that grid is compared with it (integration_mismatch)."""
    def make():
        import diffusers

        return scheduler_loop(diffusers, algorithm, device)[0]

    return Impl(f"diffusers {algorithm.label}", make, check=False)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

def loop_case(algorithm: Algorithm, shape, dtype, device) -> Case:
    """One 20-step loop of `algorithm`. Bytes: 20 fused steps of the size of a DPM-Solver++(2M) step (read x,
    ε and one history entry; write x and the new entry), the least a fused loop moves."""
    from pydpm.schedules import model_wrapper

    ns = schedule()
    unfused = algorithm.make_solver(model_wrapper(identity, ns, model_type="noise"), ns)
    unfused.eager = True  # the same program on tensors, no plan or fused launch

    def inputs() -> Inputs:
        return {"x": torch.randn(shape, dtype=dtype, device=device)}

    def oracle(t: Inputs) -> torch.Tensor:
        return unfused.sample(t["x"].double(), steps=NUM_STEPS, order=ORDER)

    impls = [pydpm_impl(algorithm, False, shape, dtype, device), pydpm_impl(algorithm, True, shape, dtype, device),
             dropin_impl(algorithm, device), diffusers_impl(algorithm, shape, dtype, device)]
    nbytes = NUM_STEPS * 5 * math.prod(shape) * dtype.itemsize
    return Case("samplers", algorithm.case, shape, dtype, device, inputs, oracle, impls, nbytes=nbytes)


FEWER_STEPS = "fewer-steps-20"


def _random_ems(ns, shape: tuple[int, ...]):
    """DPM-Solver-v3 statistics with every term active (l and s varying over λ, b per element; the loop's cost
    does not depend on their values): 101 points over the sampling interval."""
    from pydpm.samplers import EMS

    g = torch.Generator().manual_seed(0)
    lam = ns.marginal_lambda(torch.tensor([float(ns.T), 1.0 / ns.total_N], dtype=torch.float64)).double()
    lambdas = torch.linspace(float(lam[0]), float(lam[1]), 101, dtype=torch.float64)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    return EMS(lambdas, 0.8 + 0.2 * torch.sin(5 * u), 0.3 * torch.cos(4 * u) - 0.1,
               0.1 * torch.randn(101, *shape[1:], generator=g, dtype=torch.float64))


def fewer_steps_case(shape, dtype, device) -> Case:
    """The samplers for fewer steps in a 20-step loop on the identity model, beside DPM-Solver++(3M) (the loop they
    extend): DPM-Solver-v3 (order 3 with its corrector, constant b terms), a tuned learned multistep sampler (three
    predictions per step) and DPM-Solver++(2M) with the time-shift sampler (per-sample times). The
    DPM++3M rows are checked against the same program unfused in float64; the others compute other methods, so
    they are not (their GPU results are tested against the CPU in float64 in tests/)."""
    from pydpm.samplers import DPMSolver, DPMSolverV3, TimeShift, TunedSampler
    from pydpm.samplers.tune import _Multistep
    from pydpm.schedules import model_wrapper

    ns = schedule()
    model = model_wrapper(identity, ns, model_type="noise")
    unfused = DPMSolver(model, ns)
    unfused.eager = True
    grid = unfused.grid("time_uniform", float(ns.T), 1.0 / ns.total_N, NUM_STEPS)
    kw = dict(steps=NUM_STEPS, order=3, third_order="corrected")

    def inputs() -> Inputs:
        return {"x": torch.randn(shape, dtype=dtype, device=device)}

    def oracle(t: Inputs) -> torch.Tensor:
        return unfused.sample(t["x"].double(), **kw)

    def impl(label: str, build: Callable[[], Callable[..., torch.Tensor]], graph: bool, checked: bool) -> Impl:
        def make():
            sample = build()
            return lambda t: sample(t["x"], cuda_graph=graph)

        def reasons(t: Inputs) -> list[str]:
            return ["CUDA graphs need a CUDA device"] if graph and not t["x"].is_cuda else []

        return Impl(f"pydpm {label} {'graph' if graph else 'eager'}", make, ours=True, check=checked,
                    reasons=reasons)

    def dpm3m():
        solver = DPMSolver(model, ns)
        return lambda x, cuda_graph: solver.sample(x, cuda_graph=cuda_graph, **kw)

    def v3():
        solver = DPMSolverV3(model, ns, _random_ems(ns, shape))
        return lambda x, cuda_graph: solver.sample(x, steps=NUM_STEPS, cuda_graph=cuda_graph)

    def tuned():
        times, a, b = _Multistep(ns, float(ns.T), 1.0 / ns.total_N, NUM_STEPS, 3, 3, grid).export()
        sampler = TunedSampler(model, ns, times, a, b)
        return lambda x, cuda_graph: sampler.sample(x, cuda_graph=cuda_graph)

    def time_shift():
        solver, shift = DPMSolver(model, ns), TimeShift(window=10, cutoff=0.2)
        return lambda x, cuda_graph: solver.sample(x, steps=NUM_STEPS, order=2, time_shift=shift,
                                                   cuda_graph=cuda_graph)

    impls = [impl(label, build, graph, label == "DPM++3M") for label, build in
             (("DPM++3M", dpm3m), ("DPM-Solver-v3", v3), ("tuned", tuned), ("DPM++2M time-shift", time_shift))
             for graph in (False, True)]
    nbytes = NUM_STEPS * 5 * math.prod(shape) * dtype.itemsize
    # fp16: the third-order differences of fp16-stored data predictions (x̂₀ = x·(1 − σ)/α, large near t = 1 with
    # this model) reach 1.5e-2 of max |x| against float64 on the H200, above the default 1e-2
    return Case("samplers", FEWER_STEPS, shape, dtype, device, inputs, oracle, impls, nbytes=nbytes,
                tolerance=3e-2 if dtype == torch.float16 else None)


def cases(device: torch.device, quick: bool) -> list[Case]:
    AGREEMENT.clear()
    return [case for dtype in dtypes(device) for shape in shapes(device, quick) for case in
            [loop_case(algorithm, shape, dtype, device) for algorithm in (DPM, UNIPC)]
            + [fewer_steps_case(shape, dtype, device)]]


# --------------------------------------------------------------------------------------------------
# Per-step numbers and targets
# --------------------------------------------------------------------------------------------------

def _peer(rows: list[Row]) -> Row | None:
    return next((r for r in rows if not r.ours and r.host_device_us), None)


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per row: wall time per 20-step loop as a caller sees it (loops back to back, one sync at the end), per
    step (/20) and the ratio to diffusers' loop of the same algorithm; then the targets at (1,4,64,64)."""
    lines = [f"sampler loops, wall time of {NUM_STEPS}-step loops back to back with one sync at the end: "
             f"ms per loop | us per step | x diffusers' loop of the same algorithm"]
    worst: dict[str, dict[str, float]] = {"graph_ms": {}, "speedup": {}, "step_us": {}}
    for case, rows in results:
        fewer = case.name == FEWER_STEPS  # against DPM-Solver++(3M)'s loop of the same kind, not diffusers'
        peer = _peer(rows)
        for r in rows:
            if not r.loop_us:
                continue
            if fewer:
                base = next((b for b in rows if b.impl == f"pydpm DPM++3M {r.impl.split()[-1]}" and b.loop_us), None)
                ratio = r.loop_us / base.loop_us if base else None
            else:
                ratio = peer.loop_us / r.loop_us if peer and r.ours else None
            lines.append(f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)} {r.impl}: "
                         f"{r.loop_us / 1e3:.3f} ms | {r.loop_us / NUM_STEPS:.1f} us/step"
                         + (f" | {ratio:.2f}x the DPM++3M loop's time" if fewer and ratio else
                            f" | {ratio:.1f}x" if ratio else "") + (f" ({r.note.split(':')[0]})" if r.note else ""))
            if case.shape != SMALL or not r.ours or r.note or fewer:
                continue
            if r.impl.endswith("graph"):
                worst["graph_ms"][r.impl] = max(worst["graph_ms"].get(r.impl, 0.0), r.loop_us / 1e3)
            else:
                worst["step_us"][r.impl] = max(worst["step_us"].get(r.impl, 0.0), r.loop_us / NUM_STEPS)
            if ratio:
                worst["speedup"][r.impl] = min(worst["speedup"].get(r.impl, ratio), ratio)

    def target(what: str, values: dict[str, float], fmt: str, met: Callable[[str, float], bool]) -> str:
        parts = [f"{impl} {fmt.format(v)} ({'met' if met(impl, v) else 'NOT met'})" for impl, v in values.items()]
        return f"{what}: {', '.join(parts) or 'not measured in this run'}"

    def step_target(impl: str, v: float) -> bool:
        return v <= (DROPIN_STEP_US if "drop-in" in impl else EAGER_STEP_US)

    def speedup_target(impl: str, v: float) -> bool:
        label = impl.split()[-1] if "drop-in" in impl else ""
        return v >= DROPIN_SPEEDUP.get(label, SPEEDUP_TARGET)

    if AGREEMENT:
        lines.append("pydpm vs diffusers, same algorithm on diffusers' grid (pydpm.integrations.diffusers' scheduler "
                     "loop against diffusers' loop, identity model, checked when the eager row is built):")
        lines += [f"{label}: {found}" for label, found in AGREEMENT.items()]
    at = f"at {shape_str(SMALL)} (worst over dtypes)"
    lines += [
        target(f"<= {LOOP_TARGET_MS} ms per {NUM_STEPS}-step loop with the CUDA graph {at}", worst["graph_ms"],
               "{:.3f} ms", lambda impl, v: v <= LOOP_TARGET_MS),
        target(f"per step: the eager loop <= {EAGER_STEP_US:.0f} us, a drop-in step() <= {DROPIN_STEP_US:.0f} us "
               f"(with the identity model's cost) {at}", worst["step_us"], "{:.1f} us", step_target),
        target(f"vs diffusers' loop: >= {SPEEDUP_TARGET:.0f}x (drop-in DPM++2M >= {DROPIN_SPEEDUP['DPM++2M']:.0f}x, "
               f"UniPC >= {DROPIN_SPEEDUP['UniPC']:.0f}x) {at}", worst["speedup"], "{:.1f}x", speedup_target),
    ]
    return lines
