"""What this process can run: the compiled module `_C` (with its load error), CUDA devices, Triton.

Nothing here raises at import: a failure to load `_C` or Triton is captured and reported by
`pydpm.info()`, and every backend that needs the missing piece says so in its not-supported reasons.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch

# Matches csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def c_load_error(exc: Exception, package_dir: Path) -> str:
    """Why `_C` did not load from `package_dir`, and the fix. No module pydpm._C at all in a source checkout
    (CMakeLists.txt beside the package) means python imported the checkout itself, e.g. run from its root
    after a plain `pip install .`: the current directory comes first on sys.path, and the compiled module
    lives only in the installed copy."""
    if (isinstance(exc, ModuleNotFoundError) and exc.name == "pydpm._C"
            and (package_dir.parent / "CMakeLists.txt").is_file()):
        return (f"you are importing the source tree at {package_dir}, which has no compiled extension; run from "
                f"another directory or install with `pip install -e .`")
    return f"{type(exc).__name__}: {exc}; reinstall pydpm"


_C: ModuleType | None
try:
    _C = importlib.import_module("pydpm._C")
    C_LOAD_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any load failure is reported, never raised at import
    _C = None
    C_LOAD_ERROR = c_load_error(exc, Path(__file__).parent)


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """`_C.build_info()`, or an empty dict when `_C` did not load."""
    return dict(_C.build_info()) if _C is not None else {}


_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "f32": ctypes.c_float,
           "f64": ctypes.c_double, "ptr": ctypes.c_uint64}


@functools.lru_cache(maxsize=None)
def c_struct(name: str) -> type[ctypes.Structure]:
    """A ctypes view of the C++ parameter struct `name` of `_C`, built from the layout `_C` reports (every
    field's name, offset, kind, count and size), so fields are read and written by name and the view cannot
    drift from the C++ definition: an offset, size or total the view does not reproduce raises here."""
    layouts = _C.struct_layouts()
    layout = layouts[name]
    fields, end = [], 0
    for field, offset, kind, count, nbytes in sorted(layout["fields"], key=lambda f: f[1]):
        ctype = _CTYPES[kind] if kind in _CTYPES else c_struct(kind)
        if count > 1:
            ctype = ctype * count
        if offset > end:
            fields.append((f"_pad{end}", ctypes.c_uint8 * (offset - end)))
        fields.append((field, ctype))
        end = offset + ctypes.sizeof(ctype)
        if ctypes.sizeof(ctype) != nbytes:
            raise RuntimeError(f"pydpm._C struct {name}.{field}: {nbytes} bytes in C++, {ctypes.sizeof(ctype)} in "
                               f"the ctypes view; rebuild pydpm")
    if layout["size"] > end:
        fields.append((f"_pad{end}", ctypes.c_uint8 * (layout["size"] - end)))
    view = type(name, (ctypes.Structure,), {"_fields_": fields})
    for field, offset, *_ in layout["fields"]:
        if getattr(view, field).offset != offset:
            raise RuntimeError(f"pydpm._C struct {name}.{field}: offset {offset} in C++, "
                               f"{getattr(view, field).offset} in the ctypes view; rebuild pydpm")
    if ctypes.sizeof(view) != layout["size"]:
        raise RuntimeError(f"pydpm._C struct {name}: {layout['size']} bytes in C++, {ctypes.sizeof(view)} in the "
                           f"ctypes view; rebuild pydpm")
    return view


def c_cpu_reason() -> str | None:
    if _C is None:
        return f"the compiled module pydpm._C did not load: {C_LOAD_ERROR}"
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


def cuda_stream(index: int) -> int:
    """The raw handle of the current CUDA stream of device `index` (the fast private getter where torch has it)."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=None)
def kernels(family: str):
    """The Triton launchers of an op family, `pydpm.kernels.<family>` (imported on first use: Triton is
    optional, and its import costs seconds)."""
    return importlib.import_module(f"pydpm.kernels.{family}")
