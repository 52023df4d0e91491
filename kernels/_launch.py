"""Launching Triton kernels at a few µs per call: each variant is compiled once through Triton's JIT, then
launched through the compiled kernel's own launcher, keyed on a signature the caller already knows.

Triton's `kernel[grid](...)` specialises every argument on every call (type, 16-divisibility, value 1,
pointer alignment), hashes that into a cache key and formats launch metadata: 24-50 µs per launch on this
project's H200 host, against 7-11 µs for the compiled kernel's launcher alone (bench/NOTES.md, "Host cost").
`Kernel` keeps that second path and makes the first one's decisions cheaply:

- integer arguments are declared `do_not_specialize` in the kernel (they never change the compiled code),
  except those the kernel names in `specialized`: for those, divisibility by 16 and equality to 1 enter the
  key, as Triton's JIT would specialise them;
- the caller's `key` names every constexpr value and launch option (they choose the variant) and the dtype
  of every tensor argument;
- pointer alignment enters the key as one flag: every tensor's address a multiple of 16 bytes (the usual
  case: the JIT's own variant), or not (a second JIT of the same function that specialises no pointer on
  alignment, so the variant holds whichever pointers are misaligned);
- integer widths: a variant compiled for 32-bit values raises OverflowError in the launcher for a larger
  one; the call then goes through the JIT, which compiles a 64-bit variant that replaces the first.

`PYDPM_VERIFY_LAUNCHES=1` checks the bargain: every launch goes through Triton's JIT and the compiled kernel
it picks must be the one cached under the caller's key (the GPU tests run so). Under Triton's interpreter
(TRITON_INTERPRET=1) every launch goes through the interpreter.

The ground floor: this module sees tensors and numbers only, never pydpm.ops.
"""
from __future__ import annotations

import os
from typing import Any, Hashable, Sequence

import torch
import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_VERIFY = os.environ.get("PYDPM_VERIFY_LAUNCHES", "0") not in ("", "0")
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _stream(index: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


class Kernel:
    """A @triton.jit kernel launched through its compiled launcher (see the module docstring).

    The kernel's parameters must list the runtime arguments first and the constexprs last; every integer
    runtime argument must be in the kernel's `do_not_specialize` list unless named in `specialized`.
    """

    def __init__(self, fn, specialized: Sequence[str] = ()):
        self.fn = fn
        self.name = getattr(getattr(fn, "fn", fn), "__name__", repr(fn))
        self._cache: dict[Hashable, tuple[Any, Any, tuple]] = {}
        self._unaligned_fns: dict[tuple[int, ...], Any] = {}
        if _INTERPRET:
            return
        params = fn.params
        constexpr = [p.is_constexpr for p in params]
        if constexpr != sorted(constexpr):
            raise TypeError(f"{self.name}: constexpr parameters must come after every runtime parameter")
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        names = [p.name for p in params]
        missing = set(specialized) - set(names)
        if missing:
            raise TypeError(f"{self.name}: specialized names no parameter {sorted(missing)}")
        self.specialized = tuple(names.index(n) for n in specialized)
        self._pointers: dict[Hashable, tuple[int, ...]] = {}  # per caller key: positions of the tensor arguments

    def __call__(self, grid: Sequence[int], args: list, key: Hashable, constexprs: dict[str, Any],
                 num_warps: int = 4, num_stages: int = 3) -> None:
        """Launch on torch's current stream of the tensors' device. `args`: the runtime arguments in the
        kernel's order, tensors where it takes pointers (the list is consumed; host tensor descriptors pass
        through to the launcher); `key`: hashable, naming the constexprs, launch options, tensor dtypes and
        descriptor block shapes; `constexprs`: the constexpr values by name."""
        if _INTERPRET:
            self.fn[tuple(grid)](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        pointers = self._pointers.get(key)
        if pointers is None:
            pointers = self._pointers[key] = self._learn(args)
        tensors = [args[i] for i in pointers]
        device = tensors[0].get_device()
        ored = 0
        for i in pointers:
            p = args[i].data_ptr()
            args[i] = p
            ored |= p
        spec = tuple((args[i] % 16 == 0, args[i] == 1) for i in self.specialized)
        full_key = (key, spec, ored % 16 == 0, device)
        entry = self._cache.get(full_key)
        g = tuple(grid) + (1,) * (3 - len(grid))
        if entry is not None and not _VERIFY and device == _current_device():
            launcher, compiled, tail = entry
            try:
                launcher(g[0], g[1], g[2], _stream(device), compiled.function, compiled.packed_metadata,
                         None, None, None, *args, *tail)
                return
            except OverflowError:  # a 32-bit variant met a 64-bit value: the JIT compiles a wider one
                pass
        for i, t in zip(pointers, tensors):
            args[i] = t
        fn = self.fn if ored % 16 == 0 else self._unaligned(pointers)
        with torch.cuda.device(device):
            compiled = fn[g](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if hasattr(compiled, "result"):  # Triton's asynchronous compilation mode
            compiled = compiled.result()
        if _VERIFY and entry is not None and entry[1] is not compiled:
            raise AssertionError(f"{self.name}: the launch key {full_key!r} maps to two compiled variants; the "
                                 f"caller's key misses something Triton specialises on")
        self._cache[full_key] = (compiled.run, compiled, tuple(constexprs[n] for n in self.constexpr_names))

    def _learn(self, args: list) -> tuple[int, ...]:
        """The positions of the tensor arguments (the same on every call with this key: a key names where
        host tensor descriptors replace tensors); checks that every integer argument is either unspecialised
        in the kernel or named in `specialized`, so that the key covers it."""
        for i, a in enumerate(args):
            if type(a) is int and not self.fn.params[i].do_not_specialize and i not in self.specialized:
                raise TypeError(f"{self.name}: integer argument {self.fn.params[i].name!r} is specialised by Triton "
                                f"but not named in Kernel(specialized=...): add it to one of the two lists")
        return tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))

    def _unaligned(self, pointers: tuple[int, ...]):
        """The same kernel, specialising none of these pointer arguments on 16-byte alignment."""
        fn = self._unaligned_fns.get(pointers)
        if fn is None:
            jit = self.fn
            fn = self._unaligned_fns[pointers] = triton.jit(
                jit.fn, do_not_specialize=jit.do_not_specialize,
                do_not_specialize_on_alignment=[jit.params[i].name for i in pointers])
        return fn

    @property
    def variants(self) -> int:
        """How many variants have been compiled and cached."""
        return len(self._cache)
