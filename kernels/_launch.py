"""Launching Triton kernels at a few µs per call: each variant is compiled once through Triton's JIT, then
launched by pydpm._C through the driver API (cuLaunchKernel, its parameters packed in one struct.pack call), or
through the compiled kernel's own launcher where that cannot apply; keyed on a signature the caller knows.

Triton's `kernel[grid](...)` specialises every argument on every call (type, 16-divisibility, value 1,
pointer alignment), hashes that into a cache key and formats launch metadata: 24-50 µs per launch on this
project's H200 host, against 7-11 µs for the compiled kernel's launcher alone (bench/NOTES.md, "Host cost").
`Kernel` launches without either (pydpm._C.launch_kernel: the parameters packed at the offsets the driver reports
for the loaded kernel, checked against the compiled signature once per variant; kernels with host tensor
descriptors, scratch memory, clusters or launch attributes keep Triton's launcher), and makes the JIT's
decisions cheaply:

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

`PYDPM_VERIFY_LAUNCHES=1` checks the bargain: before every launch Triton's JIT picks (without launching) the
compiled kernel for the arguments, which must be the one cached under the caller's key (the GPU tests run so).
`PYDPM_DIRECT_LAUNCH=0` keeps Triton's launcher for every kernel. Under Triton's interpreter
(TRITON_INTERPRET=1) every launch goes through the interpreter.

The ground floor: this module sees tensors and numbers only, never pydpm.ops.
"""
from __future__ import annotations

import os
import re
import struct
from typing import Any, Hashable, Sequence

import torch
import triton

from pydpm import _backend

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_VERIFY = os.environ.get("PYDPM_VERIFY_LAUNCHES", "0") not in ("", "0")
_DIRECT = os.environ.get("PYDPM_DIRECT_LAUNCH", "1") not in ("", "0")
# struct codes of Triton's scalar parameter types (ty_to_cpp; floats are stored in their own width)
_CODES = {"ptr": "Q", "i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q", "u1": "B", "u8": "B", "u16": "H",
          "u32": "I", "u64": "Q", "fp16": "e", "fp32": "f", "f32": "f", "fp64": "d"}


def _entry_param_count(compiled) -> int | None:
    """How many parameters the compiled kernel's PTX entry declares (Triton's hidden scratch pointers included),
    or None without PTX: the driver is asked for exactly these, never probed past the last one."""
    ptx = getattr(compiled, "asm", {}).get("ptx")
    name = getattr(compiled, "name", None) or getattr(compiled.metadata, "name", None)
    if not isinstance(ptx, str) or not isinstance(name, str):
        return None
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    return None if entry is None else len(re.findall(r"\.param\b", entry.group(1)))


_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_stream = _backend.cuda_stream


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
        if entry is not None and device == _current_device():
            launcher, compiled, tail, direct = entry
            if _VERIFY:
                self._verify(ored, g, args, pointers, tensors, constexprs, num_warps, num_stages, compiled, full_key)
            try:
                if direct is not None:
                    packer, kept, hidden, threads, shared = direct
                    values = args if kept is None else [args[i] for i in kept]
                    _backend._C.launch_kernel(compiled.function, g[0], g[1], g[2], threads, shared, _stream(device),
                                              packer.pack(*values, *hidden))
                else:
                    launcher(g[0], g[1], g[2], _stream(device), compiled.function, compiled.packed_metadata,
                             None, None, None, *args, *tail)
                return
            except (OverflowError, struct.error):  # a 32-bit variant met a 64-bit value: the JIT compiles a wider one
                pass
        for i, t in zip(pointers, tensors):
            args[i] = t
        fn = self.fn if ored % 16 == 0 else self._unaligned(pointers)
        with torch.cuda.device(device):
            compiled = fn[g](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if hasattr(compiled, "result"):  # Triton's asynchronous compilation mode
            compiled = compiled.result()
        self._cache[full_key] = (compiled.run, compiled, tuple(constexprs[n] for n in self.constexpr_names),
                                 self._direct(compiled) if _DIRECT else None)

    def prepare(self, grid: Sequence[int], args: list, key: Hashable, constexprs: dict[str, Any],
                num_warps: int = 4, num_stages: int = 3, varying: Sequence[int] = (0,)) -> "Prepared":
        """This launch with every argument fixed but the tensors at positions `varying` (see `Prepared`)."""
        return Prepared(self, grid, args, key, constexprs, num_warps, num_stages, varying)

    def _fast(self, args: list, key: Hashable, varying: Sequence[int]) -> tuple | None:
        """What `Prepared` needs to launch the variant cached for `args` (just launched) through the driver API
        with only the `varying` pointers changed, or None where that path does not apply."""
        if _INTERPRET or _VERIFY:
            return None
        pointers = self._pointers[key]
        if any(i not in pointers for i in varying):
            return None
        values = [a.data_ptr() if i in pointers else a for i, a in enumerate(args)]
        ored = 0
        for i in pointers:
            ored |= values[i]
        spec = tuple((values[i] % 16 == 0, values[i] == 1) for i in self.specialized)
        device = args[pointers[0]].get_device()
        entry = self._cache.get((key, spec, ored % 16 == 0, device))
        if entry is None or entry[3] is None:
            return None
        _, compiled, _, (packer, kept, hidden, threads, shared) = entry
        order = list(range(len(values))) if kept is None else list(kept)
        if any(i not in order for i in varying):
            return None
        return (packer, [values[i] for i in order] + list(hidden), tuple(order.index(i) for i in varying),
                ored % 16 == 0, device, threads, shared, compiled.function)

    def _verify(self, ored, g, args, pointers, tensors, constexprs, num_warps, num_stages, compiled, full_key):
        """Triton's own choice of compiled kernel for these arguments must be the cached one."""
        fn = self.fn if ored % 16 == 0 else self._unaligned(pointers)
        jit_args = list(args)
        for i, t in zip(pointers, tensors):
            jit_args[i] = t
        with torch.cuda.device(tensors[0].get_device()):
            chosen = fn.run(*jit_args, grid=g, warmup=True, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if hasattr(chosen, "result"):
            chosen = chosen.result()
        if chosen is not compiled and not self._wider_only(chosen, compiled):
            raise AssertionError(f"{self.name}: the launch key {full_key!r} maps to two compiled variants; the "
                                 f"caller's key misses something Triton specialises on")

    @staticmethod
    def _wider_only(chosen, compiled) -> bool:
        """True when two variants differ only in the width of integer arguments: a 64-bit variant runs any
        value the 32-bit one would, and a 32-bit variant given a 64-bit value raises in the launch, which then
        compiles the wider one (the module docstring)."""
        a, b = chosen.src.signature, compiled.src.signature
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return False
        return all(a[n] == b[n] or {a[n], b[n]} == {"i32", "i64"} for n in a)

    def _direct(self, compiled):
        """(packer, kept positions or None, hidden zeros, threads, shared bytes) to launch `compiled` through
        pydpm._C.launch_kernel, or None where Triton's launcher must run it: the parameter list the compiled
        signature implies (runtime parameters not specialised to constants, then Triton's hidden scratch
        pointers) must match the driver's layout of the loaded kernel, size for size."""
        C = _backend._C
        md = compiled.metadata
        if (C is None or not hasattr(C, "launch_kernel") or getattr(md, "num_ctas", 1) != 1
                or getattr(md, "launch_cooperative_grid", False) or getattr(md, "launch_pdl", False)
                or getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0)):
            return None
        signature = compiled.src.signature
        runtime = [p for p in self.fn.params if not p.is_constexpr]
        kept, codes = [], []
        for i, p in enumerate(runtime):
            ty = signature.get(p.name) if isinstance(signature, dict) else None
            if ty == "constexpr":
                continue
            code = _CODES.get("ptr" if isinstance(ty, str) and ty.startswith("*") else ty)
            if code is None:
                return None
            kept.append(i)
            codes.append(code)
        count = _entry_param_count(compiled)
        hidden = -1 if count is None else count - len(codes)
        if not 0 <= hidden <= 2:
            return None
        layout = C.kernel_param_layout(compiled.function, count)
        fmt, end = "<", 0
        for (offset, size), code in zip(layout, codes + ["Q"] * hidden):
            if struct.calcsize("<" + code) != size or offset < end:
                return None
            fmt += "x" * (offset - end) + code
            end = offset + size
        return (struct.Struct(fmt), None if len(kept) == len(runtime) else tuple(kept), (0,) * hidden,
                32 * md.num_warps, md.shared)

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


class Prepared:
    """A `Kernel` launch whose arguments stay fixed but for the tensors at positions `varying`, called with
    those tensors alone (a planned call site, re-launched every step with new data). The first call launches
    through `Kernel`; later calls pack the cached variant's parameters with the new pointers and launch through
    the driver API directly: no argument list, key or variant lookup per call. A new pointer that the cached
    variant's alignment does not allow, another device, and the cases `Kernel` keeps Triton's launcher for
    (the interpreter, PYDPM_VERIFY_LAUNCHES, PYDPM_DIRECT_LAUNCH=0, kernels the driver path does not apply to)
    take `Kernel`'s path every time. The fixed tensors are held here, so their pointers stay valid; the varying
    ones are not (each call brings its own)."""

    __slots__ = ("kernel", "grid", "args", "key", "constexprs", "num_warps", "num_stages", "varying", "fast")

    def __init__(self, kernel: Kernel, grid: Sequence[int], args: list, key: Hashable, constexprs: dict[str, Any],
                 num_warps: int, num_stages: int, varying: Sequence[int]):
        self.varying = tuple(varying)
        # the varying tensors come with each call: holding the first call's would keep them alive
        self.args = [None if i in self.varying else a for i, a in enumerate(args)]
        self.kernel, self.grid, self.key = kernel, tuple(grid), key
        self.constexprs, self.num_warps, self.num_stages = constexprs, num_warps, num_stages
        self.fast: tuple | None = None

    def __call__(self, *tensors: torch.Tensor) -> None:
        fast = self.fast
        if fast is not None:
            packer, values, slots, aligned, device, threads, shared, function = fast
            values = values.copy()  # the kept list is never written: calls from two threads do not mix pointers
            ok = device == _current_device()
            for slot, t in zip(slots, tensors):
                p = t.data_ptr()
                ok = ok and t.get_device() == device and (p % 16 == 0 or not aligned)
                values[slot] = p
            if ok:
                g = self.grid
                _backend._C.launch_kernel(function, g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                                          threads, shared, _stream(device), packer.pack(*values))
                return
        args = list(self.args)
        for i, t in zip(self.varying, tensors):
            args[i] = t
        self.kernel(self.grid, list(args), self.key, self.constexprs, self.num_warps, self.num_stages)
        if fast is None:
            self.fast = self.kernel._fast(args, self.key, self.varying)
