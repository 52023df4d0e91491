"""Triton backend of `pydpm.ops.solver_step`: the fused solver step in one launch.

Per element e of x's dense layout (memory order), belonging to sample b = e // per_sample:

    m   = cond                              or  uncond + guidance·(cond − uncond)
    d   = conv[b, 0]·x + conv[b, 1]·m        (when the step has a model output; save ← d)
    out = c[b, 0]·x + [c[b, 1]·d] + Σₖ c[b, ·]·models[k] + [c[b, −1]·z]

in fp32, z being a noise tensor or Philox4x32-10 normals (csrc/common/philox.h's recipe). A model whose bit is
set in BROADCAST holds one sample that every sample reads (element e reads its element e % per_sample). A
constant clamp of d (CLAMP: d = clamp(d, −s, s)/s, diffusers' clip_sample) is fused; dynamic thresholding (a
per-sample quantile) is not implemented here (the dispatcher sends it to the cuda and cpu backends).
Naming chain: `_solver_step_fwd_kernel` (the kernel) → `solver_step_fwd` (the launcher).
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv
from ._launch import Kernel

_MAX_MODELS = 6  # pydpm.ops.solver_step.MAX_MODELS: the kernel has a pointer and a value slot for each

# Where a coefficient comes from (COEF_SRC / CONV_SRC).
_HOST_VALUES = tl.constexpr(0)  # scalar kernel arguments
_SHARED_ROW = tl.constexpr(1)   # a table [n] on the device
_SAMPLE_ROWS = tl.constexpr(2)  # a table [B, n] on the device, row b for sample b

# How an element finds its sample b when some table is per sample (SAMPLE_MAP).
_NO_SAMPLES = tl.constexpr(0)   # no per-sample table
_TWO_SAMPLES = tl.constexpr(1)  # per_sample >= BLOCK: a block covers at most two samples
_PER_ELEMENT = tl.constexpr(2)  # smaller samples: b = e // per_sample for every element

# NOISE: none, a tensor, or Philox normals (StepArgs.noise_mode).
_NOISE_TENSOR = tl.constexpr(1)
_NOISE_PHILOX = tl.constexpr(2)

# Philox4x32-10 and Box-Muller constants (csrc/common/philox.h).
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)
_INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24
_TWO_PI = tl.constexpr(6.283185307179586)          # rounded to fp32 when it meets an fp32 tensor


@triton.jit
def _philox_normals(start, seed, offset, BLOCK: tl.constexpr):
    """The normals of elements start .. start + BLOCK − 1 (start a multiple of 4) for PhiloxNoise(seed,
    offset): group g = e // 4 runs Philox4x32-10 once and its four words give elements 4g .. 4g + 3."""
    g = start // 4 + tl.arange(0, BLOCK // 4)
    c0 = g.to(tl.uint32)  # the low word (int64 → uint32 truncates)
    if g.dtype.primitive_bitwidth > 32:
        c1 = (g >> 32).to(tl.uint32)
    else:
        c1 = c0 * 0
    seed = seed.to(tl.uint64)  # the interpreter types arguments by value, not by annotation
    offset = offset.to(tl.uint64)
    c2 = c0 * 0 + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = c0 * 0 + (offset >> 32).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        hi0, lo0 = tl.umulhi(c0, _PHILOX_M0), c0 * _PHILOX_M0
        hi1, lo1 = tl.umulhi(c2, _PHILOX_M1), c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 += _PHILOX_W0
        k1 += _PHILOX_W1
    n0, n1 = _box_muller(c0, c1)
    n2, n3 = _box_muller(c2, c3)
    # Element 4g + i takes n_i: interleaving (n0, n2) with (n1, n3) gives n0 n1 n2 n3 per group.
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _box_muller(r_u, r_v):
    """Two fp32 normals, radius·(cos 2πv, sin 2πv), from two uint32 words: u in (0, 1], v in [0, 1)."""
    u = ((r_u >> 8) + 1).to(tl.float32) * _INV_2_24
    v = (r_v >> 8).to(tl.float32) * _INV_2_24
    radius = tl.sqrt_rn(-2.0 * tl.log(u))
    sin, cos = _sincos_two_pi(v)
    return radius * cos, radius * sin


@triton.jit
def _sincos_two_pi(v):
    """(sin 2πv, cos 2πv) for v in [0, 1] a multiple of 2^-24. The nearest quarter turn q/4 comes off
    exactly, leaving t = 2π(v − q/4) in [−π/4, π/4] for Cephes' sinf/cosf polynomials: error ≤ 1.1e-7 over
    every such v, against 4.1e-7 for sinf(fl(2π·v)) (philox.h's form), and far cheaper than tl.sin and
    tl.cos (libdevice, with a general range reduction): Philox steps ran 20% faster on an H200."""
    q = tl.floor(v * 4.0 + 0.5)
    t = (v - q * 0.25) * _TWO_PI
    t2 = t * t
    s = t + t * t2 * (-1.6666654611e-1 + t2 * (8.3321608736e-3 + t2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * t2 + t2 * t2 * (4.166664568298827e-2
                                    + t2 * (-1.388731625493765e-3 + t2 * 2.443315711809948e-5))
    # 2πv = q·π/2 + t: each quarter turn maps (sin, cos) to (cos, −sin).
    quarter = q.to(tl.int32) & 3
    odd = (quarter & 1) != 0
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, -s, c)
    return tl.where(quarter >= 2, -sin, sin), tl.where(quarter >= 2, -cos, cos)


@triton.jit
def _coef(table, value, I: tl.constexpr, N: tl.constexpr, SRC: tl.constexpr, b_lo, b_hi, in_hi):
    """Coefficient I of N per row, in fp32, for the block's elements: the host value, entry I of a shared
    table, or entry I of the row of each element's sample (b_lo, or b_hi where in_hi; see SAMPLE_MAP)."""
    if SRC == _HOST_VALUES:
        return value
    elif SRC == _SHARED_ROW:
        return tl.load(table + I).to(tl.float32)
    elif in_hi is None:
        return tl.load(table + b_lo * N + I).to(tl.float32)
    else:
        return tl.where(in_hi, tl.load(table + b_hi * N + I), tl.load(table + b_lo * N + I)).to(tl.float32)


@triton.jit
def _term(ptr, offs, local, mask, SHARED: tl.constexpr):
    """A plain term's values for the block, in fp32: at offs, or at the sample-local index (SHARED: a model
    holding one sample that every sample reads)."""
    if SHARED:
        return tl.load(ptr + local, mask=mask).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask).to(tl.float32)


@triton.jit(do_not_specialize=["per_sample", "seed", "offset"])
def _solver_step_fwd_kernel(
    x, m0, m1, m2, m3, m4, m5, out,       # tensors shaped like x; unused model slots are x
    cond, uncond, save, noise,            # each x when unused
    coefs, conv,                          # coefficient tables (x when unused)
    c_x, c_d, c_m0, c_m1, c_m2, c_m3, c_m4, c_m5, c_z,  # host values (when no table)
    k_x, k_m,                             # the same for the two conversion coefficients
    guidance, clamp,
    seed: tl.uint64, offset: tl.uint64,   # PhiloxNoise
    numel, per_sample,
    N_MODELS: tl.constexpr, HAS_D: tl.constexpr, GUIDED: tl.constexpr, SAVE: tl.constexpr,
    NOISE: tl.constexpr, COEF_SRC: tl.constexpr, CONV_SRC: tl.constexpr, SAMPLE_MAP: tl.constexpr,
    BROADCAST: tl.constexpr, CLAMP: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    N_COEFS: tl.constexpr = 1 + HAS_D + N_MODELS + (NOISE != 0)
    FIRST_MODEL: tl.constexpr = 1 + HAS_D  # coefficient index of models[0]

    if INT64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel

    # The sample(s) whose coefficient rows this block reads (only per-sample tables use them).
    if SAMPLE_MAP == _TWO_SAMPLES:
        b_lo = start // per_sample
        b_hi = (tl.minimum(start + BLOCK, numel) - 1) // per_sample
        in_hi = offs >= b_hi * per_sample
    elif SAMPLE_MAP == _PER_ELEMENT:
        b_lo = tl.minimum(offs, numel - 1) // per_sample
        b_hi = b_lo
        in_hi = None
    else:
        b_lo = 0
        b_hi = 0
        in_hi = None
    if BROADCAST != 0:
        local = offs % per_sample
    else:
        local = offs

    # Every load comes before the stores (out may be x), in the reference's order of terms.
    xv = tl.load(x + offs, mask=mask).to(tl.float32)
    acc = _coef(coefs, c_x, 0, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * xv
    if HAS_D:
        m = tl.load(cond + offs, mask=mask).to(tl.float32)
        if GUIDED:
            u = tl.load(uncond + offs, mask=mask).to(tl.float32)
            m = u + guidance * (m - u)
        d = (_coef(conv, k_x, 0, 2, CONV_SRC, b_lo, b_hi, in_hi) * xv
             + _coef(conv, k_m, 1, 2, CONV_SRC, b_lo, b_hi, in_hi) * m)
        if CLAMP:  # clamp(d, −s, s)/s with NaN kept (comparisons with NaN are false), as the CUDA kernel
            d = tl.where(d > clamp, clamp, tl.where(d < -clamp, -clamp, d)) / clamp
        acc += _coef(coefs, c_d, 1, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * d
    if N_MODELS > 0:
        acc += _coef(coefs, c_m0, FIRST_MODEL + 0, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m0, offs, local, mask, (BROADCAST >> 0) & 1)
    if N_MODELS > 1:
        acc += _coef(coefs, c_m1, FIRST_MODEL + 1, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m1, offs, local, mask, (BROADCAST >> 1) & 1)
    if N_MODELS > 2:
        acc += _coef(coefs, c_m2, FIRST_MODEL + 2, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m2, offs, local, mask, (BROADCAST >> 2) & 1)
    if N_MODELS > 3:
        acc += _coef(coefs, c_m3, FIRST_MODEL + 3, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m3, offs, local, mask, (BROADCAST >> 3) & 1)
    if N_MODELS > 4:
        acc += _coef(coefs, c_m4, FIRST_MODEL + 4, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m4, offs, local, mask, (BROADCAST >> 4) & 1)
    if N_MODELS > 5:
        acc += _coef(coefs, c_m5, FIRST_MODEL + 5, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * \
            _term(m5, offs, local, mask, (BROADCAST >> 5) & 1)
    if NOISE == _NOISE_TENSOR:
        z = tl.load(noise + offs, mask=mask).to(tl.float32)
    elif NOISE == _NOISE_PHILOX:
        z = _philox_normals(start, seed, offset, BLOCK)
    if NOISE != 0:
        acc += _coef(coefs, c_z, N_COEFS - 1, N_COEFS, COEF_SRC, b_lo, b_hi, in_hi) * z

    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(save + offs, d.to(save.dtype.element_ty), mask=mask)


# One 16-byte access per tensor and thread: measured on an H200 from 32K to 64M elements, this beat
# larger blocks (more accesses per thread) and 8 warps everywhere but within a few percent.
_NUM_WARPS = 4
_BLOCK_BY_SIZE = {4: 512, 2: 1024}  # element size (float32; float16, bfloat16) -> BLOCK


def _source(table, values, n: int) -> tuple[int, object, tuple[float, ...]]:
    """(COEF_SRC or CONV_SRC, the table or None, the n host values or zeros when the table is read)."""
    if table is None:
        return _HOST_VALUES.value, None, tuple(values)
    return (_SHARED_ROW.value if table.dim() == 1 else _SAMPLE_ROWS.value), table, (0.0,) * n


_KERNEL = Kernel(_solver_step_fwd_kernel, specialized=("numel",))


def solver_step_fwd(x: torch.Tensor, models, out: torch.Tensor, *, coefs=None, coef_values=None, cond=None,
                    uncond=None, guidance: float = 1.0, conv=None, conv_values=None, save=None, noise=None,
                    philox: tuple[int, int] | None = None, clamp: float = 0.0, broadcast: int = 0) -> None:
    """out (and save: d) of the fused step in one launch on torch's current stream. Every tensor shares x's
    dense layout and dtype; coefficients: a table `coefs` ([n] or [B, n], on x's device) or the n host
    `coef_values` in the order x, d, models, noise; `conv` / `conv_values` likewise for d = k_x·x + k_m·m;
    `philox`: (seed, offset) of in-kernel noise; `clamp` > 0: d = clamp(d, −clamp, clamp)/clamp; `broadcast`: bit k
    set when models[k] holds one sample (x's per-sample layout) that every sample reads."""
    numel = x.numel()
    per_sample = numel // x.shape[0]
    block = _BLOCK_BY_SIZE[x.element_size()]
    n_models, has_d = len(models), cond is not None
    noise_mode = 1 if noise is not None else 2 if philox is not None else 0
    n_coefs = 1 + has_d + n_models + (noise_mode != 0)
    coef_src, coefs, values = _source(coefs, coef_values, n_coefs)
    # Host values by role: x, d, models[0..5], noise (absent terms get 0.0 and are never read).
    c_models = values[1 + has_d:1 + has_d + n_models] + (0.0,) * (_MAX_MODELS - n_models)
    conv_src, conv, k = _source(conv, conv_values or (0.0, 0.0), 2)
    sample_map = _NO_SAMPLES.value
    if _SAMPLE_ROWS.value in (coef_src, conv_src):
        sample_map = _TWO_SAMPLES.value if per_sample >= block else _PER_ELEMENT.value
    int64 = numel > 2**31 - 1
    guided, saved = uncond is not None, save is not None
    key = (n_models, has_d, guided, saved, noise_mode, coef_src, conv_src, sample_map, broadcast, clamp > 0, int64,
           block, x.dtype, None if coefs is None else coefs.dtype, None if conv is None else conv.dtype)
    _KERNEL((cdiv(numel, block),), [
        x, *models, *(x,) * (_MAX_MODELS - n_models), out,
        x if cond is None else cond, x if uncond is None else uncond, x if save is None else save,
        x if noise is None else noise, x if coefs is None else coefs, x if conv is None else conv,
        values[0], values[1] if has_d else 0.0, *c_models, values[-1] if noise_mode else 0.0, k[0], k[1],
        guidance, clamp, philox[0] if philox else 0, philox[1] if philox else 0, numel, per_sample], key, dict(
        N_MODELS=n_models, HAS_D=has_d, GUIDED=guided, SAVE=saved, NOISE=noise_mode, COEF_SRC=coef_src,
        CONV_SRC=conv_src, SAMPLE_MAP=sample_map, BROADCAST=broadcast, CLAMP=clamp > 0, INT64=int64,
        BLOCK=block), num_warps=_NUM_WARPS)
