"""The first commands a user runs: `pydpm --version`, `pydpm info` into a pipe its reader closes, `import pydpm`
(with `pydpm.nn` and `pydpm.integrations` imported on first access), and the message for a source tree that
shadows the installed package. Each runs in a fresh interpreter, as a user would start it."""
import pathlib
import site
import subprocess
import sys

import pytest

import pydpm
from pydpm import _backend
from pydpm.cli import EXIT_BROKEN_PIPE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, **kwargs)


def test_version():
    done = subprocess.run([sys.executable, "-m", "pydpm", "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"pydpm {pydpm.__version__}\n"


def test_info_into_a_closed_pipe_is_quiet():
    """`pydpm info | head -1` where head has gone before pydpm writes: no traceback, the SIGPIPE status."""
    proc = subprocess.Popen([sys.executable, "-m", "pydpm", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == EXIT_BROKEN_PIPE, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_info_into_head():
    done = subprocess.run(f"'{sys.executable}' -m pydpm info | head -1", shell=True, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split() == ["pydpm", pydpm.__version__]
    assert "Traceback" not in done.stderr, done.stderr


def test_nn_and_integrations_load_on_first_access():
    code = ("import sys, pydpm\n"
            "assert not {'pydpm.nn', 'pydpm.models', 'pydpm.distill', 'pydpm.integrations'} & set(sys.modules)\n"
            "assert {'nn', 'models', 'distill', 'integrations'} <= set(dir(pydpm))\n"
            "assert pydpm.distill.SpectrumAwareDistiller is sys.modules['pydpm.distill'].SpectrumAwareDistiller\n"
            "assert pydpm.nn.Attention is sys.modules['pydpm.nn'].Attention\n"
            "assert pydpm.models.SlimUNet is sys.modules['pydpm.models'].SlimUNet\n"
            "assert pydpm.integrations is sys.modules['pydpm.integrations']\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported'\n")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="has no attribute 'not_a_module'"):
        pydpm.not_a_module


def test_c_load_error_names_a_shadowing_source_tree(tmp_path):
    missing = ModuleNotFoundError("No module named 'pydpm._C'", name="pydpm._C")
    assert _backend.c_load_error(missing, tmp_path / "pydpm") == (
        "ModuleNotFoundError: No module named 'pydpm._C'; reinstall pydpm")
    (tmp_path / "CMakeLists.txt").touch()
    assert _backend.c_load_error(missing, tmp_path / "pydpm") == (
        f"you are importing the source tree at {tmp_path / 'pydpm'}, which has no compiled extension; run from "
        f"another directory or install with `pip install -e .`")
    broken = ImportError("libfoo.so: cannot open shared object file")
    assert _backend.c_load_error(broken, tmp_path / "pydpm") == f"ImportError: {broken}; reinstall pydpm"


@pytest.mark.skipif(any((ROOT / "pydpm").glob("_C.*")), reason="an in-place build put _C in the source tree")
def test_source_tree_shadowing_the_installed_package():
    """Python started in the checkout imports ./pydpm first. `-S` leaves out the .pth files (an editable
    install's import hook among them) and the site directories are added back by hand, so this is the
    situation after a plain `pip install .`: the package keeps working without _C and says why _C is missing."""
    code = (f"import sys; sys.path += {site.getsitepackages() + [site.getusersitepackages()]!r}\n"
            "import torch, pydpm\n"
            "from pydpm import _backend\n"
            "from pydpm.ops import BackendUnavailable, solver_step, use_backend\n"
            "print(pydpm.__file__)\n"
            "print(_backend.C_LOAD_ERROR)\n"
            "assert solver_step(torch.ones(2, 3), [], [2.0]).eq(2).all()\n"
            "try:\n"
            "    with use_backend('cpu'):\n"
            "        solver_step(torch.ones(2, 3), [], [2.0])\n"
            "except BackendUnavailable as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    file, load_error, refusal = done.stdout.splitlines()[:3]
    assert file == str(ROOT / "pydpm" / "__init__.py")
    message = f"you are importing the source tree at {ROOT / 'pydpm'}, which has no compiled extension"
    assert load_error.startswith(message) and message in refusal, done.stdout
