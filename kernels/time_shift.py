"""Triton backend of the time-shift pick (`pydpm.ops.time_shift`): per sample b of x [B, N],

    v_b   = Σ (x_bi − mean_b)² / (N − 1)           (NaN when N < 2)
    k_b   = the first j minimising |v_b − promised_j|  (a NaN distance counts as +inf; all +inf: 0)
    out_b = (row_b mod modulus)·K + k_b             (floor modulo; without row: k_b)

and, optionally, up to three row gathers dest_g[b] ← table_g[out_b] (what the time-shift sampler reads per
sample once the pick is made: the model's time, the output conversion, the next update's coefficients), in the
same launch; and optionally, first, the solver step whose result x is (`Update`: the ODE form of
`pydpm.ops.solver_step`, computed per element in the pass that sums x, written, and read back by the second pass),
so that the sampler's update and its next pick are one launch.

The variance: with few samples or small ones, one program per sample makes two passes over its N elements
(the mean, then the squared deviations; the second pass reads what the first left in L2), each lane of the block
accumulating its own partial sums (fp32, fp64 for fp64 x) before one tree reduction. With many elements per
sample and too few samples to fill the device, each sample is split into S chunks, one program each: a program
writes its chunk's (count, mean, M2) (two passes over the chunk) to the scratch and counts itself in the
sample's counter (an atomic, acquire-release); the program that counts last merges the S chunks in chunk order
(Chan et al.'s pairwise update, no cancellation; the same result whichever program comes last), makes the pick
and resets the counter for the next launch. One launch either way, B·S programs reading. Then the K candidates
in blocks of BK, compared in float64. A sample's elements must be one dense block of N at offset b·stride
(contiguous or channels-last x: the variance does not depend on the order); the op copies other layouts once.
Naming chain: `_moments` or `_stepped_moments` (through `_sample_moments`), `_finish` → `_pick_kernel` → the
launcher `time_shift_pick` (and `prepare`, its `Prepared` form).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from pydpm import _backend
from pydpm._cache import BoundedCache

from ._common import acc as _acc, cdiv, target_programs
from ._launch import _INTERPRET, Kernel, Prepared

_NUM_WARPS = 4
_BLOCK = 1024           # elements per pass iteration (8 per thread at 4 warps)
_BK = 64                # candidates per block
_BS = 64                # chunk statistics merged per iteration
_MIN_CHUNK = 1024       # elements per chunk program at least (one iteration of each pass): lower latency than 4096
MAX_GATHERS = 3


@triton.jit
def _m2(base, lo, hi, mean, BLOCK: tl.constexpr, F64: tl.constexpr):
    """Σ (base[i] − mean)² over base[lo:hi]: per-lane partial sums, one tree reduction."""
    lanes = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(lo, hi, BLOCK):
        i = s + lanes
        d = _acc(tl.load(base + i, mask=i < hi, other=0.0), F64) - mean
        squares += tl.where(i < hi, d * d, 0.0)
    return tl.sum(squares, axis=0)


@triton.jit
def _moments(base, lo, hi, BLOCK: tl.constexpr, F64: tl.constexpr):
    """(mean, M2) of base[lo:hi]: two passes, per-lane partial sums, one tree reduction each."""
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(lo, hi, BLOCK):
        i = s + lanes
        total += _acc(tl.load(base + i, mask=i < hi, other=0.0), F64)
    mean = tl.sum(total, axis=0) / (hi - lo)
    return mean, _m2(base, lo, hi, mean, BLOCK, F64)


@triton.jit
def _stepped_moments(new, x_in, cond, uncond, o0, o1, save, lo, hi, c_x, c_d, c_0, c_1, k_x, k_m, guidance,
                     N_OLDER: tl.constexpr, GUIDED: tl.constexpr, SAVE: tl.constexpr, BLOCK: tl.constexpr,
                     F64: tl.constexpr):
    """The update of elements lo:hi (`solver_step`'s formula, in fp32, its terms in the same order)

        m = cond  or  uncond + guidance·(cond − uncond);   d = k_x·x_in + k_m·m   (save ← d)
        new = c_x·x_in + c_d·d + c_0·older_0 + c_1·older_1

    written to `new` (and d to `save`), then (mean, M2) of what was written: the first pass sums the stored
    values, the second reads them back (each thread sees the block's stores after the barrier)."""
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(lo, hi, BLOCK):
        i = s + lanes
        mask = i < hi
        xv = tl.load(x_in + i, mask=mask).to(tl.float32)
        m = tl.load(cond + i, mask=mask).to(tl.float32)
        if GUIDED:
            u = tl.load(uncond + i, mask=mask).to(tl.float32)
            m = u + guidance * (m - u)
        d = k_x * xv + k_m * m
        y = c_x * xv
        y += c_d * d
        if N_OLDER > 0:
            y += c_0 * tl.load(o0 + i, mask=mask).to(tl.float32)
        if N_OLDER > 1:
            y += c_1 * tl.load(o1 + i, mask=mask).to(tl.float32)
        y = y.to(new.dtype.element_ty)
        tl.store(new + i, y, mask=mask)
        if SAVE:
            tl.store(save + i, d.to(save.dtype.element_ty), mask=mask)
        total += tl.where(mask, _acc(y, F64), 0.0)
    mean = tl.sum(total, axis=0) / (hi - lo)
    tl.debug_barrier()
    return mean, _m2(new, lo, hi, mean, BLOCK, F64)


@triton.jit
def _gather(b, pick, table, dest, width, BW: tl.constexpr):
    """dest[b, :width] ← table[pick, :width] (both row-major, `width` elements a row)."""
    j = tl.arange(0, BW)
    tl.store(dest + b * width + j, tl.load(table + pick * width + j, mask=j < width), mask=j < width)


@triton.jit
def _finish(b, m2, N, promised, K, row, rsb, modulus, out, osb, t0, d0, w0, t1, d1, w1, t2, d2, w2,
            HAS_ROW: tl.constexpr, BK: tl.constexpr, GATHERS: tl.constexpr, BW: tl.constexpr):
    """Sample b's pick from its M2: the variance, the nearest candidate, the row arithmetic, the gathers."""
    var = (m2 / (N - 1)).to(tl.float64)
    var = tl.where(N < 2, float("nan"), var)
    inf = float("inf")
    best = tl.full([], inf, tl.float64)
    pick = tl.full([], 0, tl.int64)
    found = tl.full([], 0, tl.int1)
    cand = tl.arange(0, BK)
    for s in range(0, K, BK):
        j = s + cand
        p = tl.load(promised + j, mask=j < K, other=inf).to(tl.float64)
        dist = tl.abs(var - p)
        dist = tl.where(dist != dist, inf, dist)                   # NaN (a NaN variance or candidate): never nearer
        low = tl.min(dist, axis=0)
        first = tl.min(tl.where((dist == low) & (j < K), j, K), axis=0).to(tl.int64)
        better = low < best
        pick = tl.where(better, first, pick)
        best = tl.where(better, low, best)
        found = found | better
    pick = tl.where(found, pick, 0)                                # every distance +inf: the first candidate
    if HAS_ROW:
        r = tl.load(row + b * rsb) % modulus
        r = tl.where(r < 0, r + modulus, r)
        pick = r * K + pick
    tl.store(out + b * osb, pick)
    if GATHERS > 0:
        _gather(b, pick, t0, d0, w0, BW)
    if GATHERS > 1:
        _gather(b, pick, t1, d1, w1, BW)
    if GATHERS > 2:
        _gather(b, pick, t2, d2, w2, BW)


@triton.jit
def _sample_moments(x, b, xsb, lo, hi, x_in, cond, uncond, o0, o1, save, coefs, crs, conv, vrs, guidance,
                    UPDATE: tl.constexpr, N_OLDER: tl.constexpr, GUIDED: tl.constexpr, SAVE: tl.constexpr,
                    BLOCK: tl.constexpr, F64: tl.constexpr):
    """(mean, M2) of sample b's elements lo:hi of x; with UPDATE, of the update that writes them first (its
    coefficients: row b of `coefs` and `conv`, or their one row when the row stride is 0)."""
    base = b * xsb
    if UPDATE:
        c = coefs + b * crs
        k = conv + b * vrs
        c_0 = 0.0
        c_1 = 0.0
        if N_OLDER > 0:
            c_0 = tl.load(c + 2).to(tl.float32)
        if N_OLDER > 1:
            c_1 = tl.load(c + 3).to(tl.float32)
        if GUIDED:                                  # the pointers of unused terms are None
            uncond += base
        if N_OLDER > 0:
            o0 += base
        if N_OLDER > 1:
            o1 += base
        if SAVE:
            save += base
        return _stepped_moments(x + base, x_in + base, cond + base, uncond, o0, o1, save, lo, hi,
                                tl.load(c).to(tl.float32), tl.load(c + 1).to(tl.float32), c_0, c_1,
                                tl.load(k).to(tl.float32), tl.load(k + 1).to(tl.float32), guidance,
                                N_OLDER, GUIDED, SAVE, BLOCK, F64)
    else:
        return _moments(x + base, lo, hi, BLOCK, F64)


@triton.jit(do_not_specialize=["xsb", "N", "S", "chunk", "K", "rsb", "modulus", "osb", "w0", "w1", "w2", "crs",
                               "vrs"])
def _pick_kernel(x, xsb, N, S, chunk, stats, counts, promised, K, row, rsb, modulus, out, osb,
                 t0, d0, w0, t1, d1, w1, t2, d2, w2,
                 x_in, cond, uncond, o0, o1, save, coefs, crs, conv, vrs, guidance,
                 CHUNKED: tl.constexpr, HAS_ROW: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr,
                 BS: tl.constexpr, GATHERS: tl.constexpr, BW: tl.constexpr, F64: tl.constexpr,
                 UPDATE: tl.constexpr, N_OLDER: tl.constexpr, GUIDED: tl.constexpr, SAVE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if CHUNKED:
        b, c = pid // S, pid % S
        lo = c * chunk
        hi = tl.minimum(lo + chunk, N)
        mean, m2 = _sample_moments(x, b, xsb, lo, hi, x_in, cond, uncond, o0, o1, save, coefs, crs, conv, vrs,
                                   guidance, UPDATE, N_OLDER, GUIDED, SAVE, BLOCK, F64)
        mine = stats + pid * 3
        tl.store(mine, (hi - lo).to(mine.dtype.element_ty))
        tl.store(mine + 1, mean)
        tl.store(mine + 2, m2)
        tl.debug_barrier()                                         # every lane's stores before the count
        if tl.atomic_add(counts + b, 1, sem="acq_rel", scope="gpu") == S - 1:
            tl.store(counts + b, 0)                                # the last chunk: ready for the next launch
            lanes = tl.arange(0, BS)                               # merge the S chunks' (count, mean, M2)
            total = tl.zeros([BS], dtype=tl.float64 if F64 else tl.float32)
            for s in range(0, S, BS):
                q = s + lanes
                base = stats + (b * S + q) * 3
                total += (tl.load(base, mask=q < S, other=0.0, cache_modifier=".cg")
                          * tl.load(base + 1, mask=q < S, other=0.0, cache_modifier=".cg"))
            mean = tl.sum(total, axis=0) / N
            acc = tl.zeros([BS], dtype=tl.float64 if F64 else tl.float32)
            for s in range(0, S, BS):
                q = s + lanes
                base = stats + (b * S + q) * 3
                d = tl.load(base + 1, mask=q < S, other=0.0, cache_modifier=".cg") - mean
                acc += (tl.load(base + 2, mask=q < S, other=0.0, cache_modifier=".cg")
                        + tl.load(base, mask=q < S, other=0.0, cache_modifier=".cg") * d * d)
            _finish(b, tl.sum(acc, axis=0), N, promised, K, row, rsb, modulus, out, osb,
                    t0, d0, w0, t1, d1, w1, t2, d2, w2, HAS_ROW, BK, GATHERS, BW)
    else:
        mean, m2 = _sample_moments(x, pid, xsb, 0, N, x_in, cond, uncond, o0, o1, save, coefs, crs, conv, vrs,
                                   guidance, UPDATE, N_OLDER, GUIDED, SAVE, BLOCK, F64)
        _finish(pid, m2, N, promised, K, row, rsb, modulus, out, osb,
                t0, d0, w0, t1, d1, w1, t2, d2, w2, HAS_ROW, BK, GATHERS, BW)


_PICK = Kernel(_pick_kernel)


class Scratch(NamedTuple):
    """A chunked launch's scratch: each sample's S chunk statistics (count, mean, M2) in the variance's
    accumulation dtype, and each sample's int32 counter of chunks done (zero between launches)."""

    stats: torch.Tensor
    counts: torch.Tensor


def chunks(B: int, N: int, device: torch.device) -> int:
    """How many chunks each sample's variance is split into: enough for B·S programs to fill the device, each
    with at least _MIN_CHUNK elements (1: no split, one program per sample)."""
    return max(1, min(cdiv(target_programs(device), max(B, 1)), N // _MIN_CHUNK))


def _split(x: torch.Tensor, splits: int | None) -> tuple[int, int, int]:
    """(N, S, chunk): the elements per sample, the chunks each is split into (no empty one) and their size."""
    B = x.shape[0]
    N = x.numel() // B
    S = chunks(B, N, x.device) if splits is None else max(1, min(splits, N))
    if S == 1:
        return N, 1, N
    chunk = cdiv(N, S)
    return N, cdiv(N, chunk), chunk


def make_scratch(x: torch.Tensor, splits: int | None = None) -> Scratch | None:
    """The chunked launch's scratch for x's shape, dtype and device (None: one program per sample, no scratch),
    for a caller that launches many times on one layout and passes it as `scratch`."""
    if x.shape[0] == 0:
        return None
    _, S, _ = _split(x, splits)
    if S == 1:
        return None
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return Scratch(torch.empty(x.shape[0] * S * 3, dtype=dtype, device=x.device),
                   torch.zeros(x.shape[0], dtype=torch.int32, device=x.device))


_KEPT: BoundedCache = BoundedCache(16)


def _kept_scratch(x: torch.Tensor, splits: int | None, S: int) -> Scratch | None:
    """A chunked launch's scratch for a caller that keeps none: one per device, current stream, batch, chunk count
    and dtype, reused by the launches that stream orders one after another (each leaves its counters at zero);
    a fresh one while a CUDA graph is being captured, so that each graph owns its own."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return make_scratch(x, splits)
    stream = _backend.cuda_stream(x.device.index) if x.is_cuda else None
    key = (x.device, stream, x.shape[0], S, x.dtype == torch.float64)
    kept = _KEPT.get(key)
    return kept if kept is not None else _KEPT.put(key, make_scratch(x, splits))


class Update(NamedTuple):
    """The solver step whose result is the pick's x, made in the pick's launch (`_stepped_moments`): its input
    x_in, the model output cond (and uncond, mixed with `guidance`), up to MAX_OLDER older predictions, save (d's
    destination, or None), the coefficient rows `coefs` ([B, n] per sample, or [n] for all; n = 2 + older: x, d,
    the older ones) and `conv` ([B, 2] or [2]: d = conv₀·x_in + conv₁·m). Every tensor of x's shape shares x's
    dtype and strides; the rows are contiguous, float32 or float64. Computed in float32 whatever x's dtype, as
    solver_step's Triton kernel."""

    x_in: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance: float
    older: tuple[torch.Tensor, ...]
    save: torch.Tensor | None
    coefs: torch.Tensor
    conv: torch.Tensor


MAX_OLDER = 2
_UPDATE_AT = _pick_kernel.arg_names.index("x_in")    # then cond and uncond: what a prepared update call changes


def _launch(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int, out: torch.Tensor,
            splits: int | None, scratch: Scratch | None, gathers: Sequence[tuple[torch.Tensor, torch.Tensor]],
            update: Update | None = None):
    """The pick kernel's (grid, arguments, key, constexprs) for `time_shift_pick`'s arguments (B > 0)."""
    if len(gathers) > MAX_GATHERS:
        raise ValueError(f"time_shift_pick: {len(gathers)} gathers; the kernel takes at most {MAX_GATHERS}")
    B = x.shape[0]
    N, S, chunk = _split(x, splits)
    if S > 1 and scratch is None:
        scratch = _kept_scratch(x, splits, S)
    stats, counts = scratch if S > 1 and scratch is not None else (None, None)   # None: a pointer never read
    has_row = row is not None
    tables: list = []
    widths = [0]
    for t, d in gathers:
        widths.append(t[0].numel())
        tables += [t, d, widths[-1]]
    tables += [None, None, 0] * (MAX_GATHERS - len(gathers))
    width = 1 << (max(widths) - 1).bit_length() if max(widths) > 1 else 1     # the next power of two
    key = (S > 1, has_row, len(gathers), width, x.dtype, None if stats is None else stats.dtype, promised.dtype,
           out.dtype, *(t.dtype for t, _ in gathers))
    args = [x, x.stride(0), N, S, chunk, stats, counts, promised, promised.numel(), row,
            row.stride(0) if has_row else 0, modulus, out, out.stride(0), *tables]
    if update is None:
        args += [None] * 7 + [0, None, 0, 1.0]
        step: tuple = (False, 0, False, False)
    else:
        u = update
        if len(u.older) > MAX_OLDER:
            raise ValueError(f"time_shift_pick: an update with {len(u.older)} older predictions; the kernel takes at "
                             f"most {MAX_OLDER}")
        args += [u.x_in, u.cond, u.uncond, *u.older, *[None] * (MAX_OLDER - len(u.older)), u.save,
                 u.coefs, u.coefs.stride(0) if u.coefs.dim() == 2 else 0,
                 u.conv, u.conv.stride(0) if u.conv.dim() == 2 else 0, float(u.guidance)]
        step = (True, len(u.older), u.uncond is not None, u.save is not None)
        key += (u.coefs.dtype, u.conv.dtype, None if u.save is None else u.save.dtype)
    key += step
    return ((B * S,), args, key, dict(CHUNKED=S > 1, HAS_ROW=has_row, BLOCK=_BLOCK, BK=_BK, BS=_BS,
                                      GATHERS=len(gathers), BW=width, F64=x.dtype == torch.float64,
                                      UPDATE=step[0], N_OLDER=step[1], GUIDED=step[2], SAVE=step[3]))


def time_shift_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int,
                    out: torch.Tensor, splits: int | None = None, scratch: Scratch | None = None,
                    gathers: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), update: Update | None = None) -> None:
    """out [B] (int64) ← the pick of the module docstring for x [B, ...] (each sample one dense block of N
    elements at x.stride(0) apart), promised [K] (contiguous, float32 or float64), row [B] (int64) or None.
    `splits`: the chunks per sample (default `chunks`); `scratch`: `make_scratch(x, splits)` kept by the caller,
    else one kept here per stream (`_kept_scratch`). `gathers`: up to three (table [R, w] or [R], dest [B, w] or
    [B]) pairs, both contiguous, of one dtype, with R covering every pick (modulus·K rows with a row, K without):
    dest[b] ← table[out[b]]. `update`: the solver step that writes x, made first in the same launch (`Update`)."""
    if x.shape[0] == 0:
        return
    if splits is None and scratch is None and not gathers and update is None and x.is_cuda and not _INTERPRET:
        _plain_pick(x, promised, row, modulus, out)
        return
    _PICK(*_launch(x, promised, row, modulus, out, splits, scratch, gathers, update), num_warps=_NUM_WARPS)


_PREPARED: BoundedCache = BoundedCache(32)
_PLAIN_VARYING = tuple(_pick_kernel.arg_names.index(n) for n in ("x", "promised", "row", "out"))


def _plain_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int,
                out: torch.Tensor) -> None:
    """The public op's launch (CUDA; no splits, scratch, gathers or update), prepared once per layout and kept:
    keyed on x's shape, strides, dtype and device, K and promised's dtype, row's and out's strides, the modulus
    and the current stream (a chunked launch's kept scratch is per stream), so that a call packs four pointers
    and launches. A chunked launch while a CUDA graph is being captured takes `_launch` (the graph gets its own
    scratch)."""
    device = x.get_device()
    key = (x.shape, x.stride(), x.dtype, device, promised.shape[0], promised.dtype,
           None if row is None else row.stride(0), modulus, out.stride(0), _backend.cuda_stream(device))
    kept = _PREPARED.get(key)
    if kept is None or kept[1]:
        if torch.cuda.is_current_stream_capturing():
            _PICK(*_launch(x, promised, row, modulus, out, None, None, ()), num_warps=_NUM_WARPS)
            return
        if kept is None:
            grid, args, launch_key, constexprs = _launch(x, promised, row, modulus, out, None, None, ())
            varying = tuple(i for i in _PLAIN_VARYING if args[i] is not None)  # row: None without one
            kept = _PREPARED.put(key, (_PICK.prepare(grid, args, launch_key, constexprs, num_warps=_NUM_WARPS,
                                                     varying=varying), constexprs["CHUNKED"]))
    if row is None:
        kept[0](x, promised, out)
    else:
        kept[0](x, promised, row, out)


def prepare(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int, out: torch.Tensor,
            scratch: Scratch | None, gathers: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
            update: Update | None = None) -> Prepared | None:
    """`time_shift_pick` on these arguments as a `Prepared` launch called with x alone (x: any tensor of the
    layout it will be called with; scratch: `make_scratch(x)`), or None for an empty batch. With `update`, a call
    passes x (the step's result), then the step's x_in, cond and (when guided) uncond."""
    if x.shape[0] == 0:
        return None
    varying = (0,) if update is None else (0, *range(_UPDATE_AT, _UPDATE_AT + 2 + (update.uncond is not None)))
    return _PICK.prepare(*_launch(x, promised, row, modulus, out, None, scratch, gathers, update),
                         num_warps=_NUM_WARPS, varying=varying)
