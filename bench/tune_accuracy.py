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
twice (seeds 0 and 1: one row each, the best official configuration chosen per draw), and each ratio comes with
a 95% bootstrap interval (the draw's samples redrawn with replacement, the same redraw for both sides, which
share their x_T; the official configuration stays the one chosen): at 20 NFE a draw's error is carried by a
handful of trajectories, and one draw's ratio can sit anywhere in a factor of two or more. With several draws, a
last row ("all") pools them: the best official configuration (and DPM-Solver-v3's best, the ceiling) over all
their samples, and every method's error and interval over them. Prints a Markdown table; docs/samplers.md holds
the last run. It needs the repository's tests/ folder.
"""
from __future__ import annotations

import argparse
import math
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


def ratio_interval(ours: torch.Tensor, theirs: torch.Tensor, *, resamples: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """RMS(theirs) / RMS(ours) from per-sample squared errors of the same samples, and its percentile bootstrap
    interval at `level`: the samples redrawn with replacement `resamples` times, each redraw the same for both."""
    ours, theirs = ours.detach().double().cpu().flatten(), theirs.detach().double().cpu().flatten()
    n = ours.numel()
    if n == 0 or theirs.numel() != n:
        raise ValueError(f"ratio_interval: needs the same non-zero number of samples on both sides, got {n} and "
                         f"{theirs.numel()}")
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    chunk = max(1, 2 ** 22 // n)
    for lo in range(0, resamples, chunk):
        idx = torch.randint(0, n, (min(chunk, resamples - lo), n), generator=generator)
        ratios.append((theirs[idx].sum(1) / ours[idx].sum(1)).sqrt())
    tail = (1 - level) / 2
    low, high = torch.quantile(torch.cat(ratios), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return math.sqrt(float(theirs.sum() / ours.sum())), low, high


def _ratio(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    ratio, low, high = ratio_interval(ours, theirs)
    return f"{ratio:.2f}× [{low:.2f}, {high:.2f}]"


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
    cols = (["tuned error", "ratio [95% interval]", "tuning: chosen, model calls, seconds"]
            if "tune" in args.methods else []) + (
        ["v3 error", "ratio [95% interval]", "v3 configuration", "v3's best configuration on the draw", "its error",
         "ratio"]
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
            # per-sample squared errors (mean over the elements) of every official configuration and of each
            # method on every draw, and every v3 configuration's summed error (the ceiling over the pooled draws)
            official_errors: dict[str, list[torch.Tensor]] = {}
            tuned_errors: list[torch.Tensor] = []
            v3_errors: list[torch.Tensor] = []
            ceiling_sums = torch.zeros(len(v3_configs) if "v3" in args.methods else 0, dtype=torch.float64)

            def errors(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
                return (y - exact).double().square().flatten(1).mean(1).cpu()

            def rms(e: torch.Tensor) -> float:
                return float(e.mean().sqrt())

            def print_row(draw: str, label: str, best: torch.Tensor, ours: torch.Tensor | None,
                          ours_v3: torch.Tensor | None, v3_sums: torch.Tensor | None) -> None:
                """One row: the official configuration `label` and its per-sample errors `best`, the tuned
                sampler's and v3's on the same samples, and every v3 configuration's summed error (its ceiling)."""
                cells = [str(nfe), draw, label, f"{rms(best):.2e}"]
                if ours is not None:
                    cells += [f"{rms(ours):.2e}", _ratio(ours, best),
                              f"{r['chosen']}, {r['model_calls']}, {r['seconds']:.0f}"]
                if ours_v3 is not None and v3_sums is not None:
                    i = int(v3_sums.argmin())
                    ceiling = math.sqrt(float(v3_sums[i]) / best.numel())
                    cells += [f"{rms(ours_v3):.2e}", _ratio(ours_v3, best), describe(v3_config),
                              describe(v3_configs[i]), f"{ceiling:.2e}", f"{rms(best) / ceiling:.2f}×"]
                print(_row(name, cells), flush=True)

            for d, (seed, x, exact) in enumerate(draws):
                for label, fn in official(model, psched):
                    try:
                        official_errors.setdefault(label, []).append(errors(fn(x, nfe), exact))
                    except ValueError:  # e.g. fewer steps than the order
                        continue
                label = min((k for k, v in official_errors.items() if len(v) == d + 1),
                            key=lambda k: (rms(official_errors[k][-1]), k))  # equal errors: the first name
                each = None
                if "tune" in args.methods:
                    tuned_errors.append(errors(tuned.sample(x), exact))
                if "v3" in args.methods:
                    v3_errors.append(errors(v3.sample(x, steps=nfe, **v3_config), exact))
                    # the ceiling of the choice: every configuration scored on the evaluation samples themselves
                    each = torch.stack([errors(v3.sample(x, steps=nfe, **cfg), exact).sum()
                                        for cfg in v3_configs])
                    ceiling_sums += each
                print_row(str(seed), label, official_errors[label][-1], tuned_errors[-1] if tuned_errors else None,
                          v3_errors[-1] if v3_errors else None, each)
            if len(draws) > 1:  # the draws pooled
                pooled = {k: torch.cat(v) for k, v in official_errors.items() if len(v) == len(draws)}
                label = min(pooled, key=lambda k: (rms(pooled[k]), k))
                print_row("all", label, pooled[label], torch.cat(tuned_errors) if tuned_errors else None,
                          torch.cat(v3_errors) if v3_errors else None, ceiling_sums if v3_errors else None)
    what = "4-component mixture in D = 64" if args.mixture == "tests" else f"mixture {args.mixture}"
    print(f"\n({time.perf_counter() - began:.0f} s on {device}; torch {torch.__version__}; {what}, "
          f"{args.eval} evaluation samples per draw, calibration seed 12345"
          + (f"; EMS: {args.ems_samples} samples, {args.ems_points} points, {ems.info['seconds']:.0f} s)"
             if "v3" in args.methods else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
