"""Would DPM-Solver-v3's statistics do better per element, as the paper fits them? On the Gaussian mixtures of
`tune_accuracy` (CPU, float64), two measurements:

1. The fits (default): at a few λ along the sampling interval, l per element (Hutchinson's estimator,
   E[v·(∇ₓε v)] per element) against the one number per λ pydpm fits, and the share of f' = df/dλ that s leaves
   unexplained, fit as one number per λ (pydpm) or one per element (the paper). f uses the scalar l (as
   `compute_ems` does); f' is its derivative along the probability-flow ODE (one JVP in x and t), less
   dl/dλ·x/α. Where the per-element column is not much below the scalar one, per-element statistics cannot make
   the solver much more accurate: what s leaves is not linear in f.
2. The solver (`--solve`): DPM-Solver-v3 run with both kinds of statistics, estimated from the same samples and
   noise (`compute_ems`'s estimators, `pydpm.samplers.ems.estimate_statistics`), by the float64 implementation of
   the paper in tests/samplers_oracle.py (pydpm's fused solver takes scalar l and s only); on each evaluation draw
   the best of v3's 48 configurations for each kind, scored on the draw itself (the ceiling of any choice), and
   pydpm's own run of the best scalar one. Error: RMS distance at t = 1/N to the exact probability-flow ODE
   solution (RK4 in λ, 1000 steps), as in `tune_accuracy`, whose same draws give the best official
   configuration's error.

    python -m pydpm.bench.ems_per_element [--mixture tests|full-a|full-b] [--schedule discrete|linear ...]
                                          [--solve [--nfe 5 10] [--eval 16384] [--eval-seeds 0 1]]
                                                        (from a checkout: python bench/ems_per_element.py)

Prints a Markdown table. It needs the repository's tests/ folder.
"""
from __future__ import annotations

import argparse
import time

import torch

try:
    from .full_covariance_mixtures import MIXTURES
    from .sampler_accuracy import _import_helpers
    from .tune_accuracy import describe, problem, v3_configurations
except ImportError:  # run as a script from a checkout
    from full_covariance_mixtures import MIXTURES  # type: ignore[no-redef]
    from sampler_accuracy import _import_helpers  # type: ignore[no-redef]
    from tune_accuracy import describe, problem, v3_configurations  # type: ignore[no-redef]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.ems_per_element", description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", choices=("tests", *MIXTURES), default="tests",
                        help="tests: the 4-component isotropic mixture in D = 64 (default); full-a, full-b: the "
                             "full-covariance mixtures of bench/full_covariance_mixtures.py")
    parser.add_argument("--schedule", nargs="+", choices=("discrete", "linear"), default=["discrete"])
    parser.add_argument("--samples", type=int,
                        help="the fits: data samples per λ (default 16384); the solver: the statistics' data "
                             "samples (default 4096, as tune_accuracy's)")
    parser.add_argument("--points", type=int,
                        help="the fits: λ points, uniform over the interval (default 9); the solver: the "
                             "statistics' grid points (default 101)")
    parser.add_argument("--solve", action="store_true", help="run the solver with both kinds of statistics")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10], help="the solver: model calls (default 5 10)")
    parser.add_argument("--eval", type=int, default=16384, help="the solver: samples per draw (default 16384)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1],
                        help="the solver: evaluation draws, tune_accuracy's seeds (default 0 1)")
    args = parser.parse_args(argv)
    for name in args.schedule:
        if args.solve:
            _solve(args, name)
        else:
            _fits(args, name)
    return 0


def _solve(args, name: str) -> None:
    from pydpm.samplers import EMS, DPMSolverV3
    from pydpm.samplers.ems import estimate_statistics

    began = time.perf_counter()
    _, oracle = _import_helpers()
    osched, ns, mixture, model = problem(args.mixture, name)
    t_T, t_0 = ns.T, 1.0 / ns.total_N
    samples, points = args.samples or 4096, args.points or 101
    data = mixture.sample(samples, generator=torch.Generator().manual_seed(777))
    kinds = ("one l and s per λ", "per element")
    stats = {kind: estimate_statistics(model, ns, data, points=points, t_start=t_T, t_end=t_0, batch=4096,
                                       per_element=kind == "per element") for kind in kinds}
    ems = EMS(*stats[kinds[0]])
    print(f"{name} schedule, mixture {args.mixture}; statistics from {samples} samples on {points} points; "
          f"draws of {args.eval}\n")
    print("| schedule | NFE | draw | one l and s per λ: best of 48 | its error | pydpm's run of it | per element: "
          "best of 48 | its error | per element, the scalar best's configuration | scalar / per-element, best |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    draws = []
    for seed in args.eval_seeds:
        x = torch.randn(args.eval, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        draws.append((seed, x, oracle.ode_solution(mixture.eps, osched, x, t_T, t_0, n=1000)))
    configs = v3_configurations()
    for nfe in args.nfe:
        errors = {kind: torch.empty(len(draws), len(configs), dtype=torch.float64) for kind in kinds}
        for kind in kinds:
            for skip in dict.fromkeys(cfg["skip_type"] for cfg in configs):
                ts = oracle.time_steps(osched, skip, t_T, t_0, nfe)
                solver = oracle.DPMSolverV3(*stats[kind], [float(osched.lam(t)) for t in ts])
                for i, cfg in enumerate(configs):
                    if cfg["skip_type"] != skip:
                        continue
                    for d, (_, x, exact) in enumerate(draws):
                        y = solver.sample(mixture.eps, osched, x, ts, cfg["order"], cfg["p_pseudo"],
                                          cfg["use_corrector"], cfg["c_pseudo"])
                        errors[kind][d, i] = (y - exact).square().mean().sqrt()
        for d, (seed, x, exact) in enumerate(draws):
            (e_scalar, i_scalar), (e_elem, i_elem) = (errors[kind][d].min(0) for kind in kinds)
            cfg = configs[int(i_scalar)]
            times = oracle.time_steps(osched, cfg["skip_type"], t_T, t_0, nfe).to(torch.float64)
            y = DPMSolverV3(model, ns, ems).sample(x, times=times, **{k: v for k, v in cfg.items() if k != "skip_type"})
            print(f"| {name} | {nfe} | {seed} | {describe(cfg)} | {float(e_scalar):.3e} | "
                  f"{float((y - exact).square().mean().sqrt()):.3e} | {describe(configs[int(i_elem)])} | "
                  f"{float(e_elem):.3e} | {float(errors[kinds[1]][d, i_scalar]):.3e} | "
                  f"{float(e_scalar / e_elem):#.3g}× |", flush=True)
    print(f"\n({time.perf_counter() - began:.0f} s; torch {torch.__version__})\n")


def _fits(args, name: str) -> None:
    from pydpm.samplers import compute_ems

    osched, ns, mixture, model = problem(args.mixture, name)
    samples, points = args.samples or 16384, args.points or 9
    data = mixture.sample(samples, generator=torch.Generator().manual_seed(777))
    gen = torch.Generator().manual_seed(0)
    ems = compute_ems(model, ns, data[:4096], t_start=ns.T, t_end=1.0 / ns.total_N, batch=4096)
    dl = torch.gradient(ems.l, spacing=(ems.lambdas,), edge_order=2)[0]

    def derivative(fn, t: torch.Tensor) -> float:
        return float(torch.func.jvp(fn, (t,), (torch.ones_like(t),))[1])

    print(f"{name} schedule, mixture {args.mixture} (D = {mixture.dim}), {samples} samples per λ; "
          f"l and s of compute_ems (4096 samples, 101 points)\n")
    print("| λ | l (pydpm) | l per element: mean, std, min-max | s (pydpm) | s per element: mean, std | "
          "f' unexplained: scalar s | per-element s |")
    print("| ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for k in torch.linspace(0, ems.lambdas.numel() - 1, points).round().long().tolist():
        t = ns.inverse_lambda(ems.lambdas[k:k + 1]).to(torch.float64)
        a, s = float(ns.marginal_alpha(t)), float(ns.marginal_std(t))
        x = a * data + s * torch.randn(data.shape, generator=gen, dtype=torch.float64)
        tt = t.expand(x.shape[0]).clone()
        probe = (torch.randint(0, 2, data.shape, generator=gen) * 2 - 1).to(torch.float64)
        l_elem = s * (probe * torch.func.jvp(lambda x_: model(x_, tt), (x,), (probe,))[1]).mean(0)

        dt = 1.0 / derivative(lambda t_: ns.marginal_lambda(t_).to(torch.float64), t)
        dloga = derivative(lambda t_: ns.marginal_log_mean_coeff(t_).to(torch.float64), t) * dt
        lk = float(ems.l[k])

        def f_of(x_, t_):
            return (ns.marginal_std(t_)[:, None] * model(x_, t_) - lk * x_) / ns.marginal_alpha(t_)[:, None]

        flow = dloga * x - s * model(x, tt)  # dx/dλ of the ODE
        f, df = torch.func.jvp(f_of, (x, tt), (flow, torch.full_like(tt, dt)))
        df = df - float(dl[k]) * x / a
        fc, dfc = f - f.mean(0), df - df.mean(0)
        cov, var = (fc * dfc).mean(0), (fc * fc).mean(0)
        s_elem, s_pooled = cov / var, float(cov.sum() / var.sum())
        total = float(dfc.square().mean())
        left_pooled = float((dfc - s_pooled * fc).square().mean()) / total
        left_elem = float((dfc - s_elem * fc).square().mean()) / total
        print(f"| {float(ems.lambdas[k]):.2f} | {lk:.4f} | {float(l_elem.mean()):.4f}, {float(l_elem.std()):.4f}, "
              f"{float(l_elem.min()):.4f}-{float(l_elem.max()):.4f} | {float(ems.s[k]):.4f} | "
              f"{float(s_elem.mean()):.4f}, {float(s_elem.std()):.4f} | {left_pooled:.1%} | {left_elem:.1%} |")
    print()


if __name__ == "__main__":
    raise SystemExit(run())
