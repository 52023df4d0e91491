"""Helpers shared by the test modules: backends as pytest params, float64 oracles, poisoning."""
from __future__ import annotations

import pytest
import torch

import pydpm.ops  # noqa: F401  (registers every op family, and with them every backend name)
from pydpm.ops._framework import BACKEND_NAMES

HAS_CUDA = torch.cuda.is_available()
BACKENDS = tuple(BACKEND_NAMES)  # cuda, triton, cpu, reference, and the wrapped torch kernels (sdpa-*)


def backend_device(backend: str) -> torch.device:
    """Where a backend's tensors live: cpu for the cpu and reference backends (and without a GPU for triton,
    through the interpreter, and for torch's own SDPA), else cuda."""
    if backend in ("cpu", "reference") or (backend in ("triton", "sdpa") and not HAS_CUDA):
        return torch.device("cpu")
    return torch.device("cuda")


# The triton backend on CPU tensors (tests that build their inputs on the CPU): it runs there through the
# interpreter, which CI turns on; on a GPU machine the triton backend runs on CUDA tensors and the GPU suite
# tests it through the contract tests, so these cases are skipped there.
TRITON_ON_CPU = pytest.param("triton", id="triton", marks=pytest.mark.skipif(
    HAS_CUDA, reason="triton on CPU tensors needs the interpreter (CI); on CUDA see test_contract.py"))


def backend_params():
    """Every backend name; those needing a GPU carry the gpu marker and are skipped without one."""
    params = []
    for name in BACKENDS:
        needs_gpu = backend_device(name).type == "cuda"
        marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")] if needs_gpu else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def randn(*shape, dtype=torch.float64, device="cpu", gen=None) -> torch.Tensor:
    """Standard normals drawn in float64 from `gen` (the same values on every device and dtype), then cast and
    moved."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def map_tensors(obj, fn):
    """Apply fn to every tensor in a nested structure of dicts, lists and tuples (NamedTuples kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_float64_cpu(obj):
    """Upcast every tensor to float64 on the CPU, keeping strides (the oracle sees the same layout)."""
    def up(t):
        if not t.is_floating_point():
            return t.cpu()
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):  # expanded: no strided copy target
            return t.cpu().double()
        out = torch.empty_strided(t.shape, t.stride(), dtype=torch.float64)
        return out.copy_(t.cpu())
    return map_tensors(obj, up)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN (an integer one with its most negative value) so elements a kernel never wrote
    show up."""
    return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
