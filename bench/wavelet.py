"""Benchmark cases of the Haar wavelet ops: the one-level orthonormal Haar DWT/IDWT and the
wavelet gates of Spectral Diffusion (WG-Down, WG-Up), forward and forward+backward, on every pydpm backend,
against pytorch_wavelets, ptwt and eager / torch.compile compositions written from the definitions.

Cases (the shape column is always the full-resolution tensor (B, C, H, W); h, w = H/2, W/2; N = B·C·H·W
elements of the dtype, G = the B·4·C gates):

  dwt          x -> (ll, high)                                       bytes: read x, write the bands: 2N
  dwt+bwd      the same with autograd: dx = ∂(ll, high)/∂x given (dll, dhigh); outputs (ll, high, dx)
               bytes: forward 2N + read (dll, dhigh) N + write dx N = 4N (the backward is linear: no x)
  idwt         (ll, high) -> x                                       bytes: 2N
  dwt+idwt     the round trip x -> bands -> x, two calls             bytes: 4N (each call reads its input
               and writes its output once). A fused round trip would move 2N (read x, write x: the
               identity); the footer gives both floors.
  wg-dn        WG-Down: y = Σᵢ gates[:, i]·bandᵢ(x), y [B, C, h, w]   bytes: N + N/4 + G
  wg-dn+bwd    outputs (y, dx, dgates) given dy                      bytes: forward + read dy, x, gates,
               write dx, dgates = 3.5N + 3G
  wg-up        WG-Up: x [B, 4C, h, w] (four band chunks ll, h, v, d), each chunk gated, then the inverse -> y
               [B, C, H, W]                                          bytes: 2N + G
  wg-up+bwd    outputs (y, dx, dgates) given dy                      bytes: 5N + 3G

Shapes (16,256,64,64) (the reference shape), (8,640,64,64), (2,320,128,128), (64,64,32,32); fp32 and bf16. CUDA
`--quick`: the first and the last shape. CPU: (2,16,32,32) fp32 only, so `pydpm bench` stays short there.

Implementations, the same names in every case (in the gate cases each peer does the transform, then the
gating from the definition: WG-Down Σᵢ gᵢ·bandᵢ over the four DWT outputs, WG-Up gᵢ·chunkᵢ then the IDWT):

  pydpm[triton], pydpm[reference]   the public ops forced onto each backend (`use_backend`); the
                   forward+backward rows go through autograd (torch.library custom ops), whose backward
                   re-enters the backend forced at the forward (autograd runs CUDA backwards on another
                   thread, which does not see use_backend's ContextVar).
  pytorch_wavelets DWTForward(J=1, wave='haar', mode='zero') / DWTInverse(wave='haar', mode='zero'),
                   built in the case's dtype (`.to(device, dtype)`: its filters are buffers, bf16 works).
                   Layout: it returns (yl, [yh]) with yh [B, C, 3, h, w] and takes the same back — exactly
                   pydpm's (ll, high): verified numerically against pydpm's float64 reference on random
                   input, yl = ll and yh[0][:, :, k] = high[:, :, k] for k = 0, 1, 2, same order, sign +1 (no
                   other band/sign matches; mode 'zero' adds no border on even sizes), and re-checked on every
                   row by the harness. Its filters are stored in float32, so even in float64 it is off the
                   exact transform by ~1e-7 (well inside the fp32 check). pytorch_wavelets 1.3.0 imports
                   pkg_resources at import time (for its DTCWT tables), which setuptools >= 81 no longer
                   ships; when it is missing a stand-in with the one function it uses (resource_stream, via
                   importlib.resources) is registered for the import and removed afterwards (the DWT never
                   calls it).
  ptwt             ptwt.wavedec2(x, pywt.Wavelet('haar'), level=1, mode='zero') -> (cA, (cH, cV, cD)) with
                   separate [B, C, h, w] bands; ptwt.waverec2 takes the same. Verified numerically: cA = ll,
                   (cH, cV, cD) = high.unbind(2), signs +1 (pywt's convention, which pydpm follows). pydpm's
                   high is handed to waverec2 as the zero-copy views high.unbind(2). ptwt 1.0 supports float32
                   and float64 only ("Input dtype torch.bfloat16 not supported"): its bf16 rows are skipped
                   with that reason; compare with its fp32 row of the same shape.
  eager slicing    from the definition in the input dtype: a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2,
                   1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]; ll, h, v, d = (a+b+c+d)/2, (a+b−c−d)/2,
                   (a−b+c−d)/2, (a−b−c+d)/2 (four separate outputs: no packing); the inverse writes the four
                   interleaved quarter grids of an empty output.
  torch.compile(slicing)  the same functions under torch.compile (default mode); in forward+backward rows
                   the forward is compiled (AOTAutograd compiles its backward) and autograd.grad runs outside.

Checks: the harness compares every row with the float64 oracle, pydpm's references (`*_reference`) run in
float64 (forward+backward: float64 autograd through them). Cases with several outputs return an `Outputs`
holder whose `double()` (all the harness's check calls) flattens every output into the oracle's layout, so
ll and every high band, and in forward+backward rows y, dx and dgates, are all compared, not only the first.
dgates are sums over h·w pixels, so they are scaled by 1/√(h·w) on both sides to stay commensurate with y and
dx in the check's max-relative error (otherwise they would hide an error in dx).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import math
import sys
import types
from typing import Callable, Iterator, Sequence

import torch

from pydpm.ops import REGISTRY, haar_dwt2, haar_idwt2, use_backend, wavelet_gate_down, wavelet_gate_up
from pydpm.ops.wavelet import (check_down, check_dwt, check_idwt, check_up, haar_dwt2_reference, haar_idwt2_reference,
                               wavelet_gate_down_reference, wavelet_gate_up_reference)

from .harness import Case, Impl, Inputs, Outputs, Row, backend_impls, dtype_str, shape_str

HEADLINE = (16, 256, 64, 64)  # the reference shape: the footer's DWT+IDWT round trip
SHAPES = (HEADLINE, (8, 640, 64, 64), (2, 320, 128, 128), (64, 64, 32, 32))
CPU_SHAPE = (2, 16, 32, 32)
# An earlier run's device time of one DWT+IDWT of HEADLINE fp32 (ms): H200, 2026-11-26, commit aa1ad4d
# (bench/results/h200-2026-11-26-aa1ad4d-wavelet-quick.md).
EARLIER = "H200, 2026-11-26, commit aa1ad4d"
EARLIER_MS = {"pytorch_wavelets": 1.24, "ptwt": 3.12}
BANDWIDTH_TARGET = 0.70  # the target for fused transforms and gates, forward
BACKWARD_TARGET = 0.50  # forward+backward
SPEEDUP_TARGET = 25.0  # x pytorch_wavelets, same transform
FORWARD_CASES = ("dwt", "idwt", "wg-dn", "wg-up")
BACKWARD_CASES = ("dwt+bwd", "wg-dn+bwd", "wg-up+bwd")
PW, PTWT, EAGER, COMPILED = "pytorch_wavelets", "ptwt", "eager slicing", "torch.compile(slicing)"


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]


def shapes(device: torch.device, quick: bool) -> list[tuple[int, ...]]:
    if device.type != "cuda":
        return [CPU_SHAPE]
    return [SHAPES[0], SHAPES[-1]] if quick else list(SHAPES)


# --------------------------------------------------------------------------------------------------
# Outputs of forward and forward+backward calls (harness.Outputs holds several for the check)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Grad:
    """What a forward+backward call differentiates: inputs `wrt`, one cotangent input per output part
    (a sequence part takes its cotangent's dim-2 slices), and the check scales of (parts..., grads...)."""

    wrt: tuple[str, ...]
    cotangents: tuple[str, ...]
    scales: tuple[float, ...]


def timed_call(forward: Callable[..., list], keys: Sequence[str], grad: Grad | None) -> Callable[[Inputs], object]:
    """The callable the harness times: `forward(*inputs[keys])` -> its output parts; with `grad`, the
    forward then torch.autograd.grad of every output with the cotangent inputs, returning all of them."""
    if grad is None:
        def call(t: Inputs):
            parts = forward(*(t[k] for k in keys))
            return parts[0] if len(parts) == 1 and isinstance(parts[0], torch.Tensor) else Outputs(*parts)
        return call

    def call_grad(t: Inputs):
        parts = forward(*(t[k] for k in keys))
        outs, cots = [], []
        for part, key in zip(parts, grad.cotangents):
            if isinstance(part, torch.Tensor):
                outs.append(part)
                cots.append(t[key])
            else:
                outs += part
                cots += t[key].unbind(2)
        grads = torch.autograd.grad(outs, [t[k] for k in grad.wrt], cots)
        return Outputs(*parts, *grads, scales=grad.scales)
    return call_grad


def oracle_of(reference: Callable[..., list], keys: Sequence[str],
              grad: Grad | None) -> Callable[[Inputs], torch.Tensor]:
    """The float64 oracle: pydpm's references on the inputs in float64 (with `grad`: float64 autograd
    through them), in the layout `Outputs.double()` gives (a plain tensor for one-output forward cases)."""
    def oracle(t: Inputs) -> torch.Tensor:
        t64 = {k: v.detach().double().requires_grad_(grad is not None and k in grad.wrt) for k, v in t.items()}
        with torch.enable_grad():
            result = timed_call(reference, keys, grad)(t64)
        return result if isinstance(result, torch.Tensor) else result.double()
    return oracle


# --------------------------------------------------------------------------------------------------
# Peers: one transform pair per library, gating composed from the definitions
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """A peer's transform pair: dwt(x) -> [ll, high part]; idwt(ll, high part) -> x; `as_high` maps
    pydpm's high [B, C, 3, h, w] to its high part (zero-copy); `pack` builds its high part from three bands."""

    dwt: Callable[[torch.Tensor], list]
    idwt: Callable[[torch.Tensor, object], torch.Tensor]
    as_high: Callable[[torch.Tensor], object]
    pack: Callable[[list], object]


def _bands_of(high) -> tuple[torch.Tensor, ...]:
    return tuple(high.unbind(2)) if isinstance(high, torch.Tensor) else tuple(high)


def slicing_dwt(x: torch.Tensor) -> list:
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return [(a + b + c + d) * 0.5, ((a + b - c - d) * 0.5, (a - b + c - d) * 0.5, (a - b - c + d) * 0.5)]


def slicing_idwt(ll: torch.Tensor, high) -> torch.Tensor:
    h, v, d = _bands_of(high)
    out = ll.new_empty(ll.shape[:-2] + (2 * ll.shape[-2], 2 * ll.shape[-1]))
    out[..., 0::2, 0::2] = (ll + h + v + d) * 0.5
    out[..., 0::2, 1::2] = (ll + h - v - d) * 0.5
    out[..., 1::2, 0::2] = (ll - h + v - d) * 0.5
    out[..., 1::2, 1::2] = (ll - h - v + d) * 0.5
    return out


SLICING = Family(slicing_dwt, slicing_idwt, lambda high: high.unbind(2), tuple)


@contextlib.contextmanager
def _pkg_resources_stand_in() -> Iterator[None]:
    """pytorch_wavelets 1.3.0 runs `from pkg_resources import resource_stream` on import (for its DTCWT
    tables); setuptools >= 81 dropped pkg_resources. Where it is missing, register a stand-in module with
    that one function (importlib.resources) for the import, and remove it afterwards."""
    if importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_stream = lambda package, name: importlib.resources.files(package).joinpath(name).open("rb")
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


def pytorch_wavelets_family(device: torch.device, dtype: torch.dtype) -> Family:
    with _pkg_resources_stand_in():
        from pytorch_wavelets import DWTForward, DWTInverse
    forward = DWTForward(J=1, wave="haar", mode="zero").to(device=device, dtype=dtype)
    inverse = DWTInverse(wave="haar", mode="zero").to(device=device, dtype=dtype)

    def dwt(x):
        yl, yh = forward(x)
        return [yl, yh[0]]

    return Family(dwt, lambda ll, high: inverse((ll, [high])), lambda high: high,
                  lambda bands: torch.stack(bands, dim=2))


def ptwt_family(device: torch.device, dtype: torch.dtype) -> Family:
    import ptwt
    import pywt

    haar = pywt.Wavelet("haar")

    def dwt(x):
        ll, (h, v, d) = ptwt.wavedec2(x, haar, level=1, mode="zero")
        return [ll, (h, v, d)]

    return Family(dwt, lambda ll, high: ptwt.waverec2((ll, tuple(high)), haar), lambda high: high.unbind(2), tuple)


def _ptwt_reasons(t: Inputs) -> list[str]:
    dtype = next(iter(t.values())).dtype
    return [] if dtype in (torch.float32, torch.float64) else [
        f"ptwt supports float32 and float64 only (ValueError: Input dtype {dtype} not supported); see its fp32 row"]


def gated_sum(parts: list, gates: torch.Tensor) -> torch.Tensor:
    """WG-Down from its definition: Σᵢ gates[:, i, :, None, None]·bandᵢ over (ll, h, v, d)."""
    ll, high = parts
    bands = (ll,) + _bands_of(high)
    g = gates.unbind(1)
    y = bands[0] * g[0][..., None, None]
    for band, gi in zip(bands[1:], g[1:]):
        y = y + band * gi[..., None, None]
    return y


def gated_chunks(x: torch.Tensor, gates: torch.Tensor) -> list[torch.Tensor]:
    """WG-Up's first half: chunk i of x [B, 4C, h, w] (band i) times gates[:, i, :, None, None]."""
    return [c * gi[..., None, None] for c, gi in zip(x.chunk(4, dim=1), gates.unbind(1))]


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    """One case kind: its inputs, pydpm's call, the peer composition over a Family and the reference."""

    name: str
    op: str  # REGISTRY_OPS key whose backends are timed
    keys: tuple[str, ...]  # the forward's inputs
    check_args: Callable[..., object]  # the forward's inputs -> WaveletArgs (backend reasons)
    ours: Callable[..., list]
    peer: Callable[[Family], Callable[..., list]]
    reference: Callable[..., list]


KINDS = {
    "dwt": Kind("dwt", "haar_dwt2", ("x",), check_dwt, lambda x: list(haar_dwt2(x)),
                lambda f: f.dwt, lambda x: list(haar_dwt2_reference(x))),
    "idwt": Kind("idwt", "haar_idwt2", ("ll", "high"), check_idwt, lambda ll, high: [haar_idwt2(ll, high)],
                 lambda f: lambda ll, high: [f.idwt(ll, f.as_high(high))],
                 lambda ll, high: [haar_idwt2_reference(ll, high)]),
    "dwt+idwt": Kind("dwt+idwt", "haar_dwt2", ("x",), check_dwt, lambda x: [haar_idwt2(*haar_dwt2(x))],
                     lambda f: lambda x: [f.idwt(*f.dwt(x))],
                     lambda x: [haar_idwt2_reference(*haar_dwt2_reference(x))]),
    "wg-dn": Kind("wg-dn", "wavelet_gate_down", ("x", "gates"), check_down,
                  lambda x, g: [wavelet_gate_down(x, g)], lambda f: lambda x, g: [gated_sum(f.dwt(x), g)],
                  lambda x, g: [wavelet_gate_down_reference(x, g)]),
    "wg-up": Kind("wg-up", "wavelet_gate_up", ("x", "gates"), check_up, lambda x, g: [wavelet_gate_up(x, g)],
                  lambda f: lambda x, g: [f.idwt(*_split(gated_chunks(x, g), f))],
                  lambda x, g: [wavelet_gate_up_reference(x, g)]),
}


def _split(bands: list[torch.Tensor], family: Family) -> tuple[torch.Tensor, object]:
    return bands[0], family.pack(bands[1:])


def _rand(shape, dtype, device, requires_grad=False) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def _gates(B, C, dtype, device, requires_grad=False) -> torch.Tensor:
    g = (torch.rand((B, 4, C), dtype=torch.float32, device=device) * 2 - 0.5).to(dtype)
    return g.requires_grad_(requires_grad)


def make_case(kind: Kind, backward: bool, shape, dtype, device) -> Case:
    B, C, H, W = shape
    h, w = H // 2, W // 2
    N, G, size = math.prod(shape), B * 4 * C, dtype.itemsize
    grad = None
    if kind.name == "dwt":
        nbytes = (4 if backward else 2) * N * size
        grad = Grad(("x",), ("dll", "dhigh"), (1.0, 1.0, 1.0))
    elif kind.name in ("idwt", "dwt+idwt"):
        nbytes = (2 if kind.name == "idwt" else 4) * N * size
    elif kind.name == "wg-dn":
        nbytes = (3.5 * N + 3 * G if backward else 1.25 * N + G) * size
        grad = Grad(("x", "gates"), ("dy",), (1.0, 1.0, 1 / math.sqrt(h * w)))
    else:
        nbytes = (5 * N + 3 * G if backward else 2 * N + G) * size
        grad = Grad(("x", "gates"), ("dy",), (1.0, 1.0, 1 / math.sqrt(h * w)))
    grad = grad if backward else None

    def inputs() -> Inputs:
        r = backward
        if kind.name == "dwt":
            t = {"x": _rand(shape, dtype, device, r)}
            if r:
                t.update(dll=_rand((B, C, h, w), dtype, device), dhigh=_rand((B, C, 3, h, w), dtype, device))
        elif kind.name == "idwt":
            t = {"ll": _rand((B, C, h, w), dtype, device), "high": _rand((B, C, 3, h, w), dtype, device)}
        elif kind.name == "dwt+idwt":
            t = {"x": _rand(shape, dtype, device)}
        elif kind.name == "wg-dn":
            t = {"x": _rand(shape, dtype, device, r), "gates": _gates(B, C, dtype, device, r)}
            if r:
                t["dy"] = _rand((B, C, h, w), dtype, device)
        else:
            t = {"x": _rand((B, 4 * C, h, w), dtype, device, r), "gates": _gates(B, C, dtype, device, r)}
            if r:
                t["dy"] = _rand(shape, dtype, device)
        return t

    def check_args(t: Inputs):
        return kind.check_args(*(t[k].detach() for k in kind.keys))

    ours = backend_impls(REGISTRY[kind.op], check_args, timed_call(kind.ours, kind.keys, grad))
    if backward:
        for impl, backend in zip(ours, REGISTRY[kind.op].backends):
            impl.context = lambda name=backend.name: use_backend(name)

    def peer(name: str, family: Callable[[torch.device, torch.dtype], Family], compiled: bool = False,
             reasons=None) -> Impl:
        def make():
            forward = kind.peer(family(device, dtype))
            return timed_call(torch.compile(forward) if compiled else forward, kind.keys, grad)
        return Impl(name, make, **({"reasons": reasons} if reasons else {}))

    impls = ours + [
        peer(PW, pytorch_wavelets_family),
        peer(PTWT, ptwt_family, reasons=_ptwt_reasons),
        peer(EAGER, lambda device, dtype: SLICING),
        peer(COMPILED, lambda device, dtype: SLICING, compiled=True),
    ]
    name = kind.name + ("+bwd" if backward else "")
    return Case("wavelet", name, shape, dtype, device, inputs, oracle_of(kind.reference, kind.keys, grad), impls,
                nbytes=int(nbytes))


def cases(device: torch.device, quick: bool) -> list[Case]:
    plan = [("dwt", False), ("dwt", True), ("idwt", False), ("dwt+idwt", False), ("wg-dn", False),
            ("wg-dn", True), ("wg-up", False), ("wg-up", True)]
    return [make_case(KINDS[kind], backward, shape, dtype, device) for dtype in dtypes(device)
            for shape in shapes(device, quick) for kind, backward in plan]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _where(case: Case) -> str:
    return f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)}"


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per pydpm backend, the worst row of each target (and where it was); then the headline, the
    DWT+IDWT round trip at (16,256,64,64) fp32, against the peers and the bandwidth floors."""
    def worst(cases: Sequence[str], value: Callable[[list[Row], Row], float | None]) -> dict[str, tuple[float, str]]:
        found: dict[str, tuple[float, str]] = {}
        for case, rows in results:
            if case.name not in cases:
                continue
            for r in rows:
                v = value(rows, r) if r.ours and r.median_ms and not r.note else None
                if v is not None and (r.impl not in found or v < found[r.impl][0]):
                    found[r.impl] = (v, _where(case))
        return found

    def vs(peer: str) -> Callable[[list[Row], Row], float | None]:
        def ratio(rows: list[Row], r: Row) -> float | None:
            p = next((p.median_ms for p in rows if p.impl == peer and p.median_ms), None)
            return p / r.median_ms if p else None
        return ratio

    def line(target: str, values: dict[str, tuple[float, str]], fmt: str, met: Callable[[float], bool] | None):
        verdict = (lambda v: f"{'met' if met(v) else 'NOT met'}; ") if met else (lambda v: "")
        parts = [f"{impl} {fmt.format(v)} ({verdict(v)}worst: {where})" for impl, (v, where) in values.items()]
        return f"{target}: {', '.join(parts) or 'not measured in this run'}"

    lines = [
        line(f"forward dwt/idwt/wg-dn/wg-up >= {BANDWIDTH_TARGET:.0%} of copy bandwidth",
             worst(FORWARD_CASES, lambda rows, r: r.of_ceiling), "{:.1%}", lambda v: v >= BANDWIDTH_TARGET),
        line(f"forward dwt/idwt/wg-dn/wg-up >= {SPEEDUP_TARGET:.0f}x pytorch_wavelets (same transform)",
             worst(FORWARD_CASES, vs(PW)), "{:.1f}x", lambda v: v >= SPEEDUP_TARGET),
        line(f"forward+backward dwt/wg-dn/wg-up >= {BACKWARD_TARGET:.0%} of copy bandwidth",
             worst(BACKWARD_CASES, lambda rows, r: r.of_ceiling), "{:.1%}", lambda v: v >= BACKWARD_TARGET),
        line("forward+backward vs pytorch_wavelets (no target)", worst(BACKWARD_CASES, vs(PW)), "{:.1f}x", None),
    ]
    head = next(((c, rows) for c, rows in results
                 if c.name == "dwt+idwt" and c.shape == HEADLINE and c.dtype == torch.float32), None)
    what = f"DWT+IDWT {shape_str(HEADLINE)} fp32 ({EARLIER}: pytorch_wavelets {EARLIER_MS['pytorch_wavelets']} " \
           f"ms, ptwt {EARLIER_MS['ptwt']} ms)"
    if head is None:
        lines.append(f"{what}: not measured in this run")
    else:
        case, rows = head
        rated = next((r for r in rows if r.of_ceiling), None)
        copy_gbps = rated.throughput / rated.of_ceiling if rated else None
        n = math.prod(case.shape) * case.dtype.itemsize
        floors = (f"floors at the measured copy bandwidth: two passes (4N) {4 * n / copy_gbps / 1e6:.4f} ms, "
                  f"fused (2N, the identity) {2 * n / copy_gbps / 1e6:.4f} ms") if copy_gbps else "no floor"
        timed = ", ".join(f"{r.impl} {r.median_ms:.4f} ms" for r in rows if r.median_ms) or "nothing timed"
        lines.append(f"{what}: {timed}; {floors}")
        for r in rows:
            if not (r.ours and r.of_ceiling) or r.note:
                continue
            ratio = vs(PW)(rows, r)
            lines.append(f"  {r.impl}: {r.of_ceiling:.0%} of copy bandwidth as two passes (target >= "
                         f"{BANDWIDTH_TARGET:.0%}: {'met' if r.of_ceiling >= BANDWIDTH_TARGET else 'NOT met'}); "
                         + (f"{ratio:.1f}x pytorch_wavelets (target >= {SPEEDUP_TARGET:.0f}x: "
                            f"{'met' if ratio >= SPEEDUP_TARGET else 'NOT met'})" if ratio else
                            "pytorch_wavelets not timed"))
    lines.append(f"wavelet peers: pytorch_wavelets {_version('pytorch_wavelets')}, ptwt {_version('ptwt')}, "
                 f"PyWavelets {_version('PyWavelets')}")
    return lines
