"""Sampler accuracy: error versus NFE of every pydpm sampler on an analytic Gaussian mixture (CPU, float64).

    python -m pydpm.bench.sampler_accuracy [--skip-type logSNR]     (from a checkout: python bench/sampler_accuracy.py)

The mixture's exact noise prediction stands in for a trained network (tests/gaussian_mixture.py), so the only
error left is the solver's. Deterministic samplers: RMS distance of the sample at t_end to the probability-flow
ODE solution from the same x_T (RK4 in λ with 1000 steps, tests/samplers_oracle.py). Stochastic samplers have no
pathwise limit; they get the distribution error instead: max |Δ| of mean and covariance against p0 over 20 000
samples in 2-D (sampling noise ≈ 0.01). Prints Markdown tables; docs/samplers.md holds the last run.
It needs the repository's tests/ folder (a source checkout or an editable install).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
NFES = (5, 10, 15, 20, 50)


def _import_helpers():
    if not (TESTS / "gaussian_mixture.py").exists():
        raise SystemExit(f"sampler_accuracy needs the repository's tests/ folder (looked in {TESTS}): run it "
                         f"from a source checkout or an editable install")
    sys.path.insert(0, str(TESTS))
    import gaussian_mixture
    import samplers_oracle
    return gaussian_mixture, samplers_oracle


# name: (method call given (model, x, schedule, steps, skip_type), steps for an NFE budget (None: impossible))
def _deterministic():
    from pydpm import sample
    from pydpm.samplers import DPMSolver, UniPC

    def dpm(alg, order, method="multistep", third_order="authors"):
        return lambda m, x, ns, n, skip: DPMSolver(m, ns, algorithm_type=alg).sample(
            x, steps=n, order=order, method=method, skip_type=skip, third_order=third_order)

    def unipc(variant, order):
        return lambda m, x, ns, n, skip: UniPC(m, ns, variant=variant).sample(x, steps=n, order=order, skip_type=skip)

    def plain(method):
        return lambda m, x, ns, n, skip: sample(m, x, ns, method, n, skip_type=skip)

    same = lambda nfe: nfe  # noqa: E731
    return {
        "DDIM": (plain("ddim"), same),
        "DPM-Solver-2M": (dpm("dpmsolver", 2), same),
        "DPM-Solver-3M": (dpm("dpmsolver", 3), same),
        "DPM-Solver++(2M)": (dpm("dpmsolver++", 2), same),
        "DPM-Solver++(3M)": (dpm("dpmsolver++", 3), same),
        "DPM-Solver-3M, corrected": (dpm("dpmsolver", 3, third_order="corrected"), same),
        "DPM-Solver++(3M), corrected": (dpm("dpmsolver++", 3, third_order="corrected"), same),
        "DPM-Solver-fast (singlestep, 3)": (dpm("dpmsolver", 3, "singlestep"), same),
        "DPM-Solver++ singlestep, 2": (dpm("dpmsolver++", 2, "singlestep"), same),
        "DPM-Solver++ singlestep, 3": (dpm("dpmsolver++", 3, "singlestep"), same),
        "UniPC bh1, 2": (unipc("bh1", 2), same),
        "UniPC bh2, 2": (unipc("bh2", 2), same),
        "UniPC bh1, 3": (unipc("bh1", 3), same),
        "UniPC vary_coeff, 2": (unipc("vary_coeff", 2), same),
        "PLMS": (plain("plms"), lambda nfe: nfe - 1),
        "S-PNDM": (plain("s-pndm"), lambda nfe: nfe - 1),
        "F-PNDM": (plain("f-pndm"), lambda nfe: nfe - 9 if nfe > 9 else None),
    }


def _stochastic():
    from pydpm import sample
    return {
        "DDPM (ancestral)": lambda m, x, ns, n, skip: sample(m, x, ns, "ddpm", n, skip_type=skip, seed=0),
        "SDE-DPM-Solver++(1)": lambda m, x, ns, n, skip: sample(m, x, ns, "sde-dpmsolver++", n, order=1,
                                                                skip_type=skip, seed=0),
        "SDE-DPM-Solver++(2M)": lambda m, x, ns, n, skip: sample(m, x, ns, "sde-dpmsolver++", n, order=2,
                                                                 skip_type=skip, seed=0),
        "DPM-Solver++(2M) (ODE)": lambda m, x, ns, n, skip: sample(m, x, ns, "dpmsolver++", n, skip_type=skip),
    }


def _schedules(name: str, oracle):
    from pydpm.schedules import NoiseScheduleVP
    if name == "discrete":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        return oracle.VPDiscrete(betas=betas), NoiseScheduleVP("discrete", betas=betas, dtype=torch.float64)
    return oracle.VPLinear(), NoiseScheduleVP("linear", dtype=torch.float64)


def _row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def run(argv: list[str] | None = None) -> int:
    from pydpm.schedules import SKIP_TYPES

    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.sampler_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", choices=("discrete", "linear"), default="discrete",
                        help="discrete: DDPM's betas linspace(1e-4, 0.02, 1000) (default); linear: the VP SDE")
    parser.add_argument("--skip-type", default="time_uniform",
                        choices=SKIP_TYPES)
    parser.add_argument("--batch", type=int, default=256, help="starting points x_T (default 256)")
    parser.add_argument("--dim", type=int, default=64, help="data dimension (default 64)")
    args = parser.parse_args(argv)

    gmm, oracle = _import_helpers()
    from pydpm.schedules import model_wrapper

    torch.set_num_threads(1)  # tiny tensors
    start = time.perf_counter()
    osched, psched = _schedules(args.schedule, oracle)
    discrete_n = osched.total_N if osched.discrete else None
    mixture = gmm.GaussianMixture.random(osched, args.dim, components=4, seed=1, spread=0.5)
    model = model_wrapper(mixture.model_fn("noise", total_N=discrete_n), psched)
    x = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_T, t_0 = psched.T, 1.0 / psched.total_N
    exact = oracle.ode_solution(mixture.eps, osched, x, t_T, t_0, n=1000)
    scale = float(exact.square().mean().sqrt())

    print(f"## ODE samplers: RMS error of x at t = {t_0:g} against the exact ODE solution\n")
    print(f"{args.schedule} VP schedule, skip_type={args.skip_type}, t: {t_T:g} → {t_0:g}; {args.batch} samples of a "
          f"4-component Gaussian mixture in D = {args.dim} (RMS of the solution {scale:.2f}); float64, CPU.\n")
    print(_row("sampler \\ NFE", [str(n) for n in NFES]))
    print(_row("---", ["---:"] * len(NFES)))
    for name, (fn, steps_for) in _deterministic().items():
        cells = []
        for nfe in NFES:
            steps = steps_for(nfe)
            try:
                err = float((fn(model, x, psched, steps, args.skip_type) - exact).square().mean().sqrt()) \
                    if steps else None
            except ValueError:  # e.g. fewer steps than the order
                err = None
            cells.append("—" if err is None else f"{err:.2e}")
        print(_row(name, cells), flush=True)

    mix2 = gmm.GaussianMixture([0.3, 0.7], [[1.5, 0.0], [-0.5, 1.0]], [0.3, 0.5], osched)
    model2 = model_wrapper(mix2.model_fn("noise", total_N=discrete_n), psched)
    x2 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = mix2.sample(400000, generator=torch.Generator().manual_seed(1))
    mean, cov = data.mean(0), torch.cov(data.T)
    print("\n## Stochastic samplers: distribution error (max |Δ| of mean and covariance against p0)\n")
    print("Same schedule and time steps; 20 000 samples in D = 2 (sampling noise ≈ 0.01).\n")
    print(_row("sampler \\ NFE", [str(n) for n in NFES]))
    print(_row("---", ["---:"] * len(NFES)))
    for name, fn in _stochastic().items():
        cells = []
        for nfe in NFES:
            y = fn(model2, x2, psched, nfe, args.skip_type)
            err = max(float((y.mean(0) - mean).abs().max()), float((torch.cov(y.T) - cov).abs().max()))
            cells.append(f"{err:.3f}")
        print(_row(name, cells), flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s; torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
