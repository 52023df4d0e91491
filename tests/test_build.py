"""The tests import the built package: a source tree shadowing it (no `_C`, no `pydpm.kernels`) would turn
every compiled-backend test into a skip. Install with `pip install -e ".[test]"` before running them."""
import importlib.util
import platform

import pytest

from pydpm import _backend


def test_compiled_module_loaded():
    assert _backend.C_LOAD_ERROR is None, (
        f"pydpm._C did not load ({_backend.C_LOAD_ERROR}); the tests are importing an unbuilt source tree: "
        f"run `pip install -e .` first")
    info = _backend.build_info()
    assert {"compiler", "openmp", "cuda", "cuda_version", "cuda_archs"} <= set(info)


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="Triton ships for Linux x86_64")
def test_triton_kernels_installed():
    assert importlib.util.find_spec("triton") is not None, "triton is a dependency on Linux x86_64"
    assert importlib.util.find_spec("pydpm.kernels.solver_step") is not None, "pydpm.kernels is not installed"
