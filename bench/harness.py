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
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from pydpm import _backend
from pydpm.ops import use_backend

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
    note: str = ""


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


@dataclasses.dataclass
class Report:
    """What one run found besides the rows: peers that could not run, backends skipped, failures of ours."""

    missing: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    failed: bool = False

    def skip(self, backend: str, reason: str) -> None:
        self.skipped.setdefault(backend, set()).add(reason)

    def miss(self, peer: str, reason: str) -> None:
        self.missing.setdefault(peer, set()).add(reason)


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def dtype_str(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


# --------------------------------------------------------------------------------------------------
# Implementations of pydpm ops
# --------------------------------------------------------------------------------------------------

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
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(2 * cache_bytes(device), dtype=torch.uint8, device=device)


TIMER = {
    "cuda": "CUDA events around each call: device time, L2 flushed and the launches queued behind a blocking "
            "kernel (the host's share is the host-us column)",
    "cpu": "time.perf_counter around each call",
}


def measure(fn: Callable[[], Any], device: torch.device, timing: Timing) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) in ms of one call of `fn`, after a warm-up.

    On CUDA this is device time: before each call the L2 is flushed and a blocking kernel (torch.cuda._sleep,
    longer than issuing a call takes) is queued, so every launch of the call is queued before its start event
    fires (nvbench's method). triton.testing.do_bench instead times the host whenever issuing a call outlasts
    its L2 flush, which on an H200 flips torch.compile or diffusers between host and device time from one
    shape to the next. On CPU: the host clock.
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
    reps = min(max(MIN_REPS, int(timing.rep_ms / estimate_ms)), MAX_REPS)
    if device.type == "cuda":
        flush = _l2_flush_buffer(device)
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
        times = []
        for _ in range(reps):
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
    """Device copy bandwidth (bytes read + written by a large dst.copy_(src)) and matmul peak."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # float32: 1 GiB on GPU, 256 MiB on CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device, timing)[0]
    copy_gbps = 2 * src.nbytes / copy_ms / 1e6
    copy_what = f"dst.copy_(src), {src.nbytes >> 20} MiB float32"
    del src, dst
    m, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    mm_ms = measure(lambda: torch.mm(a, b, out=c), device, timing)[0]
    return Ceilings(copy_gbps, 2 * m ** 3 / mm_ms / 1e9, copy_what, f"torch.mm {m}^3 {dtype_str(dtype)}")


# --------------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------------

def first_output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tolerance: float | None = None) -> str:
    """'' when y matches the float64 oracle to `tolerance` (default CHECK_TOLERANCE), else what differs."""
    err = ((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    tol = CHECK_TOLERANCE[dtype] if tolerance is None else tolerance
    return "" if err <= tol else f"max error {err:.1e} of max |expected| > {tol:.0e} against the float64 oracle"


def _error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def run_case(case: Case, ceilings: Ceilings, timing: Timing, report: Report) -> list[Row]:
    """Time every implementation of `case` on the same input sets; one Row each."""
    torch.compiler.reset()  # compile afresh for every case: no recompile limit reached across shapes and dtypes
    sets = input_sets(case)
    expected = case.oracle(sets[0])
    rows, timed = [], []
    for impl in case.impls:
        reasons = impl.reasons(sets[0])
        if reasons:
            report.skip(impl.name, "; ".join(reasons))
            continue
        row = Row(case.op, case.name, shape_str(case.shape), dtype_str(case.dtype), impl.name, impl.ours,
                  unit="TFLOP/s" if case.flops else "GB/s")
        try:
            with impl.context():
                fn = impl.make()
                mismatch = check(first_output(fn(sets[0])), expected, case.dtype, case.tolerance) if impl.check else ""
                rotation = itertools.cycle([functools.partial(fn, s) for s in sets])
                row.median_ms, row.p20_ms, row.p80_ms = measure(lambda: next(rotation)(), case.device, timing)
                calls = max(10, min(timing.host_calls, int(timing.rep_ms / row.median_ms)))
                row.host_device_us = synced_call_us(functools.partial(fn, sets[0]), case.device, calls)
                timed.append((impl, row, functools.partial(fn, sets[0]), calls))
        except Exception as exc:  # noqa: BLE001 - a failing implementation is reported, the run goes on
            if not impl.ours:
                report.miss(impl.name, _error(exc))
                continue
            report.failed = True
            row.note = f"FAILED: {_error(exc)}"
        else:
            if mismatch:
                report.failed |= impl.ours
                row.note = f"{'MISMATCH' if impl.ours else 'WARNING'}: {mismatch}"
        rows.append(row)
    eager_loops(timed, case.device)
    _rate(rows, case, ceilings)
    return rows


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


def _git_head() -> str:
    """The commit benchmarked: PYDPM_BENCH_COMMIT when the caller knows better than the checkout (a copy of
    the working tree sent to a GPU machine carries a stale .git), else the checkout's HEAD."""
    if os.environ.get("PYDPM_BENCH_COMMIT"):
        return os.environ["PYDPM_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown (not a git checkout)"
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() if done.returncode == 0 else "unknown (no commit)"


def environment(device: torch.device, now: datetime.datetime) -> dict[str, str]:
    return {
        "card": card_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "pydpm": _pydpm_version(),
        "git": _git_head(),
        "date_utc": now.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "timer": TIMER[device.type],
    }


# What users pay first: `eager us` is the wall time per call of back-to-back eager calls with one
# synchronisation at the end (host and device together, as a model sees the op), `vs peer` its ratio to the
# best peer's (> 1: faster than every peer). Then device time (CUDA events, L2 flushed, launches queued behind
# a blocking kernel), its ratio to the best peer's device time, the rate it implies and its fraction of the
# card's measured ceiling, and `host us`, the host's cost of issuing one call.
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
LEGEND = ("eager us: wall time per call of back-to-back eager calls, one synchronisation at the end (what a "
          "model pays); vs peer: the best peer's eager us over this row's (> 1: faster); device us: device time, "
          "L2 flushed; dev vs peer: the same ratio on device time; rate and %ceil: throughput from the bytes or "
          "flops a call must move, and its fraction of the measured ceiling; host us: the host's cost of issuing "
          "a call")


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _fixed_width(cells: list[str]) -> str:
    """Text columns left-aligned, numbers right-aligned."""
    return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))


def table_header() -> list[str]:
    header = _fixed_width([title for title, _, _ in COLUMNS])
    return [header, "-" * len(header)]


def table_lines(rows: Iterable[Row]) -> list[str]:
    """One fixed-width line per row, and one more under a row with a note."""
    lines = []
    for r in rows:
        lines.append(_fixed_width([cell(r) for _, _, cell in COLUMNS]).rstrip())
        if r.note:
            lines.append(f"    ! {r.impl}: {r.note}")
    return lines


def _listing(table: dict[str, set[str]], bullet: str = " ") -> list[str]:
    return [f"{bullet} {name}: {' | '.join(sorted(r))}" for name, r in sorted(table.items())] or [f"{bullet} none"]


def summary_lines(meta: dict[str, str], ceilings: Ceilings) -> list[str]:
    return [f"{key}: {value}" for key, value in meta.items()] + [
        f"ceiling, copy bandwidth: {ceilings.copy_gbps:.1f} GB/s ({ceilings.copy_what}, bytes read + written)",
        f"ceiling, matmul peak: {ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_what})",
    ]


def write_results(out: Path, meta: dict[str, str], ceilings: Ceilings, rows: list[Row], report: Report,
                  footer: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "ceilings": dataclasses.asdict(ceilings),
        "missing_peers": {k: sorted(v) for k, v in report.missing.items()},
        "skipped_backends": {k: sorted(v) for k, v in report.skipped.items()},
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets": footer,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    md = [f"# pydpm benchmarks: {meta['card']}", ""] + [f"- {line}" for line in summary_lines(meta, ceilings)]
    md += ["", "Missing peers:", "", *_listing(report.missing, "-"), "", "Skipped backends:", "",
           *_listing(report.skipped, "-"), ""]
    md += [f"Columns: {LEGEND}.", ""]
    md += ["| " + " | ".join(title for title, _, _ in COLUMNS) + " | note |",
           "|" + "---|" * (len(COLUMNS) + 1)]
    md += ["| " + " | ".join(cell(r) for _, _, cell in COLUMNS) + f" | {r.note} |" for r in rows]
    md += ["", "Targets (reported, not asserted):", *[f"- {line}" for line in footer], ""]
    (out / "results.md").write_text("\n".join(md))


def run_suite(ops: dict[str, ModuleType], device: torch.device, quick: bool, out: Path | None,
              cases: str | None = None) -> int:
    """Run every case of the op files `ops` (those whose label matches the regex `cases`, when given), print
    the table, write results.json and results.md to `out`. Returns 1 when an implementation of ours failed
    or disagreed with the oracle, else 0."""
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = environment(device, now)
    out = out or Path("bench-results") / f"{slug(meta['card'])}-{now:%Y-%m-%d}"
    timing = timing_for(device, quick)
    ceilings = measure_ceilings(device, timing)
    print("\n".join(summary_lines(meta, ceilings)), end="\n\n", flush=True)
    print(f"columns: {LEGEND}\n", flush=True)
    print(*table_header(), sep="\n", flush=True)
    report, rows, footer = Report(), [], []
    for module in ops.values():
        results = []
        for case in module.cases(device, quick):
            if cases is not None and not re.search(cases, case.label):
                continue
            case_rows = run_case(case, ceilings, timing, report)
            for line in table_lines(case_rows):
                print(line, flush=True)
            results.append((case, case_rows))
            rows += case_rows
        footer += module.footer(results)
    print("\nmissing peers:", *_listing(report.missing), "skipped backends:", *_listing(report.skipped), sep="\n")
    print("\ntargets (reported, not asserted):", *[f"  {line}" for line in footer], sep="\n")
    write_results(out, meta, ceilings, rows, report, footer)
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
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
