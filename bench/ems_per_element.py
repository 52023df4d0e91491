"""Would DPM-Solver-v3's statistics fit better per element? On the Gaussian mixture of `tune_accuracy` (CPU,
float64), at a few λ along the sampling interval: l per element (Hutchinson's estimator, E[v·(∇ₓε v)] per
element) against the one number per λ pydpm fits, and the share of f' = df/dλ that s leaves unexplained,
fit as one number per λ (pydpm) or one per element (the paper).

    python -m pydpm.bench.ems_per_element [--schedule discrete|linear] [--samples 16384] [--points 9]
                                                        (from a checkout: python bench/ems_per_element.py)

f uses the scalar l (as `compute_ems` does); f' is its derivative along the probability-flow ODE (one JVP in
x and t), less dl/dλ·x/α. Where the per-element column is not much below the scalar one, per-element
statistics cannot make the solver much more accurate: what s leaves is not linear in f. Prints a Markdown
table. It needs the repository's tests/ folder.
"""
from __future__ import annotations

import argparse

import torch

try:
    from .sampler_accuracy import _import_helpers, _schedules
except ImportError:  # run as a script from a checkout
    from sampler_accuracy import _import_helpers, _schedules  # type: ignore[no-redef]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.ems_per_element", description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", choices=("discrete", "linear"), default="discrete")
    parser.add_argument("--samples", type=int, default=16384, help="data samples per λ (default 16384)")
    parser.add_argument("--points", type=int, default=9, help="λ points, uniform over the interval (default 9)")
    args = parser.parse_args(argv)

    from pydpm.samplers import compute_ems
    from pydpm.schedules import model_wrapper

    gmm, oracle = _import_helpers()
    osched, ns = _schedules(args.schedule, oracle)
    mixture = gmm.GaussianMixture.random(osched, 64, components=4, seed=1, spread=0.5)
    model = model_wrapper(mixture.model_fn("noise", total_N=osched.total_N if osched.discrete else None), ns)
    data = mixture.sample(args.samples, generator=torch.Generator().manual_seed(777))
    gen = torch.Generator().manual_seed(0)
    ems = compute_ems(model, ns, data[:4096], t_start=ns.T, t_end=1.0 / ns.total_N, batch=4096)
    dl = torch.gradient(ems.l, spacing=(ems.lambdas,), edge_order=2)[0]

    def derivative(fn, t: torch.Tensor) -> float:
        return float(torch.func.jvp(fn, (t,), (torch.ones_like(t),))[1])

    print(f"{args.schedule} schedule, 4-component mixture in D = 64, {args.samples} samples per λ; "
          f"l and s of compute_ems (4096 samples, 101 points)\n")
    print("| λ | l (pydpm) | l per element: mean, std, min-max | s (pydpm) | s per element: mean, std | "
          "f' unexplained: scalar s | per-element s |")
    print("| ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for k in torch.linspace(0, ems.lambdas.numel() - 1, args.points).round().long().tolist():
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
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
