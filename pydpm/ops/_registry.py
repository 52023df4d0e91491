"""The op framework: backends that explain themselves, priority dispatch, forced backends, the registry.

Every op family module builds one `Op` and registers it. Dispatch walks the backends in priority order
and takes the first with no not-supported reasons. `PYDPM_BACKEND=<name>` or `use_backend(name)` forces a
backend; a forced backend that cannot run raises `BackendUnavailable` with its reasons, never falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pydpm_backend", default=None)


class BackendUnavailable(RuntimeError):
    """Raised when no backend (or the forced one) can run the given inputs."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    `reasons(args)` returns why it cannot run these inputs (empty: it can); `run(args)` computes.
    """

    name: str
    run: Callable[[Any], Any]
    reasons: Callable[[Any], list[str]]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclasses.dataclass
class Op:
    """An op family's metadata, from which the contract tests are generated: the public op, backends in
    priority order, the reference, the argument check, tolerances, sample inputs, in-place outputs."""

    name: str
    fn: Callable[..., Any]                       # the public op
    backends: Sequence[Backend]
    reference: Callable[..., Any]                # same arguments as fn; computes in fp32 (fp64 for fp64)
    check: Callable[..., Any]                    # fn's arguments -> the checked args every backend takes
    tolerances: dict[torch.dtype, Tolerance]
    sample_inputs: Callable[..., Iterator[tuple[str, dict]]]  # (device, dtype, small=) -> (name, kwargs)
    mutated: tuple[str, ...] = ()                # keyword arguments fn writes in place
    eager: Callable[..., Any] | None = None      # the unfused composition in the inputs' own dtype
    # What backend reasons depend on (e.g. device type, dtype, features): the choice is cached per key
    # and forced backend, so a sampling loop pays one dict lookup. None: no caching.
    dispatch_key: Callable[[Any], Hashable] | None = None
    # The automatic choice's order of backend names where it depends on the inputs (measured speed);
    # None: the order of `backends`. Whatever it depends on must be part of dispatch_key.
    priority: Callable[[Any], Sequence[str]] | None = None
    # torch.library registration: the op overload and fn's keyword arguments -> its arguments (opcheck).
    library_op: Any = None
    library_args: Callable[..., tuple] | None = None
    # fn's keyword arguments -> the output(s) fn accepts as out= (None: one tensor like kwargs["x"]).
    make_out: Callable[[dict], Any] | None = None
    _chosen: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"op {self.name} has no backend {name!r}; it has {[b.name for b in self.backends]}")

    def not_supported_reasons(self, args: Any) -> dict[str, list[str]]:
        """For every backend, why it cannot run `args` (an empty list: it can)."""
        return {b.name: b.reasons(args) for b in self.backends}

    def select(self, args: Any) -> Backend:
        forced = forced_backend()
        key = None if self.dispatch_key is None else (forced, self.dispatch_key(args))
        backend = self._chosen.get(key) if key is not None else None
        if backend is None:
            backend = self._select(args, forced)
            if key is not None:
                self._chosen[key] = backend
        return backend

    def _select(self, args: Any, forced: str | None) -> Backend:
        if forced is not None:
            if forced not in {b.name for b in self.backends}:
                raise BackendUnavailable(
                    f"{self.name}: backend {forced!r} was forced (PYDPM_BACKEND or pydpm.ops.use_backend) but this op "
                    f"has no {forced} backend; it has {[b.name for b in self.backends]}")
            backend = self.backend(forced)
            reasons = backend.reasons(args)
            if reasons:
                raise BackendUnavailable(
                    f"{self.name}: backend {forced!r} was forced (PYDPM_BACKEND or pydpm.ops.use_backend) but cannot "
                    f"run these inputs: {'; '.join(reasons)}")
            return backend
        order = self.backends if self.priority is None else [self.backend(n) for n in self.priority(args)]
        for backend in order:
            if not backend.reasons(args):
                return backend
        detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in self.not_supported_reasons(args).items())
        raise BackendUnavailable(f"{self.name}: no backend can run these inputs ({detail})")

    def __call__(self, args: Any) -> Any:
        return self.select(args).run(args)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name} is registered twice")
    REGISTRY[op.name] = op
    return op


def forced_backend() -> str | None:
    """The backend forced by `use_backend` (innermost wins) or else by PYDPM_BACKEND, or None."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("PYDPM_BACKEND") or None
    if name is not None and name not in BACKEND_NAMES:
        raise BackendUnavailable(f"PYDPM_BACKEND={name!r} is not a backend; choose one of {BACKEND_NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every pydpm op inside the block onto backend `name` (None: automatic choice)."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"use_backend: {name!r} is not a backend; choose one of {BACKEND_NAMES}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
