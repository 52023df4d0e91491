"""Benchmark cases of the samplers (issue 3): the overhead of a whole 20-step sampling loop with an
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
and diffusers' loop of the same algorithm, so `vs peer` is the ratio to diffusers' loop of that algorithm; at
(1,4,64,64) and (16,4,128,128), fp16 and fp32 on CUDA; on the CPU (1,4,64,64) fp32 only, to stay short,
and the CUDA graph rows are skipped with the reason.

Columns, for one call = one 20-step loop: `median ms` CUDA events around the loop with its launches queued
behind a blocking kernel, i.e. device time (a loop that synchronises inside, as diffusers' first step and its
set_timesteps do, shows its host time there too); `h+dev us` one loop then a synchronisation, host clock:
the wall time a caller waits for a loop (the number a host-bound loop is judged by); `loop us` loops
back to back with one synchronisation at the end, per loop; `host us` the cost of issuing a loop. `vs peer`
is device time; the footer gives, per row, the wall time per loop (h+dev), per step (/20) and the ratio to
diffusers' loop on that wall time, and reads the targets of DESIGN.md §5 off them.

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
SMALL = (1, 4, 64, 64)  # one SD 1.x latent: the shape of the peer numbers
MEDIUM = (16, 4, 128, 128)  # a batch of SDXL latents
LOOP_TARGET_MS = 0.3  # DESIGN.md §5: whole 20-step loop, identity model, CUDA graph
SPEEDUP_TARGET = 20.0  # DESIGN.md §5: >= 20x diffusers per step


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
             diffusers_impl(algorithm, shape, dtype, device)]
    nbytes = NUM_STEPS * 5 * math.prod(shape) * dtype.itemsize
    return Case("samplers", algorithm.case, shape, dtype, device, inputs, oracle, impls, nbytes=nbytes)


def cases(device: torch.device, quick: bool) -> list[Case]:
    AGREEMENT.clear()
    return [loop_case(algorithm, shape, dtype, device) for dtype in dtypes(device)
            for shape in shapes(device, quick) for algorithm in (DPM, UNIPC)]


# --------------------------------------------------------------------------------------------------
# Per-step numbers and targets (DESIGN.md §5)
# --------------------------------------------------------------------------------------------------

def _peer(rows: list[Row]) -> Row | None:
    return next((r for r in rows if not r.ours and r.host_device_us), None)


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per row: wall time per 20-step loop (h+dev: one loop, then a sync), per step (/20) and the ratio to
    diffusers' loop of the same algorithm on that wall time; then the targets at (1,4,64,64)."""
    lines = [f"sampler loops, wall time of one {NUM_STEPS}-step loop with a sync at the end (h+dev): "
             f"ms per loop | us per step | x diffusers' loop of the same algorithm"]
    graph_ms: dict[str, list[float]] = {}
    speedup: dict[str, list[float]] = {}
    for case, rows in results:
        peer = _peer(rows)
        for r in rows:
            if not r.host_device_us:
                continue
            ratio = peer.host_device_us / r.host_device_us if peer and r.ours else None
            lines.append(f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)} {r.impl}: "
                         f"{r.host_device_us / 1e3:.3f} ms | {r.host_device_us / NUM_STEPS:.1f} us/step"
                         + (f" | {ratio:.1f}x" if ratio else "") + (f" ({r.note.split(':')[0]})" if r.note else ""))
            if case.shape != SMALL or not r.ours or r.note:
                continue
            if r.impl.endswith("graph"):
                graph_ms.setdefault(r.impl, []).append(r.host_device_us / 1e3)
            if ratio:
                speedup.setdefault(r.impl, []).append(ratio)

    def target(what: str, values: dict[str, list[float]], worst, fmt: str, met: Callable[[float], bool],
               absent: str) -> str:
        parts = [f"{impl} {fmt.format(worst(v))} ({'met' if met(worst(v)) else 'NOT met'})"
                 for impl, v in values.items()]
        return f"{what}: {', '.join(parts) or absent}"

    if AGREEMENT:
        lines.append("pydpm vs diffusers, same algorithm on diffusers' grid (pydpm.integrations.diffusers' scheduler "
                     "loop against diffusers' loop, identity model, checked when the eager row is built):")
        lines += [f"{label}: {found}" for label, found in AGREEMENT.items()]
    on_cuda = any(case.device.type == "cuda" for case, _ in results)
    at = f"at {shape_str(SMALL)} (worst over dtypes; wall time, sync at the end)"
    lines += [
        target(f"<= {LOOP_TARGET_MS} ms per {NUM_STEPS}-step loop with the CUDA graph {at}", graph_ms, max,
               "{:.3f} ms", lambda v: v <= LOOP_TARGET_MS,
               "not measured in this run" + ("" if on_cuda else " (CUDA graphs need a CUDA device)")),
        target(f">= {SPEEDUP_TARGET:.0f}x diffusers per step {at}", speedup, min, "{:.1f}x",
               lambda v: v >= SPEEDUP_TARGET, "not measured in this run"),
    ]
    return lines
