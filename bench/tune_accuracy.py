"""Tuned samplers and DPM-Solver-v3 against every official DPM-Solver(++) and UniPC configuration, on the analytic
Gaussian mixture of `sampler_accuracy` (float64; on the CPU, or `--device cuda`).

    python -m pydpm.bench.tune_accuracy [--nfe 5 10 20] [--schedule discrete linear] [--methods tune v3]
                                                        (from a checkout: python bench/tune_accuracy.py)

Per schedule and NFE: the best of every official configuration (DPM-Solver and DPM-Solver++: orders 1-3,
multistep / singlestep / singlestep_fixed, solver types dpmsolver / taylor; UniPC bh1 / bh2 / vary_coeff,
orders 1-3, data and noise prediction; every skip type; lower_order_final on and off), chosen on the same
evaluation samples it is scored on (which favours it), against `pydpm.samplers.tune` at that NFE, tuned on its
own 16384 calibration samples (another seed; the trajectories that end in the wrong component, which carry
most of the error at 20 NFE, are about one in 4000, so a smaller pool holds too few for the search to see),
given the data samples below (so DPM-Solver-v3, on standard and on searched time steps, is among its
candidates) and scored once on the evaluation samples, and against DPM-Solver-v3 with EMS computed by
`compute_ems` from 4096 samples of the mixture (another seed; 101 grid points), its order (2, 3), skip type,
pseudo-order predictor or not and corrector (off, on, on at pseudo-order) chosen on 512 calibration samples (seed
12345) against a 500-step DPM-Solver++(3M) solution, never on the evaluation samples. Error: RMS distance at
t = 1/N to the exact probability-flow ODE solution (RK4 in λ, 1000 steps); a few trajectories near the
boundaries between components carry most of it, so the evaluation set is large (2048 by default) and drawn
twice (seeds 0 and 1: one row each, the best official configuration chosen per draw): how far the ratio
moves between the two draws is the measurement's noise. Prints a Markdown table; docs/samplers.md holds the
last run. It needs the repository's tests/ folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

try:
    from .full_covariance_mixtures import MIXTURES, FullCovarianceMixture
    from .sampler_accuracy import _import_helpers, _row, _schedules
except ImportError:  # run as a script from a checkout
    from full_covariance_mixtures import MIXTURES, FullCovarianceMixture  # type: ignore[no-redef]
    from sampler_accuracy import _import_helpers, _row, _schedules  # type: ignore[no-redef]


def official(model, psched) -> Iterator[tuple[str, Callable[[torch.Tensor, int], torch.Tensor]]]:
    """(name, run(x, nfe)) for every official DPM-Solver(++) and UniPC configuration."""
    from pydpm.samplers import DPMSolver, UniPC
    from pydpm.schedules import SKIP_TYPES as skips
    for alg in ("dpmsolver", "dpmsolver++"):
        for order in (1, 2, 3):
            for method in ("multistep", "singlestep", "singlestep_fixed"):
                for solver_type in ("dpmsolver", "taylor"):
                    for skip in skips:
                        for lof in (True, False):
                            yield (f"{alg} {method} order {order} {solver_type} {skip} lower_order_final={lof}",
                                   lambda x, n, a=alg, o=order, m=method, s=solver_type, k=skip, f=lof:
                                   DPMSolver(model, psched, algorithm_type=a).sample(
                                       x, steps=n, order=o, method=m, solver_type=s, skip_type=k,
                                       lower_order_final=f))
    for variant in ("bh1", "bh2", "vary_coeff"):
        for order in (1, 2, 3):
            for pred in ("data_prediction", "noise_prediction"):
                for skip in skips:
                    for lof in (True, False):
                        yield (f"UniPC {variant} order {order} {pred} {skip} lower_order_final={lof}",
                               lambda x, n, v=variant, o=order, p=pred, k=skip, f=lof:
                               UniPC(model, psched, variant=v, algorithm_type=p).sample(
                                   x, steps=n, order=o, skip_type=k, lower_order_final=f))


def problem(mixture_name: str, schedule: str):
    """(the oracle's schedule, pydpm's, the mixture, its exact noise prediction as pydpm's model) for a --mixture
    and a --schedule."""
    from pydpm.schedules import model_wrapper
    gmm, oracle = _import_helpers()
    osched, psched = _schedules(schedule, oracle)
    total_n = osched.total_N if osched.discrete else None
    if mixture_name == "tests":
        mixture = gmm.GaussianMixture.random(osched, 64, components=4, seed=1, spread=0.5)
        return osched, psched, mixture, model_wrapper(mixture.model_fn("noise", total_N=total_n), psched)
    mixture = FullCovarianceMixture.named(mixture_name, osched)
    return osched, psched, mixture, model_wrapper(mixture.model_fn(total_N=total_n), psched)


def v3_configurations() -> list[dict]:
    """DPM-Solver-v3's 48 configurations, as `DPMSolverV3.sample` keywords: order 2 or 3, every skip type, the
    pseudo-order predictor or not, the corrector off, on, or on at pseudo-order."""
    from pydpm.schedules import SKIP_TYPES
    return [{"order": o, "skip_type": k, "p_pseudo": pp, "use_corrector": c, "c_pseudo": cp and c}
            for o in (2, 3) for k in SKIP_TYPES for pp in (False, True)
            for c, cp in ((True, True), (True, False), (False, False))]


def describe(v3_config: dict) -> str:
    corrector = ("off", "on", "on, pseudo-order")[v3_config["use_corrector"] + v3_config["c_pseudo"]]
    return (f"order {v3_config['order']}{', pseudo-order' if v3_config['p_pseudo'] else ''}, "
            f"{v3_config['skip_type']}, corrector {corrector}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.tune_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--schedule", nargs="+", choices=("discrete", "linear"), default=["discrete", "linear"])
    parser.add_argument("--calibration", type=int, default=16384,
                        help="tune's n_calibration (default 16384)")
    parser.add_argument("--selection", type=int,
                        help="tune's n_selection: fresh samples that choose among its candidates (default: as many as "
                             "--calibration; at 20 NFE the candidates differ by a few trajectories in 10⁴ that end in "
                             "another mixture component, and a larger set chooses more surely)")
    parser.add_argument("--iterations", type=int, default=1500, help="tune's iterations (default 1500)")
    parser.add_argument("--search-samples", type=int, default=2048,
                        help="tune's search_samples: fit samples its time-step searches run on (default 2048)")
    parser.add_argument("--eval", type=int, default=2048, help="evaluation samples per draw (default 2048)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1], help="evaluation draws (default 0 1)")
    parser.add_argument("--methods", nargs="+", choices=("tune", "v3"), default=["tune", "v3"])
    parser.add_argument("--ems-samples", type=int, default=4096, help="data samples of the EMS (default 4096)")
    parser.add_argument("--ems-points", type=int, default=101, help="grid points of the EMS (default 101)")
    parser.add_argument("--mixture", choices=("tests", *MIXTURES), default="tests",
                        help="tests: the 4-component isotropic mixture in D = 64 (default); full-a, full-b: the "
                             "full-covariance mixtures of bench/full_covariance_mixtures.py")
    parser.add_argument("--tuned", metavar="DIR",
                        help="keep tuned samplers in DIR: one saved there for this mixture, schedule, NFE and tuning "
                             "settings is loaded instead of tuned again, and one tuned here is saved there (tuning "
                             "and evaluating in separate runs)")
    parser.add_argument("--device", default="cpu",
                        help="where tuning, sampling and the exact solutions run, in float64 (default cpu); the "
                             "noise and data are drawn on the CPU, so a draw is the same on every device (a small "
                             "run printed the same row on an H200 as on the CPU, in 92 s against 113 s on one core: "
                             "the loops are bound by the host, so run few at once on one GPU)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); leave "
                     f"--device out to run on the CPU")

    _, oracle = _import_helpers()
    from pydpm.samplers import DPMSolver, DPMSolverV3, TunedSampler, compute_ems, tune

    torch.set_num_threads(1)
    began = time.perf_counter()
    cols = (["tuned error", "ratio", "tuning: chosen, model calls, seconds"] if "tune" in args.methods else []) + (
        ["v3 error", "ratio", "v3 configuration", "v3's best configuration on the draw", "its error", "ratio"]
        if "v3" in args.methods else [])
    print("| schedule | NFE | draw | best official configuration | its error | " + " | ".join(cols) + " |")
    print(_row("---", ["---:", "---:", "---", "---:"] + (["---:", "---:", "---"] if "tune" in args.methods else [])
               + (["---:", "---:", "---", "---", "---:", "---:"] if "v3" in args.methods else [])))
    for name in args.schedule:
        osched, psched, mixture, model = problem(args.mixture, name)
        dim = mixture.dim
        t_T, t_0 = psched.T, 1.0 / psched.total_N
        draws = []
        for seed in args.eval_seeds:
            x = torch.randn(args.eval, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            x = x.to(device)
            draws.append((seed, x, oracle.ode_solution(mixture.eps, osched, x, t_T, t_0, n=1000)))

        data = mixture.sample(args.ems_samples, generator=torch.Generator().manual_seed(777)).to(device)
        if "v3" in args.methods:
            ems = compute_ems(model, psched, data, points=args.ems_points, t_start=t_T, t_end=t_0, batch=4096)
            x_cal = torch.randn(512, dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
            x_cal = x_cal.to(device)
            ref_cal = DPMSolver(model, psched).sample(x_cal, steps=500, order=3, skip_type="logSNR",
                                                      third_order="corrected")
        for nfe in args.nfe:
            if "tune" in args.methods:
                kept = None if args.tuned is None else Path(args.tuned) / (
                    f"{args.mixture}-{name}-nfe{nfe}-cal{args.calibration}-sel{args.selection or args.calibration}-"
                    f"it{args.iterations}-search{args.search_samples}-ems{args.ems_samples}x{args.ems_points}.json")
                if kept is not None and kept.exists():
                    tuned = TunedSampler.load(kept, model, psched)
                else:
                    tuned = tune(model, psched, nfe, shape=(dim,), n_calibration=args.calibration,
                                 n_selection=args.selection,
                                 iterations=args.iterations, search_samples=args.search_samples,
                                 dtype=torch.float64, device=device, seed=12345, data=data,
                                 ems_points=args.ems_points)
                    if kept is not None:
                        kept.parent.mkdir(parents=True, exist_ok=True)
                        tuned.save(kept)
                r = tuned.report
            if "v3" in args.methods:
                v3 = DPMSolverV3(model, psched, ems)
                v3_configs = v3_configurations()
                v3_config = min(v3_configs,
                                key=lambda cfg: float((v3.sample(x_cal, steps=nfe, **cfg) - ref_cal).square().mean()))
            for seed, x, exact in draws:
                def error(y: torch.Tensor) -> float:
                    return float((y - exact).square().mean().sqrt())

                best = (float("inf"), "")
                for label, fn in official(model, psched):
                    try:
                        e = error(fn(x, nfe))
                    except ValueError:  # e.g. fewer steps than the order
                        continue
                    best = min(best, (e, label))
                cells = [str(nfe), str(seed), best[1], f"{best[0]:.2e}"]
                if "tune" in args.methods:
                    ours = error(tuned.sample(x))
                    cells += [f"{ours:.2e}", f"{best[0] / ours:.2f}×",
                              f"{r['chosen']}, {r['model_calls']}, {r['seconds']:.0f}"]
                if "v3" in args.methods:
                    e3 = error(v3.sample(x, steps=nfe, **v3_config))
                    cells += [f"{e3:.2e}", f"{best[0] / e3:.2f}×", describe(v3_config)]
                    # the ceiling of the choice: every configuration scored on the evaluation samples themselves
                    ceiling = min((error(v3.sample(x, steps=nfe, **cfg)), i) for i, cfg in enumerate(v3_configs))
                    cells += [describe(v3_configs[ceiling[1]]), f"{ceiling[0]:.2e}", f"{best[0] / ceiling[0]:.2f}×"]
                print(_row(name, cells), flush=True)
    what = "4-component mixture in D = 64" if args.mixture == "tests" else f"mixture {args.mixture}"
    print(f"\n({time.perf_counter() - began:.0f} s on {device}; torch {torch.__version__}; {what}, "
          f"{args.eval} evaluation samples per draw, calibration seed 12345"
          + (f"; EMS: {args.ems_samples} samples, {args.ems_points} points, {ems.info['seconds']:.0f} s)"
             if "v3" in args.methods else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
