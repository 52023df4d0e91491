"""Benchmark cases of the spectral losses: the frequency-weighted MSE of spectrum-aware distillation, the focal
frequency loss and the spectrum weight, forward and forward+backward, on every pydpm backend against the
official focal frequency loss package and eager / torch.compile compositions written from the definitions.

Cases (shape = pred's (B, C, H, W), x0's for the weight; N = B·C·H·W elements of the dtype; bytes are the floor
of one fused call: every input read once, every output written once; the losses' outputs are scalars):

  fwmse         mean(ω·|fft2(pred − target, ortho)|²), ω [B, 1, H, W] float32 (a spectrum weight, drawn with
                the inputs: outside the timed call)          bytes: read pred, target, ω: 2N + |ω|
  fwmse+bwd     the loss and ∂loss/∂pred (target is a constant: noise, or a frozen teacher's features)
                                                             bytes: read pred, target, ω, write ∂pred: 3N + |ω|
  ffl           the focal frequency loss, default options (alpha 1, one patch)     bytes: 2N
  ffl-p2        the same with patch_factor=2 and log_matrix=True                   bytes: 2N
  ffl+bwd, ffl-p2+bwd   the loss and ∂loss/∂pred                                   bytes: 3N
  sw-HxW        spectrum_weight(x0, (H, W)), alpha -1, eps 1e-3 -> ω [B, 1, H, W] float32 (no gradient: a
                constant)                                    bytes: read x0, write ω: N + |ω|

Shapes: fwmse at (16,3,256,256) (an image batch) and (16,320,32,32) (UNet features), fp32 and bf16; ffl at
(16,3,256,256) fp32; sw from x0 (16,3,256,256) to 32x32 and to its own 256x256. These are the targets' shapes,
so CUDA `--quick` keeps them all (with fewer repetitions). CPU: (2,3,32,32) and (2,16,16,16), fp32 only, the
weight to 16x16 and 32x32, so that `pydpm bench --quick --ops spectral` stays short there.

Implementations:
  pydpm[triton], pydpm[reference]   the public ops (`frequency_weighted_mse`, `focal_frequency_loss`,
                   `spectrum_weight`) forced onto each backend. Forward rows run under torch.no_grad() (the
                   loss then keeps no spectrum for a backward); forward+backward rows run the loss, then
                   torch.autograd.grad(loss, pred): what loss.backward() puts in pred.grad, as a training step
                   pays, without accumulating into .grad from one timed call to the next.
  focal_frequency_loss  the official package (pip install focal-frequency-loss; 0.3.0 checked),
                   `FocalFrequencyLoss(alpha=1.0, patch_factor=..., log_matrix=...)(pred, target)`: separate
                   fft2 of pred and target on the stacked patches, the focal weight, and an assertion on the
                   weight's range (two .item() calls: host synchronisations on CUDA). Its loss is pydpm's
                   exactly (its patches stacked [B, p², C, h, w], pydpm's [B, C·p², h, w]: the same planes,
                   the same mean), re-checked on every row against the float64 oracle.
  eager            the definitions as a user writes them: fwmse `d = pred.float() − target.float();
                   (ω·fft2(d, ortho).abs().square()).mean()`; ffl pydpm's `focal_frequency_loss_reference`
                   (the official computation on d = pred − target, one fft2, without its host
                   synchronisations); sw pydpm's `spectrum_weight_reference` (antialiased bilinear resize,
                   fft2, channel mean of |·|, clamp, power).
  torch.compile(eager)  the loss compositions under torch.compile (default mode; Inductor leaves the FFTs to
                   torch and fuses around them); in forward+backward rows the loss is compiled (AOTAutograd
                   compiles its backward) and autograd.grad runs outside.

Checks: every row against a float64 oracle, pydpm's `*_reference` on the inputs in float64 (forward+backward:
float64 autograd through them, the focal weight detached as in the official code). Forward+backward rows
compare the loss and N·∂pred flattened together: the mean's 1/N makes ∂pred ~N times smaller than the loss,
which would otherwise hide an error in it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from pydpm.ops import focal_frequency_loss, frequency_weighted_mse, spectrum_weight
from pydpm.ops.spectral import (FOCAL_OP, FWMSE_OP, WEIGHT_OP, check_focal_frequency_loss,
                                check_frequency_weighted_mse, check_spectrum_weight, focal_frequency_loss_reference,
                                frequency_weighted_mse_reference, spectrum_weight_reference)

from .harness import Case, Impl, Inputs, Outputs, Row, backend_impls, dtype_str, shape_str
from .wavelet import dtypes  # fp32 and bf16 on CUDA, fp32 on the CPU: shared with the other families

IMAGE, FEATURES = (16, 3, 256, 256), (16, 320, 32, 32)
CPU_IMAGE, CPU_FEATURES = (2, 3, 32, 32), (2, 16, 16, 16)
FOCAL_VARIANTS = {"ffl": {}, "ffl-p2": {"patch_factor": 2, "log_matrix": True}}
# The family's targets: forward+backward >= 3x eager at IMAGE and FEATURES, fp32 and bf16 (eager measured there
# on an H200), >= the official package, and a host cost per call no higher than eager's.
SPEEDUP_TARGET = 3.0
EARLIER_EAGER = "0.42 ms at (16,3,256,256) fp32 on an H200"
EAGER, COMPILED, OFFICIAL = "eager", "torch.compile(eager)", "focal_frequency_loss"


# --------------------------------------------------------------------------------------------------
# Timed calls and the float64 oracle
# --------------------------------------------------------------------------------------------------

def timed(loss: Callable[[Inputs], torch.Tensor], backward: bool) -> Callable[[Inputs], object]:
    """The timed callable: `loss(inputs)` under no_grad; with `backward`, the loss and autograd.grad of it wrt
    inputs["pred"], both returned for the check (the gradient times pred's element count)."""
    if not backward:
        def call(t: Inputs):
            with torch.no_grad():
                return loss(t)
        return call

    def call_grad(t: Inputs):
        y = loss(t)
        (grad,) = torch.autograd.grad(y, t["pred"])
        return Outputs(y, grad, scales=(1.0, float(t["pred"].numel())))
    return call_grad


def oracle_of(loss64: Callable[[Inputs], torch.Tensor], backward: bool) -> Callable[[Inputs], torch.Tensor]:
    """`loss64` on the inputs in float64 (with `backward`: float64 autograd wrt pred), in the layout of
    `Outputs.double()`."""
    def oracle(t: Inputs) -> torch.Tensor:
        t64 = {k: v.detach().double().requires_grad_(backward and k == "pred") for k, v in t.items()}
        with torch.enable_grad():
            return timed(loss64, backward)(t64).double()
    return oracle


def _randn(shape, device, dtype, grad=False) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _loss_inputs(shape, dtype, device, backward: bool) -> Inputs:
    return {"pred": _randn(shape, device, dtype, grad=backward), "target": _randn(shape, device, dtype)}


def _case_name(name: str, backward: bool) -> str:
    return name + ("+bwd" if backward else "")


# --------------------------------------------------------------------------------------------------
# Frequency-weighted MSE
# --------------------------------------------------------------------------------------------------

def eager_fwmse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The frequency-weighted MSE from its definition (torch.fft has no bfloat16: the difference in float32)."""
    d = pred.float() - target.float()
    return (weight * torch.fft.fft2(d, norm="ortho").abs().square()).mean()


def fwmse_case(shape, dtype, device, backward: bool) -> Case:
    B, C, H, W = shape

    def inputs() -> Inputs:
        t = _loss_inputs(shape, dtype, device, backward)
        # A 3-channel x0 at the features' own size: the weight's values are what matter, not its resize.
        t["weight"] = spectrum_weight_reference(_randn((B, 3, H, W), device, torch.float32))
        return t

    def ours(t: Inputs) -> torch.Tensor:
        return frequency_weighted_mse(t["pred"], t["target"], t["weight"])

    def eager(t: Inputs) -> torch.Tensor:
        return eager_fwmse(t["pred"], t["target"], t["weight"])

    def reference(t: Inputs) -> torch.Tensor:
        return frequency_weighted_mse_reference(t["pred"], t["target"], t["weight"])

    impls = backend_impls(FWMSE_OP, lambda t: check_frequency_weighted_mse(t["pred"], t["target"], t["weight"]),
                          timed(ours, backward)) + [
        Impl(EAGER, lambda: timed(eager, backward)),
        Impl(COMPILED, lambda: timed(torch.compile(eager), backward)),
    ]
    n, w = math.prod(shape) * dtype.itemsize, B * H * W * 4
    return Case("spectral", _case_name("fwmse", backward), shape, dtype, device,
                inputs, oracle_of(reference, backward), impls, nbytes=(3 if backward else 2) * n + w)


# --------------------------------------------------------------------------------------------------
# Focal frequency loss
# --------------------------------------------------------------------------------------------------

def focal_case(variant: str, shape, device, backward: bool) -> Case:
    options = FOCAL_VARIANTS[variant]
    dtype = torch.float32

    def ours(t: Inputs) -> torch.Tensor:
        return focal_frequency_loss(t["pred"], t["target"], **options)

    def eager(t: Inputs) -> torch.Tensor:
        return focal_frequency_loss_reference(t["pred"], t["target"], **options)

    def official() -> Callable[[Inputs], object]:
        from focal_frequency_loss import FocalFrequencyLoss

        module = FocalFrequencyLoss(**options)
        return timed(lambda t: module(t["pred"], t["target"]), backward)

    impls = backend_impls(FOCAL_OP, lambda t: check_focal_frequency_loss(t["pred"], t["target"], **options),
                          timed(ours, backward)) + [
        Impl(OFFICIAL, official),
        Impl(EAGER, lambda: timed(eager, backward)),
        Impl(COMPILED, lambda: timed(torch.compile(eager), backward)),
    ]
    n = math.prod(shape) * dtype.itemsize
    return Case("spectral", _case_name(variant, backward), shape, dtype, device,
                lambda: _loss_inputs(shape, dtype, device, backward), oracle_of(eager, backward), impls,
                nbytes=(3 if backward else 2) * n)


# --------------------------------------------------------------------------------------------------
# Spectrum weight
# --------------------------------------------------------------------------------------------------

def weight_case(shape, size: tuple[int, int], device) -> Case:
    B = shape[0]

    def ours(t: Inputs) -> torch.Tensor:
        return spectrum_weight(t["x0"], size)

    def eager(t: Inputs) -> torch.Tensor:
        return spectrum_weight_reference(t["x0"], size)

    impls = backend_impls(WEIGHT_OP, lambda t: check_spectrum_weight(t["x0"], size), timed(ours, False)) + [
        Impl(EAGER, lambda: timed(eager, False)),
    ]
    return Case("spectral", f"sw-{size[0]}x{size[1]}", shape, torch.float32, device,
                lambda: {"x0": _randn(shape, device, torch.float32)}, oracle_of(eager, False), impls,
                nbytes=(math.prod(shape) + B * size[0] * size[1]) * 4)


def cases(device: torch.device, quick: bool) -> list[Case]:
    image, features = (IMAGE, FEATURES) if device.type == "cuda" else (CPU_IMAGE, CPU_FEATURES)
    found = []
    for backward in (False, True):
        found += [fwmse_case(shape, dtype, device, backward) for dtype in dtypes(device) for shape in (image, features)]
        found += [focal_case(variant, image, device, backward) for variant in FOCAL_VARIANTS]
    return found + [weight_case(image, size, device) for size in (features[-2:], image[-2:])]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

Ratios = dict[str, list[tuple[float, Case]]]  # per pydpm row name: (the peer's figure / its figure, the case)


def _ratios(results: list[tuple[Case, list[Row]]], names: Iterable[str], peer: str,
            figure: Callable[[Row], float | None]) -> Ratios:
    """Per pydpm row, the peer's `figure` over its own in every case named in `names`; rows with a note
    (failed, mismatched, or a peer's warning) left out."""
    found: Ratios = {}
    for case, rows in results:
        if case.name not in names:
            continue
        theirs = next((figure(r) for r in rows if r.impl == peer and not r.note and figure(r)), None)
        for r in rows:
            mine = figure(r) if r.ours and not r.note else None
            if mine and theirs:
                found.setdefault(r.impl, []).append((theirs / mine, case))
    return found


def _where(case: Case) -> str:
    return f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)}"


def _target_line(what: str, found: Ratios, target: float, targeted: Callable[[Case], bool]) -> str:
    """`what`: per pydpm row the worst ratio among the target's cases (`targeted`), met or not, and every
    ratio; a row measured only elsewhere (the CPU's shapes) is recorded without a verdict."""
    parts = []
    for impl, ratios in found.items():
        detail = ", ".join(f"{_where(case)} {r:.2f}x" for r, case in ratios)
        on_target = [(r, _where(case)) for r, case in ratios if targeted(case)]
        if not on_target:
            parts.append(f"{impl} not on the target's cases, no verdict ({detail})")
            continue
        worst, where = min(on_target)
        parts.append(f"{impl} worst {worst:.2f}x at {where} ({'met' if worst >= target else 'NOT met'}; {detail})")
    return f"{what}: {'; '.join(parts) or 'not measured in this run'}"


def _record_line(what: str, found: Ratios) -> str:
    parts = [f"{impl} " + ", ".join(f"{_where(case)} {r:.2f}x" for r, case in ratios) for impl, ratios in found.items()]
    return f"{what} (recorded, no target): {'; '.join(parts) or 'not measured in this run'}"


def _eager_ms(results: list[tuple[Case, list[Row]]]) -> str:
    """This run's eager fwmse+bwd at IMAGE fp32, for comparison with the earlier measurement."""
    for case, rows in results:
        if case.name == "fwmse+bwd" and case.shape == IMAGE and case.dtype == torch.float32:
            ms = next((r.median_ms for r in rows if r.impl == EAGER and r.median_ms), None)
            if ms:
                return f"{ms:.3f} ms"
    return "not measured"


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The family's targets, per pydpm backend (the worst of the target's cases; eager wall time per call as a
    model pays it, and host cost per call from the host-us column), then the other ratios (device time) for the
    record."""
    def wall(r: Row) -> float | None:
        return r.loop_us

    def device(r: Row) -> float | None:
        return r.median_ms

    def host(r: Row) -> float | None:
        return r.host_us

    def at(shapes: Sequence[tuple[int, ...]]) -> Callable[[Case], bool]:
        return lambda case: case.shape in shapes

    fwmse, focal = ("fwmse", "fwmse+bwd"), tuple(FOCAL_VARIANTS)
    focal_bwd = tuple(_case_name(v, True) for v in FOCAL_VARIANTS)
    lines = [f"eager fwmse+bwd: earlier {EARLIER_EAGER}; this run's {_eager_ms(results)}"]
    for dtype in sorted({case.dtype for case, _ in results if case.name == "fwmse+bwd"}, key=dtype_str):
        found = _ratios([(c, rows) for c, rows in results if c.dtype == dtype], ["fwmse+bwd"], EAGER, wall)
        lines.append(_target_line(f"fwmse+bwd {dtype_str(dtype)} >= {SPEEDUP_TARGET:.0f}x eager at "
                                  f"{shape_str(IMAGE)} and {shape_str(FEATURES)}", found, SPEEDUP_TARGET,
                                  at((IMAGE, FEATURES))))
    lines += [
        _target_line(f"ffl+bwd, ffl-p2+bwd >= the official package ({OFFICIAL}) at {shape_str(IMAGE)} fp32",
                     _ratios(results, focal_bwd, OFFICIAL, wall), 1.0, at((IMAGE,))),
        _target_line("host cost per call <= eager's, fwmse+bwd and the ffl+bwd cases (eager's host us over ours)",
                     _ratios(results, ("fwmse+bwd", *focal_bwd), EAGER, host), 1.0, at((IMAGE, FEATURES))),
        _record_line("host cost per call, forward only: eager's host us over ours",
                     _ratios(results, ("fwmse", *focal), EAGER, host)),
        _record_line("fwmse+bwd vs eager, device time", _ratios(results, ["fwmse+bwd"], EAGER, device)),
        _record_line("fwmse forward vs eager", _ratios(results, ["fwmse"], EAGER, device)),
        _record_line("fwmse, fwmse+bwd vs torch.compile(eager)", _ratios(results, fwmse, COMPILED, device)),
        _record_line("ffl forward vs the official package", _ratios(results, focal, OFFICIAL, device)),
        _record_line("ffl, ffl+bwd vs eager", _ratios(results, focal + focal_bwd, EAGER, device)),
        _record_line("ffl, ffl+bwd vs torch.compile(eager)", _ratios(results, focal + focal_bwd, COMPILED, device)),
        _record_line("spectrum weight vs eager",
                     _ratios(results, [c.name for c, _ in results if c.name.startswith("sw-")], EAGER, device)),
    ]
    return lines
