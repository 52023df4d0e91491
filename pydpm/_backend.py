"""What this process can run: the compiled module `_C` (with its load error), CUDA devices, Triton.

Nothing here raises at import: a failure to load `_C` or Triton is captured and reported by
`pydpm.info()`, and every backend that needs the missing piece says so in its not-supported reasons.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

# Matches csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

try:
    from pydpm import _C  # type: ignore[attr-defined]

    C_LOAD_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any load failure is reported, never raised at import
    _C = None
    C_LOAD_ERROR = f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """`_C.build_info()`, or an empty dict when `_C` did not load."""
    return dict(_C.build_info()) if _C is not None else {}


def c_cpu_reason() -> str | None:
    if _C is None:
        return f"the compiled module pydpm._C did not load ({C_LOAD_ERROR}); reinstall pydpm"
    return None


def c_cuda_reason() -> str | None:
    reason = c_cpu_reason()
    if reason is not None:
        return reason
    if not build_info().get("cuda"):
        return ("pydpm._C was built without CUDA kernels (no CUDA compiler found, or PYDPM_CUDA=off); "
                "rebuild with nvcc on PATH and PYDPM_CUDA=on")
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels_missing() -> bool:
    """pydpm.kernels exists only in an installed package (pyproject maps kernels/ there)."""
    return importlib.util.find_spec("pydpm.kernels") is None


def triton_reason(device: torch.device, forced: bool) -> str | None:
    """Why Triton cannot run on `device`. CPU tensors run only through the interpreter, and only when the
    triton backend is forced (it is a testing aid, far slower than the cpu backend)."""
    err = _triton_import_error()
    if err is not None:
        return f"triton is not importable ({err})"
    if _kernels_missing():
        return "pydpm.kernels is missing (a source tree used without installing it); pip install -e ."
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting() and forced:
        return None
    return (f"tensors are on {device.type}; Triton runs on CUDA tensors, or on CPU ones through the interpreter "
            f"(TRITON_INTERPRET=1) when the triton backend is forced")


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cuda_stream(device: torch.device) -> int:
    """The raw handle of the current CUDA stream of `device` (the fast private getter where torch has it)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream
