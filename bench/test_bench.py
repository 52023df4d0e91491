"""A few representative benchmark cases under pytest-benchmark: `python -m pytest bench --benchmark-only`.

`pydpm bench` runs the full table (ceilings, host cost, rotation of input sets); this file gives the same
cases pytest-benchmark's statistics, comparison and storage. It lives outside tests/ (pytest's testpaths),
so `python -m pytest tests` never collects it.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from . import samplers, solver_step
from .harness import check, first_output, synchronizer

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [case for case in solver_step.cases(DEVICE, quick=True)
         if case.dtype == solver_step.dtypes(DEVICE)[0] and math.prod(case.shape) <= math.prod(solver_step.MEDIUM)]
SAMPLER_CASES = [case for case in samplers.cases(DEVICE, quick=True)
                 if case.dtype == samplers.dtypes(DEVICE)[0] and case.shape == samplers.SMALL]


def params(cases):
    return [pytest.param(case, impl, id=f"{case.label}-{impl.name}".replace(" ", "-"))
            for case in cases for impl in case.impls]


@pytest.mark.parametrize(("case", "impl"), params(CASES))
def test_solver_step(benchmark, case, impl):
    run(benchmark, case, impl)


@pytest.mark.parametrize(("case", "impl"), params(SAMPLER_CASES))
def test_samplers(benchmark, case, impl):
    """A whole 20-step sampling loop with the identity model (bench/samplers.py)."""
    run(benchmark, case, impl)


def run(benchmark, case, impl):
    inputs = case.inputs()
    reasons = impl.reasons(inputs)
    if reasons:
        pytest.skip("; ".join(reasons))
    sync = synchronizer(case.device)
    with impl.context():
        try:
            fn = impl.make()
            y = fn(inputs)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is skipped; ours must run
            if impl.ours:
                raise
            pytest.skip(f"peer {impl.name} unavailable: {type(exc).__name__}: {exc}")
        mismatch = check(first_output(y), case.oracle(inputs), case.dtype) if impl.check else ""
        assert not (impl.ours and mismatch), f"{impl.name}: {mismatch}"
        if mismatch:
            warnings.warn(f"{impl.name} on {case.label}: {mismatch}", stacklevel=1)
        benchmark.group = case.label
        benchmark(lambda: (fn(inputs), sync()))
