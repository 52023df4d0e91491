"""The benchmark's progress report on stderr: case i of n, the time elapsed and an estimate of the time left.

On a terminal it is one line, rewritten in place every second with the op family, the case and the
implementation at work, so a long case (a compilation, a model) never looks stalled; table lines printed
through `Progress.print` go above it. Elsewhere (a log file, a pipe) it writes one line per op family.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress over cases of unequal cost. `weights` gives the implementations of each case in run order:
    the time left is the time per implementation so far times the implementations left."""

    def __init__(self, weights: list[int], stream: TextIO | None = None, interval_s: float = 1.0):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.weights = weights
        self.started = self.cases_started = time.monotonic()
        self.index, self.weight_done = 0, 0
        self.family_name, self.what, self.doing_what = "", "", ""
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, args=(interval_s,), daemon=True)
        if self.live:
            self.ticker.start()

    def _tick(self, interval_s: float) -> None:
        while not self.stopped.wait(interval_s):
            with self.lock:
                self._draw()

    def _remaining(self) -> str:
        if not self.weight_done:
            return "time left: known after the first case"
        per_impl = (time.monotonic() - self.cases_started) / self.weight_done
        return f"~{clock(per_impl * (sum(self.weights) - self.weight_done))} left"

    def _status(self) -> str:
        return f"case {self.index}/{len(self.weights)} | {clock(time.monotonic() - self.started)} elapsed | " \
               f"{self._remaining()}"

    def _draw(self) -> None:
        what = " | ".join(part for part in (self.family_name, self.what, self.doing_what) if part)
        line = f"{self._status()} | {what}"[:shutil.get_terminal_size().columns - 1]
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()

    def _clear(self) -> None:
        self.stream.write("\r\033[K")

    def _update(self, **fields: str) -> None:
        with self.lock:
            for name, value in fields.items():
                setattr(self, name, value)
            if self.live:
                self._draw()

    def doing(self, what: str) -> None:
        """Names the step at work: measuring the ceilings, an implementation of the case, the eager loops."""
        self._update(doing_what=what)

    def family(self, name: str, cases: int, why_none: str = "") -> None:
        """Starts an op family of `cases` cases (none: `why_none` says why); off a terminal, its one line."""
        if self.index == 0:
            self.cases_started = time.monotonic()  # the ceilings are measured before: not a case's cost
        self._update(family_name=name, what="", doing_what="")
        if not self.live:
            span = f"cases {self.index + 1}-{self.index + cases} of {len(self.weights)}" if cases else \
                f"no cases ({why_none})"
            self.stream.write(f"[pydpm bench] {name}: {span}; {clock(time.monotonic() - self.started)} elapsed, "
                              f"{self._remaining()}\n")
            self.stream.flush()

    def case(self, label: str) -> None:
        self.index += 1
        self._update(what=label, doing_what="")

    def case_done(self) -> None:
        with self.lock:
            self.weight_done += self.weights[self.index - 1]

    def print(self, line: str) -> None:
        """A line of the table on stdout, above the progress line."""
        with self.lock:
            if self.live:
                self._clear()
            print(line, flush=True)
            if self.live:
                self._draw()

    def close(self) -> None:
        self.stopped.set()
        if self.live:
            self.ticker.join()
            self._clear()
            self.stream.write(f"{len(self.weights)} cases in {clock(time.monotonic() - self.started)}\n")
            self.stream.flush()
