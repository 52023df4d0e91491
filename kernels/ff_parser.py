"""Triton backend of FF-Parser (`pydpm.ops.ff_parser`): y = irfft2(W ⊙ rfft2(x)) keeps its FFTs in cuFFT
(torch.fft); these kernels are the stage between them, one pass over the half spectrum X [B, C, H, W/2+1]
(complex, unnormalised):

`_ff_parser_fwd_kernel`  Y = X · W / (H·W)                     (the ortho scales of both FFTs folded in)
`_ff_parser_bwd_kernel`  G = dY · conj(W) / (H·W)               (the input-side spectrum, dx = irfft2(G))
                         ∂W = Σ_b conj(X) · dY · m / (H·W)      (m = 2 on the columns irfft2 mirrors)

For even W both write Y (or G) *packed*: Z[kh, k] = (A + conj(B)) + i·e^{iπk/N}·(A − conj(B)), N = W/2,
A = Y[kh, k], B = Y[−kh, N−k] (with the Hermitian parts of columns 0 and N, the only parts irfft2 reads).
Then irfft2(Y) is the c2c inverse FFT of Z over (H, N) viewed as real (even samples in the real parts, odd
in the imaginary): torch's c2r path copies its input before cuFFT runs (cuFFT's c2r overwrites it), the c2c
path does not, so packing saves a full pass over the spectrum. Odd W writes Y plainly for irfft2.

Each program owns one channel c and BLOCK spectrum entries: it loads W once and walks a range of the
batch, so ∂W is reduced in registers (per batch range: partial sums that the launcher adds up; no atomics).
Accumulation is fp32 (fp64 for complex128). Naming chain: `_ff_parser_fwd_kernel` / `_ff_parser_bwd_kernel`
→ the launchers `ff_parser_fwd`, `ff_parser_bwd` (+ `packed_inverse`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc as _acc
from ._common import cdiv, target_programs
from ._launch import Kernel

_NUM_WARPS = 4
_FF_BLOCK = 512         # complex entries per program


# π as two float32-exact parts: their sum is π to ~1e-15 in fp64 arithmetic (a single literal would be rounded
# to fp32 first).
_PI_HI = tl.constexpr(3.1415927410125732)
_PI_LO = tl.constexpr(-8.742277657347586e-08)


@triton.jit
def _pair(ptr, off, mask, F64: tl.constexpr):
    """(re, im) of the complex values at element offsets `off` (interleaved storage; masked lanes read 0)."""
    p = off[:, None] + tl.arange(0, 2)[None, :]
    return tl.split(_acc(tl.load(ptr + p, mask=mask[:, None], other=0.0), F64))


@triton.jit
def _store_pair(ptr, off, re, im, mask):
    p = off[:, None] + tl.arange(0, 2)[None, :]
    tl.store(ptr + p, tl.join(re, im).to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _half_spectrum_pack(ar, ai, a0r, a0i, br, bi, bnr, bni, first, cos, sin):
    """The packed spectrum Z = (A + conj(B)) + i·e^{iθ}·(A − conj(B)) from A = Y[kh, k], B = Y[−kh, N−k],
    whose inverse c2c FFT over (H, N = W/2) gives the real signal's even (re) and odd (im) samples. On the
    first column (`first`: k = 0) irfft2 reads only the Hermitian parts of columns 0 and N, so there A and B are
    (Y[kh, 0] + conj(Y[−kh, 0]))/2 and (Y[−kh, N] + conj(Y[kh, N]))/2, with a0 = Y[−kh, 0], bn = Y[kh, N]."""
    ar = tl.where(first, (ar + a0r) * 0.5, ar)
    ai = tl.where(first, (ai - a0i) * 0.5, ai)
    br = tl.where(first, (br + bnr) * 0.5, br)
    bi = tl.where(first, (bi - bni) * 0.5, bi)
    sr, si = ar + br, ai - bi  # A + conj(B)
    dr, di = ar - br, ai + bi  # A − conj(B)
    return sr - (cos * di + sin * dr), si + (cos * dr - sin * di)


@triton.jit
def _pack_indices(j, H, Wf, valid, F64: tl.constexpr):
    """For packed entries j = kh·N + k (N = Wf − 1): the element offsets of Y[kh, k], Y[−kh, N−k],
    Y[−kh, 0], Y[kh, N] in an [H, Wf] plane, the first-column mask, and (cos, sin) of θ = πk/N."""
    N = Wf - 1
    kh = j // N
    k = j - kh * N
    kh_m = tl.where(kh == 0, 0, H - kh)
    theta = (_PI_HI + _PI_LO) * _acc(k, F64) / _acc(N, F64)
    return (kh * Wf + k) * 2, (kh_m * Wf + N - k) * 2, kh_m * Wf * 2, (kh * Wf + N) * 2, valid & (k == 0), \
        tl.cos(theta), tl.sin(theta), k


# HW and the sizes may be 1: unspecialised, so they stay runtime integers that convert to the float type.
@triton.jit(do_not_specialize=["HW", "Wf"])
def _ff_parser_fwd_kernel(spec, weight, out, B, C, H, Wf, HW, b_per_prog,
                          PACKED: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """Y = spec · weight / HW for b in this program's batch range; writes Y itself into `out` (may be
    spec), or with PACKED (even W) the packed spectrum Z [H, W/2] whose c2c inverse is irfft2(Y)."""
    J = H * (Wf - 1) if PACKED else H * Wf
    n_jb = tl.cdiv(J, BLOCK)
    c = tl.program_id(0) // n_jb
    j = (tl.program_id(0) % n_jb) * BLOCK + tl.arange(0, BLOCK)
    valid = j < J
    inv = 1.0 / _acc(HW, F64)
    w = weight + c * H * Wf * 2
    b0 = tl.program_id(1) * b_per_prog
    plane = H * Wf * 2
    base = (b0.to(tl.int64) * C + c) * plane
    obase = (b0.to(tl.int64) * C + c) * J * 2
    if PACKED:
        o_a, o_b, o_a0, o_bn, first, cos, sin, k = _pack_indices(j, H, Wf, valid, F64)
        war, wai = _pair(w, o_a, valid, F64)
        wbr, wbi = _pair(w, o_b, valid, F64)
        wa0r, wa0i = _pair(w, o_a0, first, F64)
        wbnr, wbni = _pair(w, o_bn, first, F64)
        for _ in range(tl.minimum(b_per_prog, B - b0)):
            ar, ai = _cmul(*_pair(spec + base, o_a, valid, F64), war, wai)
            br, bi = _cmul(*_pair(spec + base, o_b, valid, F64), wbr, wbi)
            a0r, a0i = _cmul(*_pair(spec + base, o_a0, first, F64), wa0r, wa0i)
            bnr, bni = _cmul(*_pair(spec + base, o_bn, first, F64), wbnr, wbni)
            zr, zi = _half_spectrum_pack(ar, ai, a0r, a0i, br, bi, bnr, bni, first, cos, sin)
            _store_pair(out + obase, j * 2, zr * inv, zi * inv, valid)
            base += C * plane
            obase += C * J * 2
    else:
        wr, wi = _pair(w, j * 2, valid, F64)
        wr = wr * inv
        wi = wi * inv
        for _ in range(tl.minimum(b_per_prog, B - b0)):
            yr, yi = _cmul(*_pair(spec + base, j * 2, valid, F64), wr, wi)
            _store_pair(out + obase, j * 2, yr, yi, valid)
            base += C * plane
            obase += C * J * 2


@triton.jit(do_not_specialize=["HW", "Wf"])
def _ff_parser_bwd_kernel(dspec, spec, weight, dxout, dw_part, B, C, H, Wf, W_mirror, HW, b_per_prog,
                          PACKED: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                          BLOCK: tl.constexpr, F64: tl.constexpr):
    """G = dspec · conj(weight) / HW into dxout (plain: may be dspec; PACKED: the packed spectrum of G, whose
    c2c inverse is irfft2(G)), and dw_part[split, c] = Σ_b conj(spec) · dspec · m / HW over this program's
    batch range, m = 2 on the mirrored columns 1 <= kw <= W_mirror."""
    J = H * (Wf - 1) if PACKED else H * Wf
    n_jb = tl.cdiv(J, BLOCK)
    c = tl.program_id(0) // n_jb
    j = (tl.program_id(0) % n_jb) * BLOCK + tl.arange(0, BLOCK)
    valid = j < J
    inv = 1.0 / _acc(HW, F64)
    w = weight + c * H * Wf * 2
    b0 = tl.program_id(1) * b_per_prog
    plane = H * Wf * 2
    base = (b0.to(tl.int64) * C + c) * plane
    obase = (b0.to(tl.int64) * C + c) * J * 2
    if PACKED:
        o_a, o_b, o_a0, o_bn, first, cos, sin, kw = _pack_indices(j, H, Wf, valid, F64)
    else:
        o_a = j * 2
        kw = j % Wf
    if NEED_DX:  # conj(W) / HW at every point read
        war, wai = _pair(w, o_a, valid, F64)
        war, wai = war * inv, -wai * inv
        if PACKED:
            wbr, wbi = _pair(w, o_b, valid, F64)
            wa0r, wa0i = _pair(w, o_a0, first, F64)
            wbnr, wbni = _pair(w, o_bn, first, F64)
            wbr, wbi, wa0r, wa0i, wbnr, wbni = wbr * inv, -wbi * inv, wa0r * inv, -wa0i * inv, wbnr * inv, -wbni * inv
    if NEED_DW:
        acc_r = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
        acc_i = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
        accn_r = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)  # column N (PACKED: on the first-column lanes)
        accn_i = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
    for _ in range(tl.minimum(b_per_prog, B - b0)):
        dr, di = _pair(dspec + base, o_a, valid, F64)
        if PACKED:
            dnr, dni = _pair(dspec + base, o_bn, first, F64)
        if NEED_DW:
            xr, xi = _pair(spec + base, o_a, valid, F64)
            acc_r += xr * dr + xi * di
            acc_i += xr * di - xi * dr
            if PACKED:
                xnr, xni = _pair(spec + base, o_bn, first, F64)
                accn_r += xnr * dnr + xni * dni
                accn_i += xnr * dni - xni * dnr
        if NEED_DX:
            ar, ai = _cmul(dr, di, war, wai)
            if PACKED:
                br, bi = _cmul(*_pair(dspec + base, o_b, valid, F64), wbr, wbi)
                a0r, a0i = _cmul(*_pair(dspec + base, o_a0, first, F64), wa0r, wa0i)
                bnr, bni = _cmul(dnr, dni, wbnr, wbni)
                ar, ai = _half_spectrum_pack(ar, ai, a0r, a0i, br, bi, bnr, bni, first, cos, sin)
            _store_pair(dxout + obase, j * 2, ar, ai, valid)
        base += C * plane
        obase += C * J * 2
    if NEED_DW:
        m = tl.where((kw >= 1) & (kw <= W_mirror), 2.0, 1.0) * inv
        _store_pair(dw_part + (tl.program_id(1) * C + c).to(tl.int64) * plane, o_a, acc_r * m, acc_i * m, valid)
        if PACKED:
            _store_pair(dw_part + (tl.program_id(1) * C + c).to(tl.int64) * plane, o_bn, accn_r * inv, accn_i * inv,
                        first)


# The integers Triton's JIT specialised (divisibility by 16, value 1) stay specialised; HW and Wf may be 1 and
# must stay run-time integers that convert to the float type.
_FWD = Kernel(_ff_parser_fwd_kernel, specialized=("B", "C", "H", "b_per_prog"))
_BWD = Kernel(_ff_parser_bwd_kernel, specialized=("B", "C", "H", "W_mirror", "b_per_prog"))


def _batch_split(B: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(batch entries per program, number of batch ranges) giving about the target number of programs."""
    splits = max(1, min(B, target_programs(device) // max(programs, 1)))
    per = cdiv(B, splits)
    return per, cdiv(B, per)


def _ff_check(t: torch.Tensor, name: str) -> torch.Tensor:
    assert t.is_complex() and t.is_contiguous() and t.dim() == 4, f"{name} must be a contiguous [B, C, H, Wf] spectrum"
    return torch.view_as_real(t)


def _ff_out(out: torch.Tensor, spec: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """(the real storage of `out`, packed?): a real [B, C, H, W] output takes the packed spectrum."""
    if out.is_complex():
        return _ff_check(out, "out"), False
    B, C, H, Wf = spec.shape
    assert width % 2 == 0 and tuple(out.shape) == (B, C, H, width) and out.is_contiguous() and \
        out.dtype == spec.real.dtype, "a packed output is a contiguous real [B, C, H, W] buffer, W even"
    return out, True


def ff_parser_fwd(spec: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, height: int, width: int) -> None:
    """Y = spec · view_as_complex(weight) / (height·width) for the unnormalised half spectrum `spec`
    [B, C, H, W/2+1] (complex64/128, contiguous) and a contiguous real weight [C, H, W/2+1, 2].

    `out` complex like spec (may be spec): Y itself, for irfft2. `out` real [B, C, H, W] (W even): the packed
    spectrum Z, so that view_as_real(ifft2(view_as_complex(Z), norm='forward')) is irfft2(Y) (see
    `packed_inverse`): a c2c inverse, which torch runs without the input copy its c2r transforms make."""
    B, C, H, Wf = spec.shape
    if spec.numel() == 0:
        return
    o, packed = _ff_out(out, spec, width)
    J = H * (Wf - 1) if packed else H * Wf
    per, splits = _batch_split(B, C * cdiv(J, _FF_BLOCK), spec.device)
    f64 = spec.dtype == torch.complex128
    _FWD((C * cdiv(J, _FF_BLOCK), splits), [_ff_check(spec, "spec"), weight, o, B, C, H, Wf, height * width,
                                                   per], (packed, f64, weight.dtype, o.dtype),
         dict(PACKED=packed, BLOCK=_FF_BLOCK, F64=f64), num_warps=_NUM_WARPS)


def ff_parser_bwd(dspec: torch.Tensor, spec: torch.Tensor | None, weight: torch.Tensor, dxout: torch.Tensor | None,
                  height: int, width: int) -> torch.Tensor | None:
    """One pass over dspec = rfft2(dy) (unnormalised, contiguous): writes G = dspec · conj(W) / (H·W) into
    `dxout` when given (complex like dspec: G itself, may be dspec; real [B, C, H, W]: G packed as in
    `ff_parser_fwd`), and returns ∂W [C, H, W/2+1, 2] in the spectrum's real dtype when `spec` (the
    forward's rfft2(x)) is given."""
    B, C, H, Wf = dspec.shape
    need_dw = spec is not None
    real = torch.float64 if dspec.dtype == torch.complex128 else torch.float32
    if dspec.numel() == 0:
        return torch.zeros((C, H, Wf, 2), dtype=real, device=dspec.device) if need_dw else None
    d = _ff_check(dspec, "dspec")
    # Without dx, the plain grid covers every column of ∂W directly.
    o, packed = _ff_out(dxout, dspec, width) if dxout is not None else (d, False)
    J = H * (Wf - 1) if packed else H * Wf
    per, splits = _batch_split(B, C * cdiv(J, _FF_BLOCK), dspec.device)
    dw_part = torch.empty((splits, C, H, Wf, 2), dtype=real, device=dspec.device) if need_dw else None
    f64, need_dx = real == torch.float64, dxout is not None
    _BWD((C * cdiv(J, _FF_BLOCK), splits), [
        d, _ff_check(spec, "spec") if need_dw else d, weight, o, dw_part if need_dw else d, B, C, H, Wf,
        width - Wf, height * width, per], (packed, need_dx, need_dw, f64, weight.dtype, o.dtype),
        dict(PACKED=packed, NEED_DX=need_dx, NEED_DW=need_dw, BLOCK=_FF_BLOCK, F64=f64), num_warps=_NUM_WARPS)
    if not need_dw:
        return None
    return dw_part[0] if splits == 1 else dw_part.sum(0)


def packed_inverse(z: torch.Tensor) -> torch.Tensor:
    """irfft2 of a spectrum packed by `ff_parser_fwd` / `ff_parser_bwd` into the real [B, C, H, W] buffer z
    (unnormalised, as torch.fft.irfft2(norm='forward')): one c2c inverse FFT over (H, W/2), viewed as real."""
    B, C, H, W = z.shape
    spectrum = torch.view_as_complex(z.view(B, C, H, W // 2, 2))
    return torch.view_as_real(torch.fft.ifft2(spectrum, norm="forward")).view(B, C, H, W)
