"""The benchmark harness every op file shares: cases, timing, ceilings, host cost, tables and result files.

An op file (`bench/<op>.py`) declares `cases(device, quick)`, the Cases to time, and `footer(results)`, its
performance targets read off the measured rows. A Case draws fresh input sets, names the bytes (or flops) one
call must move, and lists implementations: every backend of the pydpm op (forced with `use_backend`) and the
peers (eager PyTorch, torch.compile, other libraries). The harness times them side by side on the same tensors
and reports each row against the card's measured ceilings and the best peer of the same case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from pydpm import _backend
from pydpm.ops import use_backend

from .progress import Progress

Inputs = dict[str, torch.Tensor]
QUANTILES = [0.5, 0.2, 0.8]
MIN_REPS, MAX_REPS = 5, 10_000
MAX_INPUT_SETS = 64
# Loose agreement with the float64 oracle (max error over max |expected|): catches a wrong formula or a
# misconfigured peer, not rounding.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def _no_reasons(inputs: Inputs) -> list[str]:
    return []


@dataclasses.dataclass
class Impl:
    """One implementation of a case.

    `make()` builds the callable: imports, setup and compilation happen there (or on its first call), so a
    peer that is missing or fails is listed as missing instead of stopping the run. The callable takes one
    input set and returns the output (or a tuple whose first element is the output).
    """

    name: str
    make: Callable[[], Callable[[Inputs], Any]]
    ours: bool = False
    check: bool = True  # compare the first output with the oracle (False: another method, or its own noise)
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around everything, not per call
    reasons: Callable[[Inputs], list[str]] = _no_reasons  # why it cannot run this case (empty: it can)
    needs_cuda: bool = False  # runs on CUDA devices only (a peer: listed once among the missing peers elsewhere)
    # called before each round of its eager loop, which alternates with the other implementations' (models: put
    # this implementation's processors back on the model they share)
    select: Callable[[], None] = lambda: None


@dataclasses.dataclass
class Case:
    op: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    inputs: Callable[[], Inputs]  # draws one fresh input set (random, never zeros)
    oracle: Callable[[Inputs], torch.Tensor]  # the expected output of an input set, in float64
    impls: list[Impl]
    nbytes: int = 0  # bytes one call must read and write (bandwidth-bound cases) ...
    flops: int = 0  # ... or the flops of one call (compute-bound cases)
    tolerance: float | None = None  # the check's relative tolerance, when the dtype's default does not fit
    peak_memory: bool = False  # CUDA: record each implementation's peak device memory (Row.peak_mib)

    @property
    def label(self) -> str:
        return f"{self.name} {shape_str(self.shape)} {dtype_str(self.dtype)}"


@dataclasses.dataclass
class Row:
    op: str
    case: str
    shape: str
    dtype: str
    impl: str
    ours: bool
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    throughput: float | None = None  # in `unit`, from the bytes (or flops) the case declares
    unit: str = "GB/s"
    of_ceiling: float | None = None  # throughput / the measured ceiling (copy bandwidth or matmul peak)
    vs_best_peer: float | None = None  # best peer median / this median: device time (> 1: faster than every peer)
    host_us: float | None = None  # back-to-back calls, no sync: host cost per call
    host_device_us: float | None = None  # a sync after every call: host + device per call
    loop_us: float | None = None  # back-to-back calls, one sync at the end: per call as a model sees it
    vs_best_peer_eager: float | None = None  # best peer loop_us / this loop_us: what users pay (the headline)
    note: str = ""  # FAILED, MISMATCH (ours) or WARNING (a peer): a row the targets leave out
    ceiling_note: str = ""  # why of_ceiling is above 1
    error: float | None = None  # the first output's max error over max |expected| against the float64 oracle
    peak_mib: float | None = None  # device memory reserved at the peak of the timed calls (Case.peak_memory)

    @property
    def notes(self) -> str:
        """The note column: the note and the ceiling note."""
        return "; ".join(filter(None, (self.note, self.ceiling_note)))


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup_ms: float
    rep_ms: float
    host_calls: int  # calls per host-cost loop


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    matmul_tflops: float
    copy_what: str
    matmul_what: str


NEEDS_CUDA = "needs CUDA"
# import name -> the distribution to pip install, where they differ
PIP_NAMES = {"pywt": "PyWavelets", "focal_frequency_loss": "focal-frequency-loss"}


class NeedsCUDA(Exception):
    """Raised by an op file's cases() when the whole family needs a CUDA device."""


def not_installed(exc: BaseException) -> str | None:
    """The distribution to `pip install` when `exc` is the import of a missing module outside pydpm, else None."""
    top = exc.name.split(".")[0] if isinstance(exc, ModuleNotFoundError) and exc.name else "pydpm"
    return None if top == "pydpm" else PIP_NAMES.get(top, top)


@dataclasses.dataclass
class Missing:
    """A peer, a package or an op family that could not run: why, the implementations it took out, and the
    cases a peer raised on (none for a peer missing altogether)."""

    reasons: set[str] = dataclasses.field(default_factory=set)
    impls: set[str] = dataclasses.field(default_factory=set)
    failed_cases: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Warned:
    """A warning raised while the cases ran, and the cases that raised it."""

    cases: list[str]


@dataclasses.dataclass
class Report:
    """What one run found besides the rows: peers that could not run, implementations skipped for a case,
    warnings raised while the cases ran, failures of ours."""

    missing: dict[str, Missing] = dataclasses.field(default_factory=dict)
    skipped: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    warnings: dict[str, Warned] = dataclasses.field(default_factory=dict)
    failed: bool = False

    def skip(self, impl: str, reason: str) -> None:
        self.skipped.setdefault(impl, set()).add(reason)

    def miss(self, name: str, reason: str, impl: str, failed_case: str | None = None) -> None:
        """`name` (a peer, or the package or family it needs) could not run `impl` for `reason`."""
        entry = self.missing.setdefault(name, Missing())
        entry.reasons.add(reason)
        entry.impls.add(impl)
        if failed_case is not None and failed_case not in entry.failed_cases:
            entry.failed_cases.append(failed_case)

    def cuda_only(self, impl: Impl) -> None:
        """`impl` needs CUDA and the case is elsewhere: ours is skipped, a peer listed once among the missing."""
        if impl.ours:
            self.skip(impl.name, NEEDS_CUDA)
        else:
            self.miss(impl.name, NEEDS_CUDA, impl.name)

    def missing_package(self, what: str, exc: BaseException) -> bool:
        """True, and `what` recorded under the package, when `exc` is the import of a package not installed."""
        package = not_installed(exc)
        if package is not None:
            self.miss(package, f"not installed: pip install {package}", what)
        return package is not None

    def warn(self, text: str, case: str) -> None:
        cases = self.warnings.setdefault(text, Warned([])).cases
        if case not in cases:
            cases.append(case)


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def dtype_str(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


# --------------------------------------------------------------------------------------------------
# Implementations of pydpm ops
# --------------------------------------------------------------------------------------------------

def op_targets(results: list[tuple[Case, list[Row]]], family: str, ours: str, eager: str, compiled: str,
               bandwidth: float, speedup: float) -> list[str]:
    """The block-op targets, each read off `ours`'s rows (the worst case, and every case's value): >= `bandwidth`
    of the measured copy bandwidth, >= `speedup` x `eager` and >= `compiled` in device time, host cost per
    call <= `eager`'s."""
    ours_timed = any(r.impl == ours and r.median_ms and not r.note for _, rows in results for r in rows)

    def target(what: str, value: Callable[[Row, dict[str, Row]], float | None], fmt: str, goal: float,
               peer: str = "") -> str:
        found = []
        for case, rows in results:
            timed_rows = {r.impl: r for r in rows if r.median_ms and not r.note}
            mine = timed_rows.get(ours)
            v = value(mine, timed_rows) if mine is not None else None
            if v is not None:
                found.append((v, f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)}"))
        if not found:
            why = f"no timed {peer} row" if ours_timed else f"no timed {ours} row: it runs on CUDA only"
            return f"{what}: not measured in this run ({why})"
        worst = min(found)
        detail = ", ".join(f"{where} {fmt.format(v)}" for v, where in found)
        return (f"{what}: worst {fmt.format(worst[0])} at {worst[1]} ({'met' if worst[0] >= goal else 'NOT met'}; "
                f"{detail})")

    def vs(peer: str, field: str) -> Callable[[Row, dict[str, Row]], float | None]:
        def ratio(mine: Row, rows: dict[str, Row]) -> float | None:
            theirs = rows.get(peer)
            a, b = getattr(theirs, field, None), getattr(mine, field)
            return a / b if a and b else None
        return ratio

    return [
        target(f"{family} {ours} >= {bandwidth:.0%} of copy bandwidth", lambda mine, rows: mine.of_ceiling,
               "{:.1%}", bandwidth),
        target(f"{family} {ours} >= {speedup:.0f}x eager (device time)", vs(eager, "median_ms"), "{:.2f}x",
               speedup, eager),
        target(f"{family} {ours} >= torch.compile(eager)'s kernels (device time)", vs(compiled, "median_ms"),
               "{:.2f}x", 1.0, compiled),
        target(f"{family} {ours} host cost per call <= eager's (host us, eager's over ours)", vs(eager, "host_us"),
               "{:.2f}x", 1.0, eager),
    ]


def backend_impls(op, check: Callable[[Inputs], Any], call: Callable[[Inputs], Any], auto: bool = False
                  ) -> list[Impl]:
    """One Impl per backend of the pydpm op `op`, forced with `use_backend`, and with `auto` first the
    automatic choice (`pydpm[auto]`), for ops whose dispatch picks among kernels by a measured table.

    `check(inputs)` gives the checked call `op` dispatches on, `call(inputs)` runs the public op. A backend
    is skipped with `op.not_supported_reasons`; Triton also while TRITON_INTERPRET=1 (far too slow to time).
    Backends that wrap a torch kernel (`Backend.autograd`) get no row of their own: that kernel is a peer's.
    """
    def reasons(name: str, inputs: Inputs) -> list[str]:
        if name == "triton" and _backend.triton_interpreting():
            return ["TRITON_INTERPRET=1 runs Triton kernels in the interpreter, far too slowly to benchmark"]
        return op.not_supported_reasons(check(inputs))[name]

    impls = [Impl("pydpm[auto]", make=lambda: call, ours=True)] if auto else []
    return impls + [Impl(f"pydpm[{b.name}]", make=lambda: call, ours=True,
                         context=functools.partial(use_backend, b.name), reasons=functools.partial(reasons, b.name))
                    for b in op.backends if not b.autograd]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def timing_for(device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return Timing(5, 20, 200) if quick else Timing(25, 100, 1000)
    return Timing(5, 30, 50) if quick else Timing(10, 100, 200)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CPU ops are synchronous: nothing to wait for)."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device: torch.device) -> float:
    """Calibrates torch.cuda._sleep, the blocking kernel that holds the timed launches back."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    begin.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / begin.elapsed_time(end)


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the last-level cache. CUDA zeroes it before a timed call; the CPU reads it (a sum), which evicts
    what the previous call left cached without leaving dirty lines for the timed call to write back."""
    if device.type == "cuda":
        return torch.empty(2 * cache_bytes(device), dtype=torch.uint8, device=device)
    return torch.ones(2 * cache_bytes(device) // 4, device=device)


TIMER = {
    "cuda": "CUDA events around each call: device time, L2 flushed and the launches queued behind a blocking "
            "kernel (the host's share is the host-us column)",
    "cpu": "time.perf_counter around each call, caches flushed before it",
}


def measure(fn: Callable[[], Any], device: torch.device, timing: Timing) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) in ms of one call of `fn`, after a warm-up.

    On CUDA this is device time: before each call the L2 is flushed and a blocking kernel (torch.cuda._sleep,
    longer than issuing a call takes) is queued, so every launch of the call is queued before its start event
    fires (nvbench's method). triton.testing.do_bench instead times the host whenever issuing a call outlasts
    its L2 flush, which on an H200 flips torch.compile or diffusers between host and device time from one
    shape to the next. On the CPU: the host clock, the caches flushed before each call, as the L2 on CUDA: the
    allocator hands a call that allocates its output the block the previous call freed, which a CPU's cache
    (tens of MiB) still holds, so such a call would write to the cache instead of memory.
    """
    sync = synchronizer(device)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        fn()
        sync()
    estimate_ms = max((time.perf_counter() - start) * 1e3 / 5, 1e-3)
    for _ in range(max(1, int(timing.warmup_ms / estimate_ms))):
        fn()
    flush = _flush_buffer(device)
    if device.type == "cuda":
        reps = min(max(MIN_REPS, int(timing.rep_ms / estimate_ms)), MAX_REPS)
        block = int((1.5 * estimate_ms + 0.05) * _sleep_cycles_per_ms(device))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            flush.zero_()
            torch.cuda._sleep(block)
            begin.record()
            fn()
            end.record()
        sync()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        start = time.perf_counter()
        flush.sum()
        flush_ms = (time.perf_counter() - start) * 1e3
        reps = min(max(MIN_REPS, int(timing.rep_ms / (estimate_ms + flush_ms))), MAX_REPS)
        times = []
        for _ in range(reps):
            flush.sum()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


def synced_call_us(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Host + device µs of one call: the median of `calls` calls, each followed by a sync."""
    sync = synchronizer(device)
    fn()
    sync()
    per_call = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        per_call.append(time.perf_counter() - start)
    return statistics.median(per_call) * 1e6


def eager_loops(entries: list[tuple[Impl, Row, Callable[[], Any], int]], device: torch.device,
                rounds: int = 5) -> None:
    """Fill each row's host_us and loop_us from back-to-back calls: host_us times the calls with the host clock
    and no sync inside (on CUDA: the cost of issuing them), loop_us up to the end of their work (one sync at the
    end: what a model or a sampling loop pays per call, the larger of host and device). The implementations
    take turns, `rounds` rounds of calls / rounds calls each (`calls` per entry), and each figure is the median
    of its rounds: a host that slows down or stalls for a while (the models' cases are host-bound) moves
    every implementation alike instead of whichever ran then."""
    sync = synchronizer(device)
    hosts: dict[int, list[float]] = {id(row): [] for _, row, _, _ in entries}
    loops: dict[int, list[float]] = {id(row): [] for _, row, _, _ in entries}
    for _ in range(rounds):
        for impl, row, fn, calls in entries:
            per_round = max(1, calls // rounds)
            with impl.context():
                impl.select()
                fn()
                sync()
                start = time.perf_counter()
                for _ in range(per_round):
                    fn()
                hosts[id(row)].append((time.perf_counter() - start) / per_round)
                sync()
                loops[id(row)].append((time.perf_counter() - start) / per_round)
    for _, row, _, _ in entries:
        row.host_us = statistics.median(hosts[id(row)]) * 1e6
        row.loop_us = statistics.median(loops[id(row)]) * 1e6


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the timed data must not sit in: the GPU's L2, or the CPU's largest cache."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 << 20)


def input_sets(case: Case) -> list[Inputs]:
    """Fresh input sets to rotate through: one when a set outgrows the cache, else enough that together
    they fill it three times over (at most MAX_INPUT_SETS), so a call does not find its data cached."""
    first = case.inputs()
    working_set = sum(t.nbytes for t in first.values())
    cache = cache_bytes(case.device)
    count = 1 if working_set >= cache else min(MAX_INPUT_SETS, math.ceil(3 * cache / working_set))
    return [first] + [case.inputs() for _ in range(count - 1)]


def measure_ceilings(device: torch.device, timing: Timing) -> Ceilings:
    """Device copy bandwidth (bytes read + written by dst.copy_(src)) and matmul peak, each from the 20th
    percentile of its timings: what the device does when nothing else gets in the way (for large
    bandwidth-bound calls on an H200 it differs from the median by 0.1-0.5%; on a shared CPU host by far more).

    CUDA: a 1 GiB copy and a bf16 8192^3 matmul. CPU: buffers of twice the last-level cache, and a float32
    256^3 matmul, whose operands fit in the L2 like the small cases' matmuls (a 1024^3 one ran ~25% below that
    peak); each the best of all threads and one thread, three times over: on a busy host a parallel call waits
    for its worker threads to be scheduled, for seconds at a time, so one thread can beat all of them, and the
    cases' small calls, which run on one thread, would then exceed a ceiling measured on all threads.
    """
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    src = torch.randn((1 << 28) if cuda else 2 * cache_bytes(device) // 4, device=device)
    dst = torch.empty_like(src)
    m, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    copies, matmuls = [], []
    try:
        for n in [threads] if cuda else sorted({threads, 1}, reverse=True) * 3:
            torch.set_num_threads(n)
            copies.append((2 * src.nbytes / measure(lambda: dst.copy_(src), device, timing)[1] / 1e6, n))
            matmuls.append((2 * m ** 3 / measure(lambda: torch.mm(a, b, out=c), device, timing)[1] / 1e9, n))
    finally:
        torch.set_num_threads(threads)
    (copy_gbps, copy_threads), (mm_tflops, mm_threads) = max(copies), max(matmuls)

    def on(n: int) -> str:
        return "" if cuda else f", {n} thread{'s' if n > 1 else ''}"

    return Ceilings(copy_gbps, mm_tflops, f"dst.copy_(src), {src.nbytes >> 20} MiB float32{on(copy_threads)}",
                    f"torch.mm {m}^3 {dtype_str(dtype)}{on(mm_threads)}")


# --------------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------------

def first_output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |y - expected| over max |expected| (the float64 oracle)."""
    return ((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tolerance: float | None = None) -> str:
    """'' when y matches the float64 oracle to `tolerance` (default CHECK_TOLERANCE), else what differs."""
    return mismatch(relative_error(y, expected), dtype, tolerance)


def mismatch(err: float, dtype: torch.dtype, tolerance: float | None = None) -> str:
    """'' when the relative error `err` is within `tolerance` (default CHECK_TOLERANCE), else what differs."""
    tol = CHECK_TOLERANCE[dtype] if tolerance is None else tolerance
    return "" if err <= tol else f"max error {err:.1e} of max |expected| > {tol:.0e} against the float64 oracle"


@contextlib.contextmanager
def peak_memory(case: Case, row: Row):
    """For a CUDA case with `peak_memory`: `row.peak_mib`, the device memory reserved at the peak of the calls
    inside, counted from what is live when they start (the cache emptied of blocks nothing holds first).
    Reserved, not allocated: a CUDA graph's replay allocates nothing, its memory is the private pool reserved
    when it was captured."""
    if not (case.peak_memory and case.device.type == "cuda"):
        yield
        return
    gc.collect()  # what the implementations before left in reference cycles (graphs, compiled code)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(case.device)
    yield
    row.peak_mib = torch.cuda.max_memory_reserved(case.device) / 2**20


def _error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def run_case(case: Case, ceilings: Ceilings, timing: Timing, report: Report,
             doing: Callable[[str], None] = lambda what: None) -> list[Row]:
    """Time every implementation of `case` on the same input sets; one Row each. `doing` is told the step at
    work (the progress line)."""
    torch.compiler.reset()  # compile afresh for every case: no recompile limit reached across shapes and dtypes
    doing("inputs and the float64 oracle")
    sets = input_sets(case)
    expected = case.oracle(sets[0])
    rows, timed = [], []
    for impl in case.impls:
        if impl.needs_cuda and case.device.type != "cuda":
            report.cuda_only(impl)
            continue
        reasons = impl.reasons(sets[0])
        if reasons:
            report.skip(impl.name, "; ".join(reasons))
            continue
        row = Row(case.op, case.name, shape_str(case.shape), dtype_str(case.dtype), impl.name, impl.ours,
                  unit="TFLOP/s" if case.flops else "GB/s")
        doing(impl.name)
        try:
            with impl.context():
                fn = impl.make()
                differs = ""
                if impl.check:
                    row.error = relative_error(first_output(fn(sets[0])), expected)
                    differs = mismatch(row.error, case.dtype, case.tolerance)
                rotation = itertools.cycle([functools.partial(fn, s) for s in sets])
                with peak_memory(case, row):
                    row.median_ms, row.p20_ms, row.p80_ms = measure(lambda: next(rotation)(), case.device, timing)
                calls = max(10, min(timing.host_calls, int(timing.rep_ms / row.median_ms)))
                row.host_device_us = synced_call_us(functools.partial(fn, sets[0]), case.device, calls)
                timed.append((impl, row, functools.partial(fn, sets[0]), calls))
        except Exception as exc:  # noqa: BLE001 - a failing implementation is reported, the run goes on
            if report.missing_package(impl.name, exc):
                continue
            if not impl.ours:
                report.miss(impl.name, _error(exc), impl.name, case.label)
                continue
            report.failed = True
            row.note = f"FAILED: {_error(exc)}"
        else:
            if differs:
                report.failed |= impl.ours
                row.note = f"{'MISMATCH' if impl.ours else 'WARNING'}: {differs}"
        rows.append(row)
    doing("eager loops, the implementations taking turns")
    eager_loops(timed, case.device)
    _rate(rows, case, ceilings)
    return rows


class _Capture(logging.Filter):
    """On a handler that writes to a stream (the terminal, not a file): takes WARNING and higher records into
    the report instead."""

    def __init__(self, report: Report, where: str):
        super().__init__()
        self.report, self.where = report, where

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.report.warn(f"{record.name}: {_first_line(record.getMessage())}", self.where)
        return False


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


@contextlib.contextmanager
def warnings_captured(report: Report, where: str):
    """Warnings raised inside go to `report` under `where`, not between the table's lines: those the warnings
    module's filters would show (by default each once per place it is raised from, deprecations hidden) and the
    WARNING records of loggers writing to the terminal (torch's inductor and dynamo messages)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    handlers = [h for logger in loggers for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    handlers += [logging.lastResort] if logging.lastResort is not None else []
    capture = _Capture(report, where)
    for handler in handlers:
        handler.addFilter(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(capture)
    for w in caught:
        source = re.sub(r".*/site-packages/", "", w.filename)
        report.warn(f"{w.category.__name__}: {_first_line(w.message)} ({source}:{w.lineno})", where)


def _rate(rows: list[Row], case: Case, ceilings: Ceilings) -> None:
    """Fill throughput, fraction of the ceiling and the ratios to the best peer (eager wall time, device time)."""
    peers = [r.median_ms for r in rows if not r.ours and r.median_ms]
    best_peer = min(peers, default=None)
    best_eager = min((r.loop_us for r in rows if not r.ours and r.loop_us), default=None)
    for r in rows:
        if r.loop_us and best_eager:
            r.vs_best_peer_eager = best_eager / r.loop_us
        if not r.median_ms:
            continue
        if case.flops:
            r.throughput = case.flops / r.median_ms / 1e9
            r.of_ceiling = r.throughput / ceilings.matmul_tflops
        else:
            r.throughput = case.nbytes / r.median_ms / 1e6
            r.of_ceiling = r.throughput / ceilings.copy_gbps
        r.vs_best_peer = best_peer / r.median_ms if best_peer else None
        if r.of_ceiling > 1:
            r.ceiling_note = ABOVE_CEILING["flops" if case.flops else "bytes"]


# --------------------------------------------------------------------------------------------------
# Environment and output
# --------------------------------------------------------------------------------------------------

def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _pydpm_version() -> str:
    version = _version("pydpm-kernels")
    if version == "missing":
        import pydpm

        version = f"{getattr(pydpm, '__version__', 'unknown')} (source tree)"
    return version


def _git(where: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
    except OSError as exc:  # no git here
        return subprocess.CompletedProcess(args, 127, "", str(exc))


def _toplevel(where: Path) -> Path | None:
    done = _git(where, "rev-parse", "--show-toplevel")
    return Path(done.stdout.strip()) if done.returncode == 0 else None


def _head(top: Path) -> str:
    """`top`'s HEAD, short, with '-dirty' when tracked files differ from it."""
    done = _git(top, "rev-parse", "--short", "HEAD")
    if done.returncode != 0:
        return f"unknown ({_first_line(done.stderr)})"
    dirty = _git(top, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def source_commit() -> tuple[str, str]:
    """(the commit benchmarked, where it was read). PYDPM_BENCH_COMMIT first (a copy of the working tree sent to
    another machine may carry a stale .git); then the git checkout this file runs from (an editable install or
    `python -m bench` in a clone); then, when pydpm is an installed copy (site-packages, which is no checkout),
    the pydpm clone in the working directory, which that copy may or may not have been built from."""
    if os.environ.get("PYDPM_BENCH_COMMIT"):
        return os.environ["PYDPM_BENCH_COMMIT"], "PYDPM_BENCH_COMMIT"
    here = Path(__file__).resolve()
    top = _toplevel(here.parent)
    if top is not None and (top / "bench" / "harness.py").resolve() == here:
        return _head(top), f"the checkout pydpm.bench runs from, {top}"
    top = _toplevel(Path.cwd())
    if top is not None and (top / "bench" / "harness.py").is_file():
        return _head(top), (f"the pydpm clone in the working directory, {top}; pydpm.bench was imported from "
                            f"{here.parent}, an installed copy")
    return "unknown", (f"pydpm.bench was imported from {here.parent}, not a git checkout, and the working "
                       f"directory is no pydpm clone; set PYDPM_BENCH_COMMIT")


def _load_average() -> str:
    """The 1, 5 and 15 minute load averages, and a word when other work keeps half the CPUs busy."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    load, cpus = os.getloadavg(), os.cpu_count() or 1
    busy = ": a busy host, timings of host-bound and CPU cases are noisy" if load[0] >= cpus / 2 else ""
    return " ".join(f"{v:.2f}" for v in load) + f" on {cpus} CPUs{busy}"


def environment(device: torch.device, now: datetime.datetime) -> dict[str, str]:
    commit, commit_source = source_commit()
    return {
        "card": card_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "pydpm": _pydpm_version(),
        "git": commit,
        "git_from": commit_source,
        "date_utc": now.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "load_average": _load_average(),
        "timer": TIMER[device.type],
    }


COLUMNS = (  # (title, width, Row -> cell)
    ("case", 9, lambda r: r.case),
    ("shape", 16, lambda r: r.shape),
    ("dtype", 5, lambda r: r.dtype),
    ("impl", 24, lambda r: r.impl),
    ("eager us", 9, lambda r: _num(r.loop_us, ".1f")),
    ("vs peer", 8, lambda r: _num(r.vs_best_peer_eager, ".2f", "x")),
    ("device us", 10, lambda r: _num(r.median_ms and 1e3 * r.median_ms, ".1f")),
    ("dev vs peer", 11, lambda r: _num(r.vs_best_peer, ".2f", "x")),
    ("rate", 14, lambda r: f"{_num(r.throughput, '.1f')} {r.unit}" if r.throughput else "-"),
    ("%ceil", 6, lambda r: _num(r.of_ceiling and 100 * r.of_ceiling, ".1f")),
    ("host us", 8, lambda r: _num(r.host_us, ".1f")),
)
# Every column, and the note printed under a row (the last column of results.md). What users pay comes
# first: eager us and its ratio to the best peer.
LEGEND = {
    "case": "the operation timed (+bwd: forward and backward; x77: attention over 77 keys)",
    "shape": "the case's input shape",
    "dtype": "the tensors' element type",
    "impl": "pydpm[cuda], pydpm[triton], ...: the pydpm op forced onto that backend; pydpm[auto]: its own "
            "dispatch; other pydpm rows: pydpm's samplers, modules and integrations; every other row is a peer "
            "(eager PyTorch, torch.compile, another library)",
    "eager us": "wall time per call of back-to-back calls with one synchronisation at the end, host and device "
                "together: what a model or a sampling loop pays per call",
    "vs peer": "the best peer's eager us over this row's (> 1: faster than every peer)",
    "device us": "median time of one call: on CUDA device time (CUDA events, L2 flushed, launches queued "
                 "ahead), on the CPU the host clock (caches flushed)",
    "dev vs peer": "the best peer's device us over this row's",
    "rate": "the bytes (GB/s) or flops (TFLOP/s) the case counts for one call, over device us",
    "%ceil": "rate as a percentage of the measured ceiling above the table (copy bandwidth or matmul peak); "
             "above 100 only with a note saying why",
    "host us": "the host's cost of issuing one call (back-to-back calls, no synchronisation)",
    "note": "FAILED or MISMATCH: a pydpm row that raised or disagreed with the float64 oracle (the run exits "
            "1); WARNING: a peer that disagreed; why %ceil is above 100. '-': not measured",
}
ABOVE_CEILING = {
    "bytes": "above the copy ceiling: less went through memory than the bytes counted (data that stayed in a "
             "cache, or on a CPU a call that reads more than it writes: a copy also reads every line it writes), "
             "or the ceiling was measured low on a busy host",
    "flops": "above the matmul ceiling: this call's matmuls ran faster than the ceiling's torch.mm (shapes that "
             "suit the hardware better, or a ceiling measured low on a busy host)",
}


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _fixed_width(cells: list[str]) -> str:
    """Text columns left-aligned, numbers right-aligned."""
    return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))


def legend_lines() -> list[str]:
    width = max(map(len, LEGEND))
    return ["columns:", *(f"  {title.ljust(width)}  {text}" for title, text in LEGEND.items())]


def table_header() -> list[str]:
    header = _fixed_width([title for title, _, _ in COLUMNS])
    return [header, "-" * len(header)]


def table_lines(rows: Iterable[Row]) -> list[str]:
    """One fixed-width line per row, and one more under a row with notes."""
    lines = []
    for r in rows:
        lines.append(_fixed_width([cell(r) for _, _, cell in COLUMNS]).rstrip())
        if r.notes:
            lines.append(f"    ! {r.impl}: {r.notes}")
    return lines


def missing_lines(report: Report) -> list[str]:
    """One line per missing peer, package or family: why, and what it took out."""
    lines = []
    for name, entry in sorted(report.missing.items()):
        line = f"{name}: {' | '.join(sorted(entry.reasons))}"
        others = sorted(entry.impls - {name})
        if entry.failed_cases:
            cases = len(entry.failed_cases)
            line += f" (on {cases} case{'s' if cases > 1 else ''}, the first {entry.failed_cases[0]})"
        if others:
            line += f"; without it: {', '.join(others)}"
        lines.append(line)
    return lines or ["none"]


def skipped_lines(report: Report) -> list[str]:
    return [f"{name}: {' | '.join(sorted(reasons))}" for name, reasons in sorted(report.skipped.items())] or ["none"]


def warning_lines(report: Report) -> list[str]:
    lines = []
    for text, warned in report.warnings.items():
        count = len(warned.cases)
        lines.append(f"{text} [{count} case{'s' if count > 1 else ''}, the first {warned.cases[0]}]")
    return lines or ["none"]


def summary_lines(meta: dict[str, str], ceilings: Ceilings) -> list[str]:
    return [f"{key}: {value}" for key, value in meta.items()] + [
        f"ceiling, copy bandwidth: {ceilings.copy_gbps:.1f} GB/s ({ceilings.copy_what}, bytes read + written)",
        f"ceiling, matmul peak: {ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_what})",
    ]


def results_data(meta: dict[str, str], arguments: dict[str, Any], ceilings: Ceilings, rows: list[Row],
                 report: Report, footer: list[str]) -> dict[str, Any]:
    """What results.json holds."""
    return {
        "meta": meta,
        "arguments": arguments,
        "ceilings": dataclasses.asdict(ceilings),
        "missing_peers": {name: {"reasons": sorted(e.reasons), "implementations": sorted(e.impls),
                                 "failed_cases": e.failed_cases} for name, e in report.missing.items()},
        "skipped_backends": {k: sorted(v) for k, v in report.skipped.items()},
        "warnings": {text: warned.cases for text, warned in report.warnings.items()},
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets": footer,
    }


PLOTS_HEADING = "## Plots"


def plot_links(plots: Sequence[Path]) -> list[str]:
    """The Plots section of results.md: every plot beside it, linked."""
    return [PLOTS_HEADING, "", *(f"![{p.stem}]({p.name})" for p in plots), ""]


def results_markdown(data: dict[str, Any], report: Report, rows: list[Row], plots: Sequence[Path]) -> str:
    meta, ceilings = data["meta"], Ceilings(**data["ceilings"])
    arguments = " ".join(data["arguments"]["argv"]) or "(none)"
    md = [f"# pydpm benchmarks: {meta['card']}", ""]
    md += [f"- {line}" for line in summary_lines(meta, ceilings)] + [f"- arguments: {arguments}", ""]
    md += ["Missing peers:", "", *(f"- {line}" for line in missing_lines(report)), ""]
    md += ["Skipped for some cases:", "", *(f"- {line}" for line in skipped_lines(report)), ""]
    md += ["Warnings raised while the cases ran:", "", *(f"- {line}" for line in warning_lines(report)), ""]
    md += ["Columns:", "", *(f"- **{title}**: {text}" for title, text in LEGEND.items()), ""]
    md += ["| " + " | ".join(title for title, _, _ in COLUMNS) + " | note |",
           "|" + "---|" * (len(COLUMNS) + 1)]
    md += ["| " + " | ".join(cell(r) for _, _, cell in COLUMNS) + f" | {r.notes.replace('|', '/')} |" for r in rows]
    md += ["", "Targets (reported, not asserted):", *[f"- {line}" for line in data["targets"]], ""]
    return "\n".join(md + (plot_links(plots) if plots else []))


def link_plots(md: Path, plots: Sequence[Path]) -> None:
    """Replaces the Plots section of the results.md `md` (appends one where it has none)."""
    text = md.read_text()
    head = text.split(f"\n{PLOTS_HEADING}\n")[0].rstrip("\n")
    md.write_text("\n".join([head, "", *plot_links(plots)]))


def load_results(path: Path) -> tuple[Path, dict[str, Any]]:
    """(the results file, its contents) for a results.json or the folder holding one; ValueError for a JSON
    file that holds no benchmark rows (host_cost.py's, the attention tuner's)."""
    file = path / "results.json" if path.is_dir() else path
    data = json.loads(file.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{file}: not the results of a pydpm bench run (no rows)")
    return file, data


def new_results_folder(parent: Path, meta: dict[str, str], now: datetime.datetime, quick: bool) -> Path:
    """A new folder under `parent`, <UTC time>-<card>-<commit>[-quick]; a name taken already (two runs in one
    second) gets -2, -3, ...: a run never writes into another's folder."""
    name = f"{now:%Y%m%dT%H%M%SZ}-{slug(meta['card'])}-{slug(meta['git'].split()[0])}" + ("-quick" if quick else "")
    for n in itertools.count(1):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder


def _plan(ops: dict[str, ModuleType], device: torch.device, quick: bool, cases: str | None,
          report: Report, impls: str | None = None) -> list[tuple[str, ModuleType, list[Case], str]]:
    """(family, module, its cases matching `cases`, why it has none) per op family, each case with its
    implementations matching `impls`. A family whose cases need CUDA (NeedsCUDA) or a package not installed has
    none, and is recorded among the missing."""
    plan = []
    for name, module in ops.items():
        found, why = [], ""
        try:
            with warnings_captured(report, f"the {name} cases"):
                found = [c for c in module.cases(device, quick) if cases is None or re.search(cases, c.label)]
            if impls is not None:
                for case in found:
                    case.impls = [i for i in case.impls if re.search(impls, i.name)]
                found = [case for case in found if case.impls]
        except NeedsCUDA as exc:
            why = f"{NEEDS_CUDA}: {exc}"
            report.miss(f"the {name} family", why, f"the {name} family")
        except ModuleNotFoundError as exc:
            if not report.missing_package(f"the {name} family", exc):
                raise
            why = f"not installed: pip install {not_installed(exc)}"
        if not found and not why:
            why = ("no case matches --cases / --impls" if cases is not None or impls is not None else
                   "no cases on this device")
        plan.append((name, module, found, why))
    return plan


def run_suite(ops: dict[str, ModuleType], device: torch.device, quick: bool, out: Path | None,
              cases: str | None = None, arguments: dict[str, Any] | None = None, impls: str | None = None) -> int:
    """Run every case of the op files `ops` (those whose label matches the regex `cases`, when given, with the
    implementations whose name matches the regex `impls`), print
    the table, write results.json, results.md and (with matplotlib) the plots to `out`, by default a new
    folder under bench-results/. `arguments` (the command line) go into results.json. Returns 1 when an
    implementation of ours failed or disagreed with the oracle, else 0."""
    from . import plot

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = environment(device, now)
    timing = timing_for(device, quick)
    report = Report()
    plan = _plan(ops, device, quick, cases, report, impls)
    progress = Progress([len(case.impls) for _, _, found, _ in plan for case in found])
    rows, footer = [], []
    try:
        progress.doing("measuring the ceilings")
        ceilings = measure_ceilings(device, timing)
        for line in [*summary_lines(meta, ceilings), "", *legend_lines(), "", *table_header()]:
            progress.print(line)
        for name, module, found, why in plan:
            progress.family(name, len(found), why)
            results = []
            for case in found:
                progress.case(case.label)
                with warnings_captured(report, case.label):
                    case_rows = run_case(case, ceilings, timing, report, progress.doing)
                for line in table_lines(case_rows):
                    progress.print(line)
                progress.case_done()
                results.append((case, case_rows))
                rows += case_rows
            footer += module.footer(results)
    finally:
        progress.close()
    sections = [("missing peers", missing_lines(report)), ("skipped for some cases", skipped_lines(report)),
                ("warnings raised while the cases ran", warning_lines(report)),
                ("targets (reported, not asserted)", footer)]
    for title, lines in sections:
        print(f"\n{title}:", *[f"  {line}" for line in lines], sep="\n")
    out = out if out is not None else new_results_folder(Path("bench-results"), meta, now, quick)
    out.mkdir(parents=True, exist_ok=True)
    data = results_data(meta, arguments or {"argv": []}, ceilings, rows, report, footer)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    plots = plot.plot_results(data, out) if plot.available() else []
    (out / "results.md").write_text(results_markdown(data, report, rows, plots))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
    if plots or plot.available():
        print(f"plots: {', '.join(str(p) for p in plots) or 'none (no rows)'}")
    else:
        print(f"plots: none ({plot.MISSING})")
    return 1 if report.failed else 0


class Outputs:
    """Every output of one call. `check` compares `first_output(y).double()` with the oracle;
    this holder's `double()` flattens all its parts into one float64 vector in the oracle's layout (a part
    given as a sequence of bands is stacked on dim 2: high's [B, C, 3, h, w]; a part with a scale is
    multiplied by it). The timed call only builds the holder; stacking and conversion happen when checked."""

    __slots__ = ("parts", "scales")

    def __init__(self, *parts, scales: Sequence[float] | None = None):
        self.parts = parts
        self.scales = scales or (1.0,) * len(parts)

    def double(self) -> torch.Tensor:
        flat = []
        for part, scale in zip(self.parts, self.scales):
            t = part if isinstance(part, torch.Tensor) else torch.stack(list(part), dim=2)
            flat.append(t.detach().double().flatten() * scale)
        return torch.cat(flat)
