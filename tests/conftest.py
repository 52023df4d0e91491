"""Shared test setup. Without a CUDA device, Triton kernels run through the interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pydpm.ops import use_backend  # noqa: E402


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; a PYDPM_BACKEND in the caller's environment must not leak in."""
    monkeypatch.delenv("PYDPM_BACKEND", raising=False)
    with use_backend(None):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and steadier on a loaded CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
