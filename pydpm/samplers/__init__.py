"""Samplers built on the fused solver step: DPM-Solver(++), UniPC, SDE-DPM-Solver++, DDIM/DDPM, PNDM,
DPM-Solver-v3 with the model statistics the library computes (`compute_ems` -> `EMS`), samplers tuned to a
model and a step budget (`tune` -> `TunedSampler`), and the time-shift sampler against exposure bias
(`DPMSolver.sample(..., time_shift=TimeShift(...))`).

Each solver class computes its coefficients once per configuration in float64, keeps them as a device
table and runs one fused `pydpm.ops.solver_step` launch per model call; `sample(..., cuda_graph=True)`
captures the whole loop. `pydpm.sample` is the one-call front end.
"""
from __future__ import annotations

from typing import Any, Callable, cast

import torch

from pydpm.samplers.ddim import DDIM, DDPM
from pydpm.samplers.dpm_solver import DPMSolver, SDEDPMSolverPP
from pydpm.samplers.dpm_solver_v3 import DPMSolverV3
from pydpm.samplers.ems import EMS, compute_ems
from pydpm.samplers.pndm import PNDM
from pydpm.samplers.time_shift import TimeShift
from pydpm.samplers.tune import TunedSampler, tune
from pydpm.samplers.unipc import UniPC
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP

METHODS = ("dpmsolver", "dpmsolver++", "unipc", "ddim", "ddpm", "plms", "s-pndm", "f-pndm", "sde-dpmsolver++")


def sample(model_fn: Callable[..., torch.Tensor], x: torch.Tensor, noise_schedule: NoiseScheduleVP | NoiseScheduleFlow,
           method: str = "dpmsolver++", steps: int = 20, *, order: int = 2, skip_type: str = "time_uniform",
           t_start: float | None = None, t_end: float | None = None, eta: float = 0.0, seed: int = 0,
           lower_order_final: bool = True, solver_type: str = "dpmsolver", variant: str = "bh1",
           cuda_graph: bool = False, progress: bool = False) -> torch.Tensor:
    """Sample from x (noise at t_start) with `method`, in one call.

    Builds a solver per call: keep a solver object (pydpm.samplers.*) to reuse plans and CUDA graphs, and
    for the options this front end does not take (explicit `times`, corrections, thresholding, intermediates).

    Args:
        model_fn: the model as a function of (x, t) with t the continuous time ([B] tensor), returning the
            noise prediction: normally `pydpm.schedules.model_wrapper(net, noise_schedule, model_type=...)`.
            A network that takes the training timestep (a diffusers UNet2DModel, ...) must be wrapped:
            `model_wrapper(lambda x, t: net(x, t).sample, noise_schedule, model_type='noise')`; a diffusers
            model is refused with that call, a bare `torch.nn.Module` under a discrete schedule warns.
        x: the starting sample (noise at t_start): float32, float16 or bfloat16 (float64 on the CPU), any shape
            with a non-empty leading batch dimension and any strides (the result equals that of x.contiguous());
            not modified.
        noise_schedule: a `pydpm.schedules.NoiseScheduleVP` or `NoiseScheduleFlow`.
        method: 'dpmsolver' / 'dpmsolver++' (multistep DPM-Solver(++)); 'unipc' (multistep UniPC with data
            prediction); 'ddim' (η = `eta`); 'ddpm' (η = 1); 'plms', 's-pndm', 'f-pndm'; 'sde-dpmsolver++'
            (order 1 or 2).
        steps: the number of steps, an int >= 1 (model evaluations, except PLMS / S-PNDM: +1, F-PNDM: +9).
        order: the solver order of 'dpmsolver', 'dpmsolver++' and 'unipc' (1–3), 'sde-dpmsolver++' (1–2).
        skip_type: the time spacing: 'time_uniform', 'logSNR' (uniform in λ), 'time_quadratic' or 'karras'.
        t_start: the start time (default: the schedule's T).
        t_end: the end time (default 1/N); 0 ends on the data itself (σ = 0), except with 'dpmsolver'.
        eta: the η of 'ddim' (0: deterministic).
        seed: the Philox seed of the stochastic methods ('ddim' with η > 0, 'ddpm', 'sde-dpmsolver++'), whose
            noise is drawn inside the fused step from Philox(seed, step).
        lower_order_final: lower the orders of the last steps ('dpmsolver(++)', 'sde-dpmsolver++': when
            steps < 10, as the authors; 'unipc': at any step count).
        solver_type: 'dpmsolver' or 'taylor', for 'dpmsolver' / 'dpmsolver++'.
        variant: 'bh1', 'bh2' or 'vary_coeff', for 'unipc'.
        cuda_graph: capture the whole loop (model included) in a CUDA graph and replay it; the graph lives in
            the solver this call builds, so it is captured anew per call (keep a solver to replay).
        progress: show a progress bar over model evaluations (tqdm when installed, else a counter on
            stderr); not with cuda_graph=True.

    Returns:
        The sample at t_end, in x's dtype.

    Raises:
        TypeError / ValueError: a bad argument, named in the message with what was expected.
    """
    common: dict[str, Any] = dict(steps=steps, t_start=t_start, t_end=t_end, skip_type=skip_type,
                                  cuda_graph=cuda_graph, progress=progress)
    # DPMSolver / UniPC return a (sample, intermediates) pair only with return_intermediate=True
    if method in ("dpmsolver", "dpmsolver++"):
        return cast(torch.Tensor, DPMSolver(model_fn, noise_schedule, algorithm_type=method).sample(
            x, order=order, lower_order_final=lower_order_final, solver_type=solver_type, **common))
    if method == "unipc":
        return cast(torch.Tensor, UniPC(model_fn, noise_schedule, variant=variant).sample(
            x, order=order, lower_order_final=lower_order_final, **common))
    if method in ("ddim", "ddpm"):
        solver = DDIM(model_fn, noise_schedule, eta=eta) if method == "ddim" else DDPM(model_fn, noise_schedule)
        return solver.sample(x, seed=seed, **common)
    if method in ("plms", "s-pndm", "f-pndm"):
        return PNDM(model_fn, noise_schedule, variant=method).sample(x, **common)
    if method == "sde-dpmsolver++":
        return SDEDPMSolverPP(model_fn, noise_schedule).sample(x, order=order, lower_order_final=lower_order_final,
                                                               seed=seed, **common)
    raise ValueError(f"method={method!r}; use one of {', '.join(map(repr, METHODS))}")


__all__ = ["DDIM", "DDPM", "DPMSolver", "DPMSolverV3", "EMS", "METHODS", "PNDM", "SDEDPMSolverPP", "TimeShift",
           "TunedSampler", "UniPC", "compute_ems", "sample", "tune"]
