"""A module's inference forward replayed from CUDA graphs, one per input signature (what `accelerate` installs).

An eager diffusion network issues about a thousand small launches per forward, and at the batch sizes of
sampling the host's cost of issuing them is most of the forward's wall time. `GraphedForward` captures the
forward once per signature into a CUDA graph with static input buffers; a later call with that signature copies
its tensors into the buffers, replays the graph (one launch from the host) and returns copies of the outputs.

A signature is the call's structure: every tensor's shape, strides, dtype and device, and every other argument's
value (the forward's `timestep` argument, positional or keyword, given as a Python number is made a tensor
first, so the graph does not depend on it). The
graphs are kept in a bounded cache (`max_graphs`, least recently used first out); a call that finds no graph
and no room runs eagerly, with one warning per wrapper.

Calls run eagerly, with no graph, when: autograd would record (grad mode on and a parameter or an input requires
grad: graphs replay no backward), torch.compile is tracing, a tensor is not on the module's CUDA device, or an
argument is neither a tensor nor hashable.

Weights. The graphs read the parameters and buffers in place: an in-place update (`load_state_dict`,
`copy_`, an optimizer step) is seen by the next replay. A parameter or buffer replaced by another tensor
(`p.data = ...`, a new `nn.Parameter`) and any module, parameter or buffer registered on a module of the
model (PEFT injecting LoRA layers, `fuse_lora` replacing weights) drop every graph, and the next call captures
again. What a graph cannot see is a change that is none of these: Python numbers and attributes the forward
reads (a LoRA scale set by `set_adapters`, an attention processor set with `set_processor`; the module's own
`training` flag is part of the signature) are baked into the graph when it is captured; after such a change
call `reset()` (or `accelerate` again).
"""
from __future__ import annotations

import collections
import inspect
import numbers
import threading
import warnings
import weakref
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

_hooks_lock = threading.Lock()
_hooks: list[Any] = []
_live: weakref.WeakSet = weakref.WeakSet()  # every GraphedForward in use


def _registered(parent: torch.nn.Module, *_args) -> None:
    """A module, parameter or buffer registered on `parent`: a wrapper whose model holds `parent` must check its
    weights again. (Registrations on modules outside every model, such as the ModuleList a slice like
    `self.resnets[1:]` builds on each forward, change nothing.)"""
    for wrapper in _live:
        if id(parent) in wrapper.members:
            wrapper.dirty = True


def _install_hooks() -> None:
    with _hooks_lock:
        if _hooks:
            return
        from torch.nn.modules import module as m

        _hooks.extend([m.register_module_module_registration_hook(_registered),
                       m.register_module_parameter_registration_hook(_registered),
                       m.register_module_buffer_registration_hook(_registered)])


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: Any):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedForward:
    """Replaces `module.forward` (an instance attribute; `remove()` takes it off) with graph replays."""

    def __init__(self, module: torch.nn.Module, max_graphs: int = 8, warmup: int = 2):
        devices = {t.device for t in (*module.parameters(), *module.buffers())}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedForward: the module's parameters are on {sorted(map(str, devices))}; CUDA "
                             f"graphs need every parameter and buffer on one CUDA device")
        if isinstance(module.__dict__.get("forward"), GraphedForward):
            raise ValueError(f"GraphedForward: {type(module).__name__}.forward is replayed from graphs already; "
                             f"remove() that one first")
        _install_hooks()
        self.module, self.device = module, next(iter(devices))
        self.eager: Callable[..., Any] = module.forward  # the bound method of the class
        names = list(inspect.signature(self.eager).parameters)  # where the forward takes `timestep` positionally
        self.timestep_index = names.index("timestep") if "timestep" in names else None
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: collections.OrderedDict[Any, _Graph] = collections.OrderedDict()
        self.captures = self.replays = self.eager_calls = 0
        self._warned = False
        self._weights: tuple[list[torch.Tensor], tuple[int, ...]] = ([], ())
        self.members: set[int] = set()  # id() of every module of the model, for the registration hooks
        self.dirty = True
        _live.add(self)
        module.forward = self

    def reset(self) -> None:
        """Drop every graph: the next call of each signature captures again."""
        self.graphs.clear()

    def remove(self) -> None:
        """Put the class's forward back and free the graphs."""
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
        self.graphs.clear()
        _live.discard(self)

    def _weights_changed(self) -> bool:
        """Whether a weight was replaced or something registered in the model since the last check."""
        tensors, ptrs = self._weights
        if not self.dirty and all(t.data_ptr() == p for t, p in zip(tensors, ptrs)):
            return False
        self.dirty = False
        self.members = {id(m) for m in self.module.modules()}
        tensors = [*self.module.parameters(), *self.module.buffers()]
        self._weights = (tensors, tuple(t.data_ptr() for t in tensors))
        return True

    def _signature(self, args: tuple, kwargs: dict) -> tuple[Any, list[torch.Tensor]] | None:
        """(key, tensor leaves) of a call that can replay a graph; None when it must run eagerly."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key: list[Any] = [spec, self.module.training]  # dropout and friends read the mode flag
        tensors = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device or leaf.requires_grad:
                    return None
                tensors.append(leaf)
                key.append((leaf.shape, leaf.stride(), leaf.dtype))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None
                key.append((type(leaf), leaf))
        return tuple(key), tensors

    def __call__(self, *args, **kwargs):
        module = self.module
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                p.requires_grad for p in module.parameters())):
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        args, kwargs = self._tensor_timestep(args, kwargs)
        found = self._signature(args, kwargs)
        if found is None:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        key, tensors = found
        if self._weights_changed():
            self.graphs.clear()
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"pydpm: {type(module).__name__} was called with more than max_graphs="
                                  f"{self.max_graphs} input signatures (shapes, dtypes, arguments); calls with "
                                  f"a signature that has no graph run eagerly: raise max_graphs in accelerate() "
                                  f"if the model really sees that many", stacklevel=2)
                self.eager_calls += 1
                return self.eager(*args, **kwargs)
            entry = self._capture(args, kwargs, tensors)
            if self._weights_changed():  # the warm-up registered or replaced weights: older graphs may be stale
                self.graphs.clear()
            self.graphs[key] = entry
        else:
            self.graphs.move_to_end(key)
        with torch.no_grad():
            for static, t in zip(entry.inputs, tensors):
                static.copy_(t)
        entry.graph.replay()
        self.replays += 1
        # copies: the next replay overwrites the static output (diffusers' BaseOutput is a pytree node)
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, entry.output)

    def _tensor_timestep(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A Python-number timestep as the 0-dim tensor diffusers' models would make of it (int64 / float64),
        so that one graph serves every timestep."""
        def as_tensor(v):
            if isinstance(v, numbers.Number) and not isinstance(v, bool):
                return torch.tensor(v, dtype=torch.int64 if isinstance(v, numbers.Integral) else torch.float64,
                                    device=self.device)
            return v
        if "timestep" in kwargs:
            kwargs = {**kwargs, "timestep": as_tensor(kwargs["timestep"])}
        elif self.timestep_index is not None and len(args) > self.timestep_index:
            i = self.timestep_index
            args = (*args[:i], as_tensor(args[i]), *args[i + 1:])
        return args, kwargs

    def _capture(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> _Graph:
        statics = [t.clone() for t in tensors]
        it = iter(statics)
        s_args, s_kwargs = pytree.tree_map_only(torch.Tensor, lambda _: next(it), (args, kwargs))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad():
            with torch.cuda.stream(stream):  # warm-up off the capture: lazy inits, autotuning, workspaces
                for _ in range(self.warmup):
                    self.eager(*s_args, **s_kwargs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private pool each: a dropped graph frees its memory
                output = self.eager(*s_args, **s_kwargs)
        self.captures += 1
        return _Graph(graph, statics, output)
