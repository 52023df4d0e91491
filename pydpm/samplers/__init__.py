"""Samplers built on the fused solver step: DPM-Solver(++), UniPC, SDE-DPM-Solver++, DDIM/DDPM, PNDM.

Each solver class computes its coefficients once per configuration in float64, keeps them as a device
table and runs one fused `pydpm.ops.solver_step` launch per model call; `sample(..., cuda_graph=True)`
captures the whole loop. `pydpm.sample` is the one-call front end.
"""
from __future__ import annotations

from pydpm.samplers.ddim import DDIM, DDPM
from pydpm.samplers.dpm_solver import DPMSolver, SDEDPMSolverPP
from pydpm.samplers.pndm import PNDM
from pydpm.samplers.unipc import UniPC

METHODS = ("dpmsolver", "dpmsolver++", "unipc", "ddim", "ddpm", "plms", "s-pndm", "f-pndm", "sde-dpmsolver++")


def sample(model_fn, x, noise_schedule, method="dpmsolver++", steps=20, *, order=2, skip_type="time_uniform",
           t_start=None, t_end=None, eta=0.0, seed=0, lower_order_final=True, solver_type="dpmsolver",
           variant="bh1", cuda_graph=False, progress=False):
    """Sample from x (noise at t_start) with `method`:

    'dpmsolver' / 'dpmsolver++': multistep DPM-Solver(++) of `order` (`solver_type` 'dpmsolver'/'taylor');
    'unipc': multistep UniPC with data prediction, `variant` 'bh1'/'bh2'/'vary_coeff';
    'ddim' (η = `eta`), 'ddpm' (η = 1); 'plms', 's-pndm', 'f-pndm'; 'sde-dpmsolver++' (order 1 or 2).
    Stochastic methods draw their noise inside the fused step from Philox(`seed`, step).
    Builds a solver per call: keep a solver object (pydpm.samplers.*) to reuse plans and CUDA graphs.
    """
    common = dict(steps=steps, t_start=t_start, t_end=t_end, skip_type=skip_type, cuda_graph=cuda_graph,
                  progress=progress)
    if method in ("dpmsolver", "dpmsolver++"):
        return DPMSolver(model_fn, noise_schedule, algorithm_type=method).sample(
            x, order=order, lower_order_final=lower_order_final, solver_type=solver_type, **common)
    if method == "unipc":
        return UniPC(model_fn, noise_schedule, variant=variant).sample(x, order=order,
                                                                       lower_order_final=lower_order_final, **common)
    if method in ("ddim", "ddpm"):
        solver = DDIM(model_fn, noise_schedule, eta=eta) if method == "ddim" else DDPM(model_fn, noise_schedule)
        return solver.sample(x, seed=seed, **common)
    if method in ("plms", "s-pndm", "f-pndm"):
        return PNDM(model_fn, noise_schedule, variant=method).sample(x, **common)
    if method == "sde-dpmsolver++":
        return SDEDPMSolverPP(model_fn, noise_schedule).sample(x, order=order, lower_order_final=lower_order_final,
                                                               seed=seed, **common)
    raise ValueError(f"method={method!r}; use one of {', '.join(map(repr, METHODS))}")


__all__ = ["DDIM", "DDPM", "DPMSolver", "METHODS", "PNDM", "SDEDPMSolverPP", "UniPC", "sample"]
