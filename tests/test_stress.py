"""Long runs keep a fixed footprint; interrupted runs leave their objects usable.

* Every cache on a hot path (dispatch choices, the attention processor's routes, sampling plans, workspaces,
  CUDA graphs) is a `BoundedCache`: a process calling with ever new shapes, strides or seeds stays bounded.
* 10⁴ eager sampling loops with a new seed each (and, on CUDA, 10⁴ CUDA-graph replays) leave the number of live
  tensors and the CUDA allocator's bytes in use where they were after the first loops. A stochastic sampler's
  workspace is reseeded per run, not rebuilt: the result of every seed equals a fresh solver's.
* A CUDA graph keeps the buffers its launches point into, even after the workspace cache evicted them.
* A KeyboardInterrupt raised by the model in the middle of a loop (traced, adaptive, during a CUDA-graph
  capture, in a drop-in scheduler's loop) leaves the object usable: its next run equals a fresh object's.
"""
from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch

from pydpm._cache import BoundedCache
from pydpm.ops import attention
from pydpm.ops._framework import DISPATCH_CACHE_SIZE, REGISTRY
from pydpm.samplers import DPMSolver, SDEDPMSolverPP
from pydpm.samplers._common import MAX_RUNNERS
from pydpm.samplers._program import MAX_GRAPHS, MAX_LAYOUTS, layout_key
from pydpm.schedules import NoiseScheduleVP, model_wrapper

NS = NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def net(x, t):
    return torch.tanh(0.8 * x) * (1 + t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) / 1000)


MF = model_wrapper(net, NS)


def start(shape=(2, 3, 4, 5), device="cpu", seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def footprint(device: str) -> tuple[int, int]:
    """(live tensors, CUDA bytes in use on the device)."""
    n = live_tensors()
    if device == "cuda":
        torch.cuda.synchronize()
        return n, torch.cuda.memory_allocated()
    return n, 0


def the_runner(solver):
    (runner,) = solver._runners.values()
    return runner


# ------------------------------------------------------------------------------------------------ the cache type

def test_bounded_cache_evicts_the_oldest_and_copies_empty():
    c = BoundedCache(3)
    for i in range(5):
        assert c.put(i, str(i)) == str(i)
    assert list(c) == [2, 3, 4]
    c.put(3, "again")  # a present key replaces its value and evicts nothing
    assert list(c.items()) == [(2, "2"), (3, "again"), (4, "4")]
    for twin in (copy.deepcopy(c), copy.copy(c), pickle.loads(pickle.dumps(c))):
        assert type(twin) is BoundedCache and twin.maxsize == 3 and len(twin) == 0
    with pytest.raises(ValueError, match="maxsize=0"):
        BoundedCache(0)


def test_dispatch_choices_stay_bounded_over_new_shapes():
    """attention's dispatch key holds the shapes: 600 distinct shapes keep at most DISPATCH_CACHE_SIZE choices,
    and a call whose choice was evicted still computes the right thing."""
    op = REGISTRY["attention"]
    first = None
    for n in range(1, DISPATCH_CACHE_SIZE + 90):
        q = torch.randn(1, 1, n, 8)
        o = attention(q, q, q)
        first = (q, o) if first is None else first
    assert len(op._chosen) <= DISPATCH_CACHE_SIZE
    q, o = first
    torch.testing.assert_close(attention(q, q, q), o, rtol=0, atol=0)


def test_sampling_caches_stay_bounded():
    """New configurations, layouts and seeds: at most MAX_RUNNERS plans per solver, MAX_LAYOUTS workspaces per
    plan; an evicted layout comes back with the same result."""
    solver = DPMSolver(MF, NS)
    for steps in range(2, MAX_RUNNERS + 6):
        solver.sample(start((1, 4)), steps=steps)
    assert len(solver._runners) == MAX_RUNNERS
    solver = DPMSolver(MF, NS)
    shapes = [(1 + i % 3, 2 + i) for i in range(MAX_LAYOUTS + 5)]
    first = solver.sample(start(shapes[0]), steps=3)
    for s in shapes[1:]:
        solver.sample(start(s), steps=3)
    runner = the_runner(solver)
    assert len(runner._workspaces) == MAX_LAYOUTS and len(runner._bound) <= MAX_LAYOUTS
    torch.testing.assert_close(solver.sample(start(shapes[0]), steps=3), first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ long runs

@pytest.mark.parametrize("device", DEVICES)
def test_ten_thousand_eager_loops_keep_a_fixed_footprint(device):
    solver = SDEDPMSolverPP(MF, NS)
    x = start((1, 4), device)
    for seed in range(20):
        solver.sample(x, steps=2, seed=seed)
    before = footprint(device)
    for seed in range(20, 10_020):
        out = solver.sample(x, steps=2, seed=seed)
    del out
    assert footprint(device) == before
    runner = the_runner(solver)
    assert len(runner._workspaces) == 1, "a new seed must reseed the workspace, not add one"


@pytest.mark.parametrize("device", DEVICES)
def test_a_reseeded_workspace_samples_what_a_fresh_solver_does(device):
    solver = SDEDPMSolverPP(MF, NS)
    x = start(device=device)
    for seed in (3, 5, 3, 2 ** 40 + 7):
        ours = solver.sample(x, steps=4, seed=seed)
        fresh = SDEDPMSolverPP(MF, NS).sample(x, steps=4, seed=seed)
        torch.testing.assert_close(ours, fresh, rtol=0, atol=0)
    assert not torch.equal(solver.sample(x, steps=4, seed=3), solver.sample(x, steps=4, seed=5))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_ten_thousand_graph_replays_keep_a_fixed_footprint():
    solver = SDEDPMSolverPP(MF, NS)
    x = start((2, 4, 8, 8), "cuda")
    eager = solver.sample(x, steps=3, seed=1)
    for _ in range(3):
        solver.sample(x, steps=3, seed=1, cuda_graph=True)
    before = footprint("cuda")
    for _ in range(10_000):
        out = solver.sample(x, steps=3, seed=1, cuda_graph=True)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    del out
    assert footprint("cuda") == before


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphs_stay_bounded_and_keep_their_buffers_alive():
    """Graphs per seed are capped at MAX_GRAPHS; a graph whose workspace the layout cache evicted (more than
    MAX_LAYOUTS other layouts sampled since) still replays into live buffers and returns the eager result."""
    solver = SDEDPMSolverPP(MF, NS)
    x = start((2, 4, 8, 8), "cuda")
    for seed in range(MAX_GRAPHS + 3):
        torch.testing.assert_close(solver.sample(x, steps=3, seed=seed, cuda_graph=True),
                                   solver.sample(x, steps=3, seed=seed), rtol=0, atol=0)
    runner = the_runner(solver)
    assert len(runner._graphs) == MAX_GRAPHS
    kept = MAX_GRAPHS + 2  # the newest graph
    expected = solver.sample(x, steps=3, seed=kept)
    for i in range(MAX_LAYOUTS + 2):  # evict x's workspace, and fill the freed memory with other data
        solver.sample(start((3, 5 + i), "cuda"), steps=3, seed=kept)
    assert layout_key(x) not in runner._workspaces
    junk = [torch.full((2, 4, 8, 8), float("nan"), device="cuda") for _ in range(64)]
    torch.testing.assert_close(solver.sample(x, steps=3, seed=kept, cuda_graph=True), expected, rtol=0, atol=0)
    del junk


# ------------------------------------------------------------------------------------------------ interrupts

class Interrupting:
    """A model function raising KeyboardInterrupt on its `at`-th call (then behaving), as Ctrl-C would."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, x, t):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return net(x, t)


def interrupted_then_rerun(device, method_kwargs, at=3, cuda_graph=False):
    model = Interrupting(at)
    solver = DPMSolver(model_wrapper(model, NS), NS)
    x = start(device=device)
    with pytest.raises(KeyboardInterrupt):
        solver.sample(x, cuda_graph=cuda_graph, **method_kwargs)
    assert not solver._lock.locked()
    return solver.sample(x, cuda_graph=cuda_graph, **method_kwargs), DPMSolver(MF, NS).sample(x, **method_kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(steps=6, order=3), dict(steps=6, order=2, method="singlestep"),
                                    dict(order=2, method="adaptive")], ids=["multistep", "singlestep", "adaptive"])
def test_an_interrupted_loop_leaves_the_solver_usable(device, kwargs):
    ours, fresh = interrupted_then_rerun(device, kwargs)
    torch.testing.assert_close(ours, fresh, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("at", [2, 9], ids=["warm-up", "capture"])
def test_an_interrupted_graph_capture_leaves_the_solver_usable(at):
    """The loop runs once on a side stream (calls 1-6), then under capture (calls 7-12)."""
    ours, fresh = interrupted_then_rerun("cuda", dict(steps=6, order=2), at=at, cuda_graph=True)
    torch.testing.assert_close(ours, fresh, rtol=0, atol=0)
    assert not torch.cuda.is_current_stream_capturing()


def test_an_interrupted_drop_in_scheduler_loop_restarts_cleanly():
    pytest.importorskip("diffusers")
    pd = pytest.importorskip("pydpm.integrations.diffusers")

    def loop(scheduler, x, stop=None):
        scheduler.set_timesteps(8)
        for i, t in enumerate(scheduler.timesteps):
            if i == stop:
                raise KeyboardInterrupt
            x = scheduler.step(torch.tanh(0.8 * x) * (1 + t / 1000), t, x).prev_sample
        return x

    x = start()
    for cls in (pd.DPMSolverMultistepScheduler, pd.UniPCMultistepScheduler, pd.DDIMScheduler):
        ours = cls()
        with pytest.raises(KeyboardInterrupt):
            loop(ours, x, stop=4)
        torch.testing.assert_close(loop(ours, x), loop(cls(), x), rtol=0, atol=0)
