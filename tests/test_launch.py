"""The launch machinery under every op: the ctypes views of the C parameter structs (named fields, checked
against the layout pydpm._C reports) and, on the GPU, Triton kernels launched through `Kernel` (variant keys,
pointer alignment, integer widths, the driver-API path against Triton's own launcher)."""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pydpm import _backend
from _support import HAS_CUDA

needs_c = pytest.mark.skipif(_backend._C is None, reason="pydpm._C did not load")


def test_the_launchers_size_helpers_equal_tritons():
    """kernels._common.cdiv / next_power_of_2 (plain Python, what every launcher sizes its grid and tiles with)
    give triton.cdiv's and triton.next_power_of_2's values."""
    import triton

    common = _backend.kernels("_common")
    values = [*range(0, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40 + 7]
    for n in values:
        assert common.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 1000, 65535):
            assert common.cdiv(n, d) == triton.cdiv(n, d), (n, d)


@needs_c
def test_struct_view_matches_the_reported_layout():
    view = _backend.c_struct("SolverStepParams")
    layout = _backend._C.struct_layouts()["SolverStepParams"]
    assert ctypes.sizeof(view) == layout["size"]
    for name, offset, kind, count, nbytes in layout["fields"]:
        field = getattr(view, name)
        assert (field.offset, field.size) == (offset, nbytes), name
    p = view()
    p.models[:3] = [11, 22, 33]
    p.coefs.values[:2] = (0.5, -2.0)
    assert list(p.models[:3]) == [11, 22, 33] and list(p.coefs.values[:2]) == [0.5, -2.0]


@needs_c
def test_a_layout_the_view_cannot_reproduce_is_refused(monkeypatch):
    real = _backend._C.struct_layouts()

    class Skewed:
        @staticmethod
        def struct_layouts():
            bad = {k: dict(v, fields=list(v["fields"])) for k, v in real.items()}
            name, offset, kind, count, nbytes = bad["SolverStepParams"]["fields"][1]
            bad["SolverStepParams"]["fields"][1] = (name, offset, "i32", count, nbytes)  # an i64 field called i32
            return bad

    monkeypatch.setattr(_backend, "_C", Skewed)
    _backend.c_struct.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="rebuild pydpm"):
            _backend.c_struct("SolverStepParams")
    finally:
        monkeypatch.undo()
        _backend.c_struct.cache_clear()


gpu = pytest.mark.skipif(not HAS_CUDA, reason="compiled Triton kernels launch on the GPU")


def _kernel():
    import triton
    import triton.language as tl

    from pydpm.kernels._launch import Kernel

    @triton.jit(do_not_specialize=["shift"])
    def _axpb_kernel(x, y, n, a, shift, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y + offs, tl.load(x + offs, mask=m) * a + shift, mask=m)

    return Kernel(_axpb_kernel, specialized=("n",))


def _parameter_counts() -> None:
    """Compile `_kernel()` for sm_90 (no GPU needed) with and without `n` specialised, and check the PTX entry's
    parameter counts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.jit import JITFunction

    from pydpm.kernels._launch import _entry_param_count

    fn = JITFunction(_kernel().fn.fn)  # compiled also where the interpreter is on (CI)
    types = {"x": "*fp32", "y": "*fp32", "n": "i32", "a": "fp32", "shift": "i32", "BLOCK": "constexpr"}
    counts = []
    for constants in ({"BLOCK": 128}, {"BLOCK": 128, "n": 1}):
        signature = dict(types, **{k: "constexpr" for k in constants})
        compiled = triton_compile(ASTSource(fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        counts.append(_entry_param_count(compiled))
        hidden = counts[-1] - sum(t != "constexpr" for t in signature.values())
        assert 0 <= hidden <= 2, (counts, compiled.asm["ptx"][:2000])
    assert counts[0] == counts[1] + 1, "n specialised to 1 leaves the entry"


def test_the_parameter_count_comes_from_the_ptx_entry():
    """The driver is asked for exactly the parameters the PTX entry declares (never probed past the last one,
    which compute-sanitizer reports as an API error): the runtime arguments, minus those specialised to
    constants, plus Triton's hidden scratch pointers. Compiled in a child process: Triton's interpreter (on in
    CI) patches triton.language while it runs a kernel, and once, in a whole CI run, a patch left behind made
    this compile fail ('value' object has no attribute 'dtype')."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_launch import _parameter_counts; _parameter_counts()")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]

    from pydpm.kernels._launch import _entry_param_count

    class NoPTX:
        asm = {"cubin": b""}
        name = "k"
    assert _entry_param_count(NoPTX()) is None, "without PTX the kernel keeps Triton's launcher"


@gpu
@pytest.mark.gpu
def test_kernel_launches_every_variant_right():
    kernel = _kernel()
    dev = torch.device("cuda")
    base = torch.randn(4099, device=dev)
    for offset, n, shift in ((0, 4096, 3), (0, 4096, 2 ** 31 + 5), (1, 4097, 5), (0, 1, 7), (3, 1001, 2), (0, 4096, -4)):
        x = base[offset:offset + n]                              # offset 1 and 3: misaligned pointers
        y = torch.full((n + offset,), float("nan"), device=dev)[offset:]
        kernel(((n + 255) // 256,), [x, y, n, 1.5, shift], (x.dtype,), dict(BLOCK=256))
        torch.testing.assert_close(y, x * 1.5 + float(shift), rtol=1e-6, atol=1e-6 * abs(shift))
    # three keys: aligned with n % 16 == 0 (whose 32-bit variant the 64-bit shift replaced: the launch
    # overflows and the JIT compiles the wider one), misaligned with n % 16 != 0 (4097 and 1001), and n == 1
    assert kernel.variants == 3


@gpu
@pytest.mark.gpu
def test_driver_launch_equals_tritons_launcher(monkeypatch):
    from pydpm.kernels import _launch

    results = []
    x = torch.randn(1000, device="cuda")
    for direct in (True, False):
        monkeypatch.setattr(_launch, "_DIRECT", direct)
        kernel = _kernel()
        y = torch.empty_like(x)
        for _ in range(2):  # the first call compiles through the JIT, the second takes the cached path
            y.fill_(float("nan"))
            kernel(((1000 + 127) // 128,), [x, y, 1000, -0.25, 9], (x.dtype,), dict(BLOCK=128))
        entry = next(iter(kernel._cache.values()))
        assert (entry[3] is not None) == direct, "the driver path applies to a plain kernel"
        torch.testing.assert_close(y, x * -0.25 + 9, rtol=1e-6, atol=1e-6)
        results.append(y)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@gpu
@pytest.mark.gpu
def test_a_prepared_launch_changes_only_its_varying_tensors(monkeypatch):
    """`Kernel.prepare`: the first call launches through `Kernel` and learns the driver path; later calls with new
    input tensors (x varying, y fixed) give what a full launch gives; a misaligned x on the aligned variant
    takes `Kernel`'s path (which compiles the unaligned variant) and stays right; under PYDPM_VERIFY_LAUNCHES
    (the GPU tests' setting) every call takes `Kernel`'s path and its check."""
    from pydpm.kernels import _launch

    for verify in (False, True):
        monkeypatch.setattr(_launch, "_VERIFY", verify)
        kernel = _kernel()
        base = torch.randn(4, 1025, device="cuda")
        y = torch.empty(1000, device="cuda")
        prepared = kernel.prepare((8,), [base[0, :1000], y, 1000, 2.0, 3], (y.dtype,), dict(BLOCK=128))
        for i, offset in ((0, 0), (1, 0), (2, 0), (3, 1), (2, 0)):
            y.fill_(float("nan"))
            x = base[i, offset:offset + 1000]
            prepared(x)
            torch.testing.assert_close(y, 2 * x + 3, rtol=0, atol=0)
            assert (prepared.fast is None) == verify
        assert kernel.variants == 2  # aligned, then the misaligned x's own variant


@gpu
@pytest.mark.gpu
def test_an_integer_the_kernel_specialises_must_be_declared():
    import triton
    import triton.language as tl

    from pydpm.kernels._launch import Kernel

    @triton.jit
    def _copy_kernel(x, y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)

    x = torch.randn(16, device="cuda")
    with pytest.raises(TypeError, match="'n' is specialised by Triton"):
        Kernel(_copy_kernel)((1,), [x, torch.empty_like(x), 16], (x.dtype,), dict(BLOCK=16))


_FRESH_THREADS = r"""
import threading
import torch
from pydpm import ops

# The first launch on a thread that no CUDA runtime call has touched: autograd's device thread, whose first work
# is the focal loss's backward (a Triton launch before any torch op there), and a plain thread whose output comes
# from the caching allocator's pool (no runtime call either).
pred = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
target = torch.randn(2, 3, 16, 16, device="cuda")
ops.focal_frequency_loss(pred, target).backward()
expected = pred.grad.clone()
pred.grad = None
x = torch.randn(2, 8, 16, 16, device="cuda")
with ops.use_backend("triton"):
    for _ in range(2):  # compiled through the JIT, then the cached driver-API path
        warm = ops.simple_gate(x)
del warm
found = {}


def gate():
    with ops.use_backend("triton"):
        found["y"] = ops.simple_gate(x)


thread = threading.Thread(target=gate)
thread.start()
thread.join()
torch.testing.assert_close(found["y"], x[:, :4] * x[:, 4:], rtol=0, atol=0)
loss = ops.focal_frequency_loss(pred, target)
loss.backward()
torch.testing.assert_close(pred.grad, expected, rtol=0, atol=0)
print("ok")
"""


@gpu
@pytest.mark.gpu
def test_first_launch_on_a_fresh_thread():
    """A thread with no current CUDA context yet gets the current device's primary context: the launch does not
    fail with CUDA_ERROR_INVALID_CONTEXT (a fresh process, so that no earlier test bound autograd's thread)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FRESH_THREADS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
