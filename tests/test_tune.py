"""`pydpm.samplers.tune` and `TunedSampler` on the analytic Gaussian mixture (exact noise prediction, float64):
the fused sampler runs exactly the coefficients it holds, tuning improves on its start on held-out noise,
depends only on its own seed, round-trips through a file, and refuses bad input naming the argument."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from gaussian_mixture import GaussianMixture
import samplers_oracle as O
from pydpm.samplers import DPMSolver, TunedSampler, UniPC, tune
from pydpm.samplers.tune import _Multistep, _search_sample, _standard_configs, _warped, _warps
from pydpm.schedules import SKIP_TYPES, NoiseScheduleFlow, NoiseScheduleVP, model_wrapper

DIM = 8

pytestmark = pytest.mark.usefixtures("one_thread")


class Problem:
    def __init__(self):
        betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
        self.osched = O.VPDiscrete(betas=betas)
        self.psched = NoiseScheduleVP("discrete", betas=betas, dtype=torch.float64)
        self.gm = GaussianMixture.random(self.osched, DIM, components=3, seed=2, spread=0.5)
        self.model = model_wrapper(self.gm.model_fn("noise", total_N=1000), self.psched)
        self.x = torch.randn(512, DIM, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        self.exact = O.ode_solution(self.gm.eps, self.osched, self.x, self.psched.T, 1e-3, n=1000)

    def error(self, y: torch.Tensor) -> float:
        return float((y - self.exact).square().mean().sqrt())


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.fixture(scope="module")
def tuned(problem):
    return tune(problem.model, problem.psched, 4, shape=(DIM,), n_calibration=512, iterations=150, batch=128,
                reference_steps=200, eval_every=25, dtype=torch.float64, seed=3)


def _by_hand(problem, sampler: TunedSampler, x: torch.Tensor) -> torch.Tensor:
    """The tuned update written out: x_{i+1} = a_i·x_i + Σ_k b_{i,k}·x̂₀ over the last predictions."""
    ts = sampler.times
    alpha, sigma = problem.psched.marginal_alpha(ts), problem.psched.marginal_std(ts)
    ms = []
    for i, (a, row) in enumerate(zip(sampler.a, sampler.b)):
        eps = problem.model(x, ts[i].expand(x.shape[0]))
        ms.append((x - sigma[i] * eps) / alpha[i])
        x = a * x + sum(w * m for w, m in zip(row, ms[-len(row):]))
    return x


def test_the_fused_sampler_runs_its_coefficients(problem):
    gen = torch.Generator().manual_seed(5)
    times = [1.0, 0.6, 0.3, 0.1, 0.02, 1e-3]
    sigma = problem.psched.marginal_std(torch.tensor(times, dtype=torch.float64)).tolist()
    a = [sigma[i + 1] / sigma[i] for i in range(5)]
    b = [(torch.rand(min(3, i + 1), generator=gen, dtype=torch.float64) / 3).tolist() for i in range(5)]
    b[4] = b[4][1:]  # a row may weigh fewer predictions than the one before
    sampler = TunedSampler(problem.model, problem.psched, times, a, b)
    assert sampler.nfe == 5
    torch.testing.assert_close(sampler.sample(problem.x), _by_hand(problem, sampler, problem.x), rtol=1e-10,
                               atol=1e-10)


def test_tuning_improves_on_its_start_and_on_the_standard_solvers(problem, tuned):
    """On noise it never saw: better than its own untuned start and than DPM-Solver++(2M) and UniPC-bh2(2) at
    the same NFE on every standard grid (a margin, not a tie: the fit must generalise)."""
    report = tuned.report
    rms = report["selection_rms"]
    assert {"learned", "standard", "searched"} <= set(rms) <= {"learned", "standard", "warped", "searched"}
    assert report["chosen"] == min(rms, key=rms.get)
    warp = report["standard"]["searched_from"]  # the search's start, a candidate when it is a warp
    grid = DPMSolver(problem.model, problem.psched).grid(report["standard"]["grid"], problem.psched.T, 1e-3, 4)
    assert ("warped" in rms) == (warp is not None) and warp in [None] + [w for w, _ in _warps(problem.psched, grid)]
    assert report["learned_validation_rms"] < 0.8 * report["learned_start"]["validation_rms"]
    start = tune(problem.model, problem.psched, 4, shape=(DIM,), n_calibration=512, iterations=0,
                 search_evaluations=0, reference_steps=200, dtype=torch.float64, seed=3)
    assert start.report["learned_validation_rms"] == pytest.approx(report["learned_start"]["validation_rms"],
                                                                   rel=1e-12)
    ours = problem.error(tuned.sample(problem.x))
    assert ours < 0.8 * problem.error(start.sample(problem.x))
    for skip in ("time_uniform", "logSNR", "time_quadratic", "karras"):
        dpm = DPMSolver(problem.model, problem.psched).sample(problem.x, steps=4, order=2, skip_type=skip)
        unipc = UniPC(problem.model, problem.psched, variant="bh2").sample(problem.x, steps=4, order=2,
                                                                            skip_type=skip)
        assert ours < 0.8 * min(problem.error(dpm), problem.error(unipc)), skip


def test_the_standard_candidate_is_the_best_finalist_over_the_whole_fit_set(problem):
    """The standard solver: the four best configurations and the best of each family (class and prediction type)
    on the first 1024 fit samples (each on its best grid), then the (configuration, grid) with the lowest error
    over the whole fit set, recomputed here from the tuner's own noise and reference."""
    nfe, n_cal = 4, 2048
    tuned = tune(problem.model, problem.psched, nfe, shape=(DIM,), n_calibration=n_cal, iterations=0,
                 search_evaluations=0, reference_steps=200, dtype=torch.float64, seed=4)
    x_cal = torch.randn((n_cal, DIM), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t_T, t_0 = problem.psched.T, 1.0 / problem.psched.total_N
    ref = DPMSolver(problem.model, problem.psched).sample(x_cal, steps=200, order=3, skip_type="logSNR",
                                                          third_order="corrected", t_start=t_T, t_end=t_0)
    n_fit = n_cal - n_cal // 4
    grids = {g: DPMSolver(problem.model, problem.psched).grid(g, t_T, t_0, nfe) for g in SKIP_TYPES}

    def rms(config, grid, rows):
        try:
            y = TunedSampler(problem.model, problem.psched, grids[grid], solver=config).sample(x_cal[rows])
        except ValueError:  # an order the step count cannot take
            return math.inf
        return float((y - ref[rows]).square().mean().sqrt())

    configs = _standard_configs()
    on_subset = sorted((min(rms(c, g, slice(0, 1024)) for g in grids), i) for i, c in enumerate(configs))
    families = {}
    for _, i in on_subset:
        families.setdefault((configs[i]["class"], configs[i]["init"]["algorithm_type"]), i)
    assert len(families) == 4
    expected = {i for _, i in on_subset[:4]} | set(families.values())
    assert len(expected) > 4  # a family's best is not among the four best here: both rules are exercised
    finalists = tuned.report["standard"]["finalists"]
    assert sorted([{k: f[k] for k in ("class", "init", "sample")} for f in finalists], key=repr) == sorted(
        [configs[i] for i in expected], key=repr)
    for f in finalists:
        config = {k: f[k] for k in ("class", "init", "sample")}
        for grid, value in f["fit_rms"].items():
            assert value == pytest.approx(rms(config, grid, slice(0, n_fit)), rel=1e-9), (config, grid)
    best = min(((v, f, g) for f in finalists for g, v in f["fit_rms"].items()), key=lambda b: b[0])
    standard = tuned.report["standard"]
    assert (standard["class"], standard["init"], standard["sample"], standard["grid"]) == (
        best[1]["class"], best[1]["init"], best[1]["sample"], best[2])
    assert tuned.report["chosen"] in ("standard", "searched")  # no search: both are that solver on its grid
    assert tuned.solver == {k: standard[k] for k in ("class", "init", "sample")}
    assert torch.equal(tuned.times, grids[standard["grid"]])


def test_no_two_standard_configurations_are_the_same_sampler(problem):
    """Each standard configuration samples differently from every other on the same grid (a twin would take a
    second finalist slot for nothing), and every solver class, variant, order and prediction type is there."""
    ts = DPMSolver(problem.model, problem.psched).grid("time_uniform", problem.psched.T, 1e-3, 6)
    configs = _standard_configs()
    outs = [TunedSampler(problem.model, problem.psched, ts, solver=c).sample(problem.x[:64]) for c in configs]
    for i in range(len(configs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-9, (configs[j], configs[i])
    kinds = {(c["class"], c["init"].get("variant"), c["init"]["algorithm_type"], c["sample"]["order"]) for c in configs}
    assert len(kinds) == 2 * 2 * 3 + 2 * 2
    assert len(configs) == 2 * 2 * (1 + 2 + 2) + 2 * (2 + 2 * 2)


def test_tuning_sees_only_its_own_calibration_noise(problem, tuned):
    """What tune does is fixed by its seed (the same seed, the same sampler; another seed, another), and
    sampling makes exactly nfe model calls, none of them before x_T is given."""
    seen = []

    def recording(x, t):
        seen.append(x.detach().clone())
        return problem.model(x, t)

    again = tune(recording, problem.psched, 4, shape=(DIM,), n_calibration=512, iterations=150, batch=128,
                 reference_steps=200, eval_every=25, dtype=torch.float64, seed=3)
    assert (again.a, again.b, again.solver) == (tuned.a, tuned.b, tuned.solver)
    assert torch.equal(again.times, tuned.times)
    x_T = problem.x[:16]
    assert not any(torch.isclose(v[..., None, :], x_T).all(-1).any() for v in seen)
    calls = len(seen)
    TunedSampler(recording, problem.psched, tuned.times, tuned.a or None, tuned.b or None,
                 solver=tuned.solver).sample(x_T)
    assert len(seen) - calls == tuned.nfe and torch.equal(seen[calls], x_T)
    other = tune(problem.model, problem.psched, 4, shape=(DIM,), n_calibration=64, iterations=5, batch=16,
                 reference_steps=50, dtype=torch.float64, seed=4)
    assert other.report["selection_rms"] != tuned.report["selection_rms"]


@pytest.mark.parametrize("with_data", [False, True])
def test_scalar_samples(with_data):
    """shape=() (x is [B], one number a sample) tunes as shape (1,) does on the same calibration noise: the same
    choice and the same samples, with and without data (DPM-Solver-v3's statistics of a scalar sample shape)."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def eps(x, t):  # data N(0.5, 0.7)
        a, s = (v.reshape(-1, *[1] * (x.dim() - 1)) for v in (ns.marginal_alpha(t), ns.marginal_std(t)))
        return s * (x - 0.5 * a) / (0.7 * a * a + s * s)

    model = model_wrapper(eps, ns)
    data = 0.5 + math.sqrt(0.7) * torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(n_calibration=64, iterations=20, search_evaluations=10, reference_steps=20, search_samples=16,
              dtype=torch.float64, ems_points=9)
    scalar = tune(model, ns, 3, shape=(), data=data if with_data else None, **kw)
    column = tune(model, ns, 3, shape=(1,), data=data[:, None] if with_data else None, **kw)
    assert scalar.report["chosen"] == column.report["chosen"]
    assert ("v3" in scalar.report["selection_rms"]) == with_data
    for name, err in scalar.report["selection_rms"].items():
        assert math.isclose(err, column.report["selection_rms"][name], rel_tol=1e-9), name
    x = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = scalar.sample(x)
    assert out.shape == (32,)
    torch.testing.assert_close(out, column.sample(x[:, None])[:, 0], rtol=1e-10, atol=1e-12)


def test_save_and_load_round_trip(problem, tuned, tmp_path):
    path = tmp_path / "tuned.json"
    tuned.save(path)
    loaded = TunedSampler.load(path, problem.model, problem.psched)
    assert (loaded.a, loaded.b, loaded.solver, loaded.report) == (tuned.a, tuned.b, tuned.solver, tuned.report)
    torch.testing.assert_close(loaded.sample(problem.x), tuned.sample(problem.x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_schedule differs"):
        TunedSampler.load(path, problem.model, NoiseScheduleVP("linear", dtype=torch.float64))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "binary.json").write_bytes(bytes(range(128, 256)))
    for name in ("other.json", "text.json", "binary.json"):
        with pytest.raises(ValueError, match="not a tuned sampler"):
            TunedSampler.load(tmp_path / name, problem.model, problem.psched)
    with pytest.raises(FileNotFoundError):
        TunedSampler.load(tmp_path / "missing.json", problem.model, problem.psched)


@pytest.mark.parametrize("kwargs, exc, names", [
    (dict(nfe=0), ValueError, "nfe"),
    (dict(nfe=2.0), TypeError, "nfe"),
    (dict(shape="8"), TypeError, "shape"),
    (dict(shape=(0,)), TypeError, "shape"),
    (dict(n_calibration=0), ValueError, "n_calibration"),
    (dict(n_selection=0), ValueError, "n_selection"),
    (dict(n_selection=1.5), TypeError, "n_selection"),
    (dict(history=5), ValueError, "history"),
    (dict(iterations=-1), ValueError, "iterations"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="fast"), TypeError, "lr"),
    (dict(search_evaluations=-1), ValueError, "search_evaluations"),
    (dict(search_samples=1), ValueError, "search_samples"),
    (dict(dtype=torch.float16), ValueError, "dtype"),
    (dict(t_start=1e-3, t_end=0.5), ValueError, "t_start"),
])
def test_bad_input_is_named(problem, kwargs, exc, names):
    args = dict(nfe=3, shape=(DIM,), n_calibration=8, iterations=1, reference_steps=10)
    args.update(kwargs)
    nfe = args.pop("nfe")
    with pytest.raises(exc, match=names):
        tune(problem.model, problem.psched, nfe, **args)


def test_refusals_of_what_tune_cannot_do(problem):
    with pytest.raises(TypeError, match="noise_schedule must be a pydpm.schedules.NoiseScheduleVP or "
                                        "NoiseScheduleFlow"):
        tune(problem.model, "linear", 3, shape=(DIM,))

    def frozen(x, t):  # no gradient reaches the sampler's coefficients through this model
        return problem.model(x.detach(), t.detach()).detach()

    with pytest.raises(TypeError, match="differentiabl"):
        tune(frozen, problem.psched, 3, shape=(DIM,), n_calibration=8, iterations=1, reference_steps=10,
             dtype=torch.float64)


def test_tune_with_data_adds_dpm_solver_v3(problem, tmp_path):
    """With data samples, tune computes EMS and DPM-Solver-v3 competes: on the mixture it wins on held-out noise by
    a wide margin, and the chosen sampler round-trips through a file with its EMS."""
    data = problem.gm.sample(512, generator=torch.Generator().manual_seed(8))
    tuned = tune(problem.model, problem.psched, 4, shape=(DIM,), n_calibration=256, iterations=0,
                 search_evaluations=40, reference_steps=200, dtype=torch.float64, seed=3, data=data, ems_points=41,
                 t_end=1e-3)
    rms = tuned.report["selection_rms"]
    assert {"learned", "standard", "searched", "v3", "v3-searched"} <= set(rms)
    assert set(rms) <= {"learned", "standard", "warped", "searched", "v3", "v3-warped", "v3-searched"}
    assert ("v3-warped" in rms) == (tuned.report["v3"]["searched_from"] is not None)
    assert tuned.report["chosen"] in ("v3", "v3-warped", "v3-searched")
    assert min(v for k, v in rms.items() if k.startswith("v3")) < 0.5 * min(
        v for k, v in rms.items() if k in ("standard", "warped", "searched"))
    assert (tuned.report["chosen"] == "v3") == torch.equal(tuned.times, DPMSolver(problem.model, problem.psched).grid(
        tuned.report["v3"]["grid"], 1.0, 1e-3, 4))
    assert tuned.report["v3"]["ems"]["samples"] == 512 and tuned.ems is not None
    assert problem.error(tuned.sample(problem.x)) < 0.5 * problem.error(
        DPMSolver(problem.model, problem.psched).sample(problem.x, steps=4, t_end=1e-3, skip_type="logSNR"))
    path = tmp_path / "v3.json"
    tuned.save(path)
    loaded = TunedSampler.load(path, problem.model, problem.psched)
    assert torch.equal(loaded.ems.b, tuned.ems.b) and loaded.solver == tuned.solver
    torch.testing.assert_close(loaded.sample(problem.x), tuned.sample(problem.x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="data must be a tensor"):
        tune(problem.model, problem.psched, 3, shape=(DIM,), data=torch.zeros(4, DIM + 1))


def test_the_search_sample_keeps_the_worst_and_estimates_the_mean_without_bias():
    """The searches run on the half of `search_samples` with the largest pilot error on any grid, in full, and a
    weighted uniform draw from the rest: Σ weight·e estimates the mean of e over every fit sample, without bias,
    and a rare large error is always counted (a plain subsample of that size would usually miss it)."""
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 1000, generator=gen, dtype=torch.float64)
    errors[1, 17] = 1e3  # one sample far worse on one grid only
    e = torch.rand(1000, generator=gen, dtype=torch.float64) + 1e3 * (torch.arange(1000) == 17)
    idx, w = _search_sample(errors, 64, torch.Generator().manual_seed(1))
    assert idx.numel() == 64 and idx.unique().numel() == 64 and 17 in idx.tolist()
    assert set(idx[:32].tolist()) == set(errors.amax(0).argsort(descending=True)[:32].tolist())
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    estimates = torch.stack([(e[i] * v).sum() for i, v in (
        _search_sample(errors, 64, torch.Generator().manual_seed(s)) for s in range(400))])
    assert abs(float(estimates.mean() - e.mean())) < 4 * float(estimates.std()) / 20 + 1e-12
    plain = torch.stack([e[torch.randperm(1000, generator=torch.Generator().manual_seed(s))[:64]].mean()
                         for s in range(400)])
    assert float(estimates.std()) < 0.1 * float(plain.std())  # the outlier drives a plain subsample's spread
    all_idx, all_w = _search_sample(errors[:, :50], 64, gen)
    assert torch.equal(all_idx, torch.arange(50)) and torch.equal(all_w, torch.full((50,), 1 / 50, dtype=torch.float64))


@pytest.mark.parametrize("flow", [False, True])
def test_a_warp_moves_steps_towards_its_centre_and_keeps_the_grid_elsewhere(problem, flow):
    """_warped: the ends kept, times strictly decreasing; bump 0 gives the grid back; a bump gathers steps near its
    centre in λ (the step across it shorter; on a uniform grid the steps far from it stay equal to one
    another); a flow grid that starts at λ = −∞ warps too. The lattice the searches start from: 42 distinct grids."""
    ns = FlowProblem().psched if flow else problem.psched
    ts = DPMSolver(problem.model, ns).grid("time_uniform", float(ns.T), 1e-3, 20)
    torch.testing.assert_close(_warped(ns, ts, 0.0, 0.0, 1.0), ts, rtol=1e-12, atol=1e-12)
    lam = ns.marginal_lambda(ts)
    centre = float(lam[10]) + 0.3 * float(lam[11] - lam[10])

    def straddling(t: torch.Tensor) -> float:
        """The λ-length of the step across the centre."""
        lt = ns.marginal_lambda(t)
        i = int(((lt[:-1] <= centre) & (lt[1:] > centre)).nonzero())
        return float(lt[i + 1] - lt[i])

    for bump in (0.5, 2.0):
        warped = _warped(ns, ts, bump, centre, 0.25)
        assert warped[0] == ts[0] and warped[-1] == ts[-1] and bool((warped.diff() < 0).all())
        assert straddling(warped) < straddling(ts) / (1 + bump / 2), bump
        steps = -warped.diff()
        outside = steps[(ns.marginal_lambda(warped[:-1]) - centre).abs() > 2.5]  # ten widths
        assert outside.numel() >= 3 and float(outside.max() / outside.min()) < 1 + 1e-9, bump
    far = _warped(ns, ts, 2.0, float(lam[-1]) + 50.0, 0.5)  # a bump far outside the grid: a no-op
    torch.testing.assert_close(far, ts, rtol=1e-12, atol=1e-12)
    lattice = _warps(ns, ts)
    assert len(lattice) == 42 and len({tuple(w.tolist()) for _, w in lattice}) == 42
    assert all(bool((w.diff() < 0).all()) and w[0] == ts[0] and w[-1] == ts[-1] for _, w in lattice)
    assert {p["bump"] for p, _ in lattice} == {0.5, 1.0, 2.0}


def test_tuned_sampler_checks_its_coefficients(problem):
    times = [1.0, 0.5, 0.1]
    with pytest.raises(ValueError, match="2 steps need 2 entries"):
        TunedSampler(problem.model, problem.psched, times, [1.0], [[0.1], [0.1, 0.2]])
    with pytest.raises(ValueError, match=r"b\[0\] weighs 2 predictions"):
        TunedSampler(problem.model, problem.psched, times, [1.0, 1.0], [[0.1, 0.2], [0.1, 0.2]])
    with pytest.raises(ValueError, match="times must decrease"):
        TunedSampler(problem.model, problem.psched, times[::-1], [1.0, 1.0], [[0.1], [0.1, 0.2]])
    with pytest.raises(ValueError, match="finite"):
        TunedSampler(problem.model, problem.psched, times, [1.0, math.nan], [[0.1], [0.1, 0.2]])
    with pytest.raises(ValueError, match="either a and b"):
        TunedSampler(problem.model, problem.psched, times, [1.0, 1.0], [[0.1], [0.1, 0.2]],
                     solver={"class": "UniPC", "init": {}, "sample": {}})
    with pytest.raises(ValueError, match="solver must be a dict"):
        TunedSampler(problem.model, problem.psched, times, solver={"class": "Euler"})


def test_the_benchmark_runs(capsys):
    """bench/tune_accuracy.py end to end at a toy size (its figures are not checked here)."""
    from pydpm.bench import tune_accuracy

    assert tune_accuracy.run(["--nfe", "2", "--schedule", "linear", "--calibration", "32", "--iterations", "2",
                              "--eval", "16", "--ems-samples", "16", "--ems-points", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| linear | 2 |")]
    # one row per evaluation draw and the pooled one, three ratios each, two with an interval
    assert [row.split(" | ")[2] for row in rows] == ["0", "1", "all"]
    assert all(row.count("×") == 3 and row.count("× [") == 2 for row in rows)
    # the pooled row over two draws of the same size: the tuned error is the RMS of the two, and the official one
    # (one configuration over both) no smaller than the RMS of the draws' own bests (to the printed digits)
    official, tuned = ([float(row.split(" | ")[k]) for row in rows] for k in (4, 5))
    assert tuned[2] == pytest.approx(math.sqrt((tuned[0] ** 2 + tuned[1] ** 2) / 2), rel=1e-2)
    assert official[2] >= math.sqrt((official[0] ** 2 + official[1] ** 2) / 2) * (1 - 1e-2)


def test_the_benchmarks_ratio_interval():
    """ratio_interval: the point ratio is RMS(theirs) / RMS(ours); the interval holds it, narrows with more
    samples, and on errors that differ by a known factor in every sample it is that factor; one large error in a
    few samples (a flipped trajectory) makes it wide."""
    from pydpm.bench.tune_accuracy import ratio_interval

    g = torch.Generator().manual_seed(3)
    ours = torch.rand(4096, generator=g, dtype=torch.float64) + 0.5
    assert ratio_interval(ours, 2.25 * ours) == pytest.approx((1.5, 1.5, 1.5))
    theirs = torch.rand(4096, generator=g, dtype=torch.float64) + 0.5
    ratio, low, high = ratio_interval(ours, theirs)
    assert ratio == pytest.approx(float((theirs.sum() / ours.sum()).sqrt()))
    assert low < ratio < high and high - low < 0.05
    small = ratio_interval(ours[:256], theirs[:256])
    assert small[2] - small[1] > 2 * (high - low)
    flips = theirs.clone()
    flips[:3] += 2e5  # three of 4096 trajectories end elsewhere: they carry the error, and its noise
    ratio, low, high = ratio_interval(ours, flips)
    assert ratio > 10 and high / low > 1.5
    assert ratio_interval(ours, theirs, seed=1) != ratio_interval(ours, theirs, seed=2)
    with pytest.raises(ValueError, match="same non-zero number"):
        ratio_interval(ours, theirs[:10])
    with pytest.raises(ValueError, match="same non-zero number"):
        ratio_interval(ours[:0], theirs[:0])


def test_the_benchmark_keeps_tuned_samplers(capsys, tmp_path, monkeypatch):
    """bench/tune_accuracy.py --tuned DIR: the first run tunes and saves the sampler there, the second loads it
    (tune is not called) and prints the same rows."""
    import pydpm.samplers
    from pydpm.bench import tune_accuracy

    argv = ["--nfe", "2", "--schedule", "linear", "--calibration", "32", "--selection", "48", "--iterations", "2",
            "--eval", "16", "--methods", "tune", "--ems-samples", "16", "--ems-points", "5",
            "--tuned", str(tmp_path / "kept")]
    assert tune_accuracy.run(argv) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| linear |")]
    kept = list((tmp_path / "kept").glob("tests-linear-nfe2-*.json"))
    assert len(first) == 3 and len(kept) == 1 and "-sel48-" in kept[0].name  # two draws, pooled
    assert json.loads(kept[0].read_text())["report"]["n_selection"] == 48  # --selection reaches tune

    def refuse(*args, **kwargs):
        raise AssertionError("tune called although a tuned sampler was kept")

    monkeypatch.setattr(pydpm.samplers, "tune", refuse)
    assert tune_accuracy.run(argv) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| linear |")] == first


def test_the_benchmark_names_a_device_it_cannot_use(capsys):
    from pydpm.bench import tune_accuracy

    bad = ["gpu0"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit):
            tune_accuracy.run(["--device", device])
        assert f"--device {device}" in capsys.readouterr().err.replace("'", "")


def test_tune_digits(capsys):
    """bench/tune_digits.py end to end at a toy size: every row of the table is there, with a finite positive
    distance (and ratio) in each numeric cell (the figures themselves are not checked: the model is barely
    trained)."""
    pytest.importorskip("sklearn")
    from pydpm.bench import tune_digits

    assert tune_digits.run(["--nfe", "5", "--train-steps", "20", "--eval", "32", "--reference-steps", "100",
                            "--calibration", "16", "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    header, rows = rows[0], rows[2:]
    assert header[3:5] == ["Fréchet distance", "RMS distance"] and all(len(row) == len(header) == 7 for row in rows)
    samplers = [(row[0], row[1]) for row in rows]
    assert samplers[:3] == [("100", "reference halves"), ("50", "reference, half the steps"),
                            ("5", "best official (Fréchet)")] and samplers[-1] == ("5", "tune"), samplers
    assert rows[-1][2].startswith("chosen ")
    for row in rows:
        numbers = [float(cell.rstrip("×")) for cell in row[3:] if cell != "—"]
        assert len(numbers) == (1 if row[0] == "100" else 2 if row[0] == "50" else 4), row
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    ran = re.search(r"official configurations that ran: (\d+) of (\d+) at NFE 5\)", out)
    assert ran and 0 < int(ran[1]) <= int(ran[2]), out.splitlines()[-1]
    assert tune_digits.run(["--time-shift", "--nfe", "5", "--train-steps", "20", "--eval", "32",
                            "--reference-steps", "20"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row[0].strip() for row in rows] == ["20"] + ["5"] * 4
    assert all(math.isfinite(float(cell)) and float(cell) >= 0 for row in rows for cell in row[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("learned", [True, False], ids=["learned", "standard"])
def test_tuned_sampler_on_cuda_and_in_a_cuda_graph(learned):
    """A tuned sampler on the GPU (float32) equals its float64 CPU run, eagerly and replayed from a CUDA graph."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def model(x, t):  # an analytic ε-model: any device, any dtype
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    times = [1.0, 0.5, 0.2, 0.05, 1e-3]
    if learned:
        sigma = ns.marginal_std(torch.tensor(times, dtype=torch.float64)).tolist()
        sampler = TunedSampler(model, ns, times, [sigma[i + 1] / sigma[i] for i in range(4)],
                               [[0.3], [0.1, 0.2], [0.05, 0.1, 0.2], [0.05, 0.1, 0.3]])
    else:
        sampler = TunedSampler(model, ns, times, solver={"class": "UniPC", "init": {"variant": "bh2"},
                                                         "sample": {"order": 2, "lower_order_final": True}})
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = sampler.sample(x)
    for graph in (False, True, True):  # capture, then replay
        y = sampler.sample(x.float().cuda(), cuda_graph=graph)
        torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-4, atol=1e-5)


def test_one_fused_launch_per_model_call(problem):
    """A learned 25-step sampler over the last three predictions runs as 25 model calls, each followed by one
    launch that reads the new output and the two stored predictions before it: tuning does not cost the loop its speed."""
    times = torch.linspace(1.0, 1e-3, 26, dtype=torch.float64).tolist()
    sigma = problem.psched.marginal_std(torch.tensor(times, dtype=torch.float64)).tolist()
    b = [[0.1 / (k + 1) for k in range(min(3, i + 1))] for i in range(25)]
    sampler = TunedSampler(problem.model, problem.psched, times, [sigma[i + 1] / sigma[i] for i in range(25)], b)
    sampler.sample(problem.x[:4])
    plan = next(iter(sampler._runners.values())).plan
    assert plan.n_calls == 25 and len(plan.launches) == 25
    assert all(launch.call is not None for launch in plan.launches)
    assert max(len(launch.models) for launch in plan.launches) == 2  # stored predictions, besides the new output
    assert plan.n_storage <= 3


def test_tune_under_classifier_free_guidance(problem):
    """A guided model (classifier-free guidance through model_wrapper, scale 3, one condition for the whole
    batch) tunes like any other: better than its start and than DPM-Solver++(2M), on held-out noise, against
    the guided ODE's fine-step solution."""
    raw = problem.gm.model_fn("noise", total_N=1000, conditional=True)

    def net(x, t_input, cond):  # the wrapper stacks [uncond; cond] for [x; x]: one row of each per half
        return raw(x, t_input, cond.repeat_interleave(x.shape[0] // cond.shape[0], 0))

    shift = torch.linspace(-0.5, 0.5, DIM, dtype=torch.float64)[None]
    guided = model_wrapper(net, problem.psched, guidance_type="classifier-free", condition=shift,
                           unconditional_condition=torch.zeros_like(shift), guidance_scale=3.0)
    tuned = tune(guided, problem.psched, 4, shape=(DIM,), n_calibration=512, iterations=150, batch=128,
                 reference_steps=200, eval_every=25, dtype=torch.float64, seed=3)
    x = problem.x[:256]
    with torch.no_grad():
        exact = DPMSolver(guided, problem.psched).sample(x, steps=400, order=3, skip_type="logSNR",
                                                         third_order="corrected")
    error = lambda y: float((y - exact).square().mean().sqrt())  # noqa: E731
    ours = error(tuned.sample(x))
    assert ours < 0.8 * error(DPMSolver(guided, problem.psched).sample(x, steps=4, skip_type="logSNR"))
    rms = tuned.report["selection_rms"]
    assert min(rms.values()) < 0.8 * tuned.report["learned_start"]["validation_rms"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tune_on_cuda():
    """Tuning itself on the GPU in float32 (calibration noise, reference and fit there): finite errors, and the
    result samples CUDA tensors."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def model(x, t):
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    sampler = tune(model, ns, 3, shape=(3, 8, 8), n_calibration=64, iterations=5, batch=16, reference_steps=20,
                   device="cuda")
    assert all(math.isfinite(v) for v in sampler.report["selection_rms"].values())
    y = sampler.sample(torch.randn(2, 3, 8, 8, device="cuda"))
    assert y.is_cuda and bool(torch.isfinite(y).all())


class FlowProblem(Problem):
    """The mixture on the rectified-flow path (α = 1 − t, σ = t) with an exact velocity model, from t = 1."""

    def __init__(self):
        self.osched, self.psched = O.Flow(), NoiseScheduleFlow(dtype=torch.float64)
        self.gm = GaussianMixture.random(self.osched, DIM, components=3, seed=2, spread=0.5)
        self.model = model_wrapper(self.gm.model_fn("flow"), self.psched, model_type="flow")
        self.x = torch.randn(512, DIM, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        self.exact = O.ode_solution(self.gm.eps, self.osched, self.x, 1 - 1e-12, 1e-3, n=1000)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_flow_start_is_the_exponential_integrator_from_lambda_minus_infinity(order):
    """On a flow schedule the learned method's start (before any fitting) is DPM-Solver++ in its Taylor form from
    t = 1 exactly: the first step from λ = −∞ is first order, and later interpolations drop that point as
    DPM-Solver++'s own limit does."""
    fp = FlowProblem()
    grid = DPMSolver(fp.model, fp.psched).grid("time_uniform", 1.0, 1e-3, 5)
    start = _Multistep(fp.psched, 1.0, 1e-3, 5, order, order, grid)
    times, a, b = start.export()
    expected = DPMSolver(fp.model, fp.psched).sample(fp.x, times=grid, order=order, solver_type="taylor",
                                                     lower_order_final=False, third_order="corrected")
    torch.testing.assert_close(TunedSampler(fp.model, fp.psched, times, a, b).sample(fp.x), expected, rtol=1e-9,
                               atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(start.run(fp.model, fp.x), expected, rtol=1e-9, atol=1e-9)


def test_tune_on_a_flow_schedule(tmp_path):
    """From t = 1 with a velocity model: better than DPM-Solver++(2M) and UniPC-bh2(2) on held-out noise by a
    margin, and the file round trip keeps the schedule; an ε-model at α = 0 and EMS data are refused by name."""
    fp = FlowProblem()
    tuned = tune(fp.model, fp.psched, 4, shape=(DIM,), n_calibration=512, iterations=150, batch=128,
                 reference_steps=200, eval_every=25, dtype=torch.float64, seed=3)
    ours = fp.error(tuned.sample(fp.x))
    for skip in ("time_uniform", "time_quadratic"):
        dpm = DPMSolver(fp.model, fp.psched).sample(fp.x, steps=4, order=2, skip_type=skip)
        unipc = UniPC(fp.model, fp.psched, variant="bh2").sample(fp.x, steps=4, order=2, skip_type=skip)
        assert ours < 0.8 * min(fp.error(dpm), fp.error(unipc)), skip
    tuned.save(tmp_path / "flow.json")
    again = TunedSampler.load(tmp_path / "flow.json", fp.model, fp.psched)
    torch.testing.assert_close(again.sample(fp.x), tuned.sample(fp.x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tuned for"):
        TunedSampler.load(tmp_path / "flow.json", Problem().model, Problem().psched)
    eps_model = model_wrapper(fp.gm.model_fn("noise"), fp.psched)
    with pytest.raises(ValueError, match="model_type='flow'"):
        tune(eps_model, fp.psched, 4, shape=(DIM,), n_calibration=8, iterations=1, reference_steps=10)
    with pytest.raises(ValueError, match="data"):
        tune(fp.model, fp.psched, 4, shape=(DIM,), data=torch.zeros(4, DIM, dtype=torch.float64))
    from_inside = tune(eps_model, fp.psched, 3, shape=(DIM,), n_calibration=64, iterations=5, batch=16,
                       reference_steps=50, dtype=torch.float64, t_start=0.99)
    assert float(from_inside.times[0]) == 0.99 and math.isfinite(fp.error(from_inside.sample(fp.x)))


@pytest.mark.parametrize("name", ["full-a", "full-b"])
def test_the_full_covariance_mixtures_noise_prediction_is_minus_sigma_times_the_score(name):
    """bench/full_covariance_mixtures.py's ε* against −σ_t ∇ log p_t by autograd of the mixture's density, written
    with torch.distributions (its own Cholesky and log-density), at random x, per-sample t and one t for the batch;
    and its samples have the mixture's mean and covariance."""
    from pydpm.bench.full_covariance_mixtures import FullCovarianceMixture

    sched = O.VPLinear()
    mix = FullCovarianceMixture.named(name, sched)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, mix.dim, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    alpha, sigma = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    covs = mix.bases @ torch.diag_embed(mix.eigenvalues) @ mix.bases.transpose(1, 2)  # [K, D, D]
    log_p = torch.stack([torch.distributions.MultivariateNormal(
        alpha[b] * mix.means, alpha[b] ** 2 * covs + sigma[b] ** 2 * torch.eye(mix.dim, dtype=torch.float64)
    ).log_prob(x[b]).add(mix.weights.log()).logsumexp(0) for b in range(5)])
    score, = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(mix.eps(x.detach(), t), -sigma * score, rtol=1e-9, atol=1e-9)
    for b in range(5):  # one time for the whole batch, as a sampler calls it
        torch.testing.assert_close(mix.eps(x.detach(), t[b])[b], -sigma[b] * score[b], rtol=1e-9, atol=1e-9)

    draws = mix.sample(200_000, generator=g)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    centred = mix.means - mean
    cov = (mix.weights[:, None, None] * (covs + centred[:, :, None] * centred[:, None, :])).sum(0)
    assert (draws.mean(0) - mean).abs().max() < 0.02
    assert (torch.cov(draws.T) - cov).abs().max() < 0.03


def test_the_benchmark_runs_on_a_full_covariance_mixture(capsys):
    """bench/tune_accuracy.py --mixture at a toy size: the other mixture's dimension flows through (its figures
    are not checked here)."""
    from pydpm.bench import tune_accuracy

    assert tune_accuracy.run(["--nfe", "2", "--schedule", "discrete", "--calibration", "32", "--iterations", "2",
                              "--eval", "16", "--ems-samples", "16", "--ems-points", "5", "--mixture", "full-a",
                              "--eval-seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("| discrete | 2 |") == 1 and "mixture full-a" in out
