"""A module's forward replayed from CUDA graphs, one per input signature (what `accelerate` installs): the
inference forward, and with autograd recording the forward and its backward.

An eager diffusion network issues about a thousand small launches per forward (and as many again in its
backward), and at the batch sizes of sampling, and of training on one GPU, the host's cost of issuing them is
most of the step's wall time. `GraphedForward` captures the forward once per signature into a CUDA graph with
static input buffers; a later call with that signature copies its tensors into the buffers, replays the graph
(one launch from the host) and returns copies of the outputs.

Training. When autograd records (grad mode on and a parameter requires grad), the call replays a training
graph: the forward captured with autograd on, and the backward into every parameter that requires grad
captured beside it (`torch.autograd.grad`), both in one private memory pool, where the parameters' gradients
take memory the forward's temporaries freed, as eagerly. The call returns copies of the outputs attached to one
autograd node; its backward copies the incoming gradients into the graph's buffers, replays the backward graph
and hands the parameters' gradients to autograd, which accumulates them into `.grad` as it would eagerly
(`zero_grad`, gradient accumulation, hooks and optimizers work unchanged). `.grad` costs no copy and no memory
of its own: one that was None becomes the graph's gradient buffer itself (autograd takes the tensor handed to
it), as with `torch.cuda.make_graphed_callables`. Unlike there, a replay never changes a gradient a step handed
out, although the next forward replay writes the pool: a `.grad` still holding its buffer then (accumulation
without `zero_grad`, or `zero_grad(set_to_none=False)`) first gets memory of its own (the same tensor object,
its values copied), and the backward adds the new gradient into it; while a handed-out gradient is referenced
outside `.grad` (kept past `zero_grad`, returned by `torch.autograd.grad`, a view of it) the signature's steps
run eagerly, with one warning. The captures allocate their pools in expandable segments (`_expandable_segments`),
which keeps a graphed step's peak memory near the eager step's (SD1.5's bf16 training step on an H200: 1.10×).
A signature's training graph serves one step at a time: a second forward of that signature while the first
one's backward is still pending (two forwards, one backward) runs eagerly, since a replay would overwrite the
activations the pending backward reads. Under autocast the graphs are captured with autocast's cast cache off
(a graph cannot replay the cache), and the autocast state is part of the signature.

A signature is the call's structure: every tensor's shape, strides, dtype and device, and every other argument's
value (the forward's `timestep` argument, positional or keyword, given as a Python number is made a tensor
first, so the graph does not depend on it), the module's `training` flag, the autocast state and, for a
training graph, which parameters require grad. The graphs are kept in a bounded cache (`max_graphs`, least
recently used first out); a call that finds no graph and no room runs eagerly, with one warning per wrapper.

Calls run eagerly, with no graph, when: torch.compile is tracing, an input tensor requires grad, a tensor is not
on the module's CUDA device, an argument is neither a tensor nor hashable, autograd records and `train=False`,
or the capture of that signature failed (one warning naming the error; `reset()` tries again). A training
capture fails when an autograd graph of an earlier step is still alive (a loss tensor kept after its backward):
its gradient accumulators belong to the stream that created them, and the backward's capture cannot wait on
it.

Weights. The graphs read the parameters and buffers in place: an in-place update (`load_state_dict`,
`copy_`, an optimizer step) is seen by the next replay. A parameter or buffer replaced by another tensor
(`p.data = ...`, a new `nn.Parameter`) and any module, parameter or buffer registered on a module of the
model (PEFT injecting LoRA layers, `fuse_lora` replacing weights) drop every graph, and the next call captures
again. What a graph cannot see is a change that is none of these: Python numbers and attributes the forward
reads (a LoRA scale set by `set_adapters`, an attention processor set with `set_processor`) are baked into the
graph when it is captured; after such a change call `reset()` (or `accelerate` again).
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import numbers
import os
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


_TENSOR = object()  # a tensor's place among a training graph's output leaves


class _Step:
    """One training step's forward: `done` once its backward has run (a token the step's autograd node holds)."""
    __slots__ = ("done", "__weakref__")

    def __init__(self):
        self.done = False


class _TrainGraph:
    """A captured training forward and backward: `inputs` (static input buffers), `outputs` (the forward's
    static tensor outputs), `leaves` and `spec` (the output's pytree: its non-tensor leaves as captured, _TENSOR
    where a tensor goes), `grad_outputs` (static buffers of the outputs' gradients, None where an output needs
    none), `params` (the parameters that required grad) and `grads` (their static gradients, None where unused);
    `step` (a weak reference to the `_Step` of the last replay) and `storages` (per memory the static gradients
    live in, several where a backward returns views of one tensor: which of them, and how many users the memory
    has when no gradient handed out aliases it)."""
    __slots__ = ("forward", "backward", "inputs", "outputs", "leaves", "spec", "grad_outputs", "params", "grads",
                 "step", "storages")

    def __init__(self, forward, backward, inputs, outputs, leaves, spec, grad_outputs, params, grads):
        self.forward, self.backward, self.inputs, self.outputs = forward, backward, inputs, outputs
        self.leaves, self.spec, self.grad_outputs, self.params, self.grads = leaves, spec, grad_outputs, params, grads
        self.step: weakref.ref | None = None
        shared: dict[int, list[int]] = {}
        for i, g in enumerate(grads):
            if g is not None:
                shared.setdefault(g.untyped_storage().data_ptr() or -1 - i, []).append(i)  # empty: its own
        # (the storage's address for its use count, the count, [(parameter, its static gradient's address)])
        self.storages = []
        for at in shared.values():
            storage = grads[at[0]].untyped_storage()._cdata
            self.storages.append((storage, torch._C._storage_Use_Count(storage),
                                  [(params[i], grads[i].data_ptr()) for i in at]))

    def pending(self) -> bool:
        """Whether the last replay's backward has yet to run while its outputs' autograd graph is alive."""
        step = self.step() if self.step is not None else None
        return step is not None and not step.done

    def held_elsewhere(self) -> bool:
        """Whether a gradient an earlier replay handed out is still referenced outside `.grad` (kept past
        `zero_grad`, returned by `torch.autograd.grad`, a view of it): the next replay would change it. (Run
        before every replay: one use count per storage when no gradient is handed out.)"""
        uses = torch._C._storage_Use_Count
        for storage, alone, members in self.storages:
            now = uses(storage)
            if now > alone and now > alone + sum(_holds(param, at) for param, at in members):
                return True
        return False

    def move_out(self) -> None:
        """Before the forward replay, which writes the pool: a `.grad` that holds its static gradient (an earlier
        step's) gets memory of its own, the same tensor object with its values copied."""
        uses = torch._C._storage_Use_Count
        for storage, alone, members in self.storages:
            if uses(storage) > alone:
                for param, at in members:
                    if _holds(param, at):
                        param.grad.data = param.grad.clone()

    def hand_over(self) -> list[torch.Tensor | None]:
        """Per parameter, what the backward hands autograd: an alias of the static gradient, which autograd takes
        as `.grad` when it is None (no copy) or adds into it."""
        return [None if static is None else static.detach() for static in self.grads]


def _holds(param: torch.nn.Parameter, at: int) -> bool:
    """Whether `param.grad` is the static gradient at address `at` (handed over by an earlier replay)."""
    grad = param.grad
    return grad is not None and grad.data_ptr() == at


class _TrainReplay(torch.autograd.Function):
    """Replays a `_TrainGraph`: forward, the gradients still in the pool moved out (`_TrainGraph.move_out`) and
    copies of its outputs; backward, the backward graph on the incoming gradients, the parameters' gradients
    handed to autograd (`_TrainGraph.hand_over`)."""

    @staticmethod
    def forward(ctx, entry: _TrainGraph, step: _Step, *params):
        entry.move_out()
        entry.forward.replay()
        ctx.entry, ctx.step = entry, step
        outputs = tuple(o.clone() for o in entry.outputs)
        ctx.mark_non_differentiable(*(o for o, g in zip(outputs, entry.grad_outputs) if g is None))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        entry = ctx.entry
        for static, grad in zip(entry.grad_outputs, grads):
            if static is not None:
                static.copy_(grad)
        handed = entry.hand_over()
        entry.backward.replay()
        ctx.step.done = True
        return (None, None, *handed)


@contextlib.contextmanager
def _autocast_cache_off():
    """Autocast's cast cache off inside (a graph captured with it would replay casts it never recorded)."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cached)


@contextlib.contextmanager
def _expandable_segments():
    """The caching allocator's expandable segments on inside, unless the user's allocator settings choose
    (or another allocator backend runs). A capture's private pool cannot release or merge its segments, and with
    a segment per block size it ends up reserving far more than the capture had allocated at its peak (the SD1.5
    training step's pool on an H200: 2.88 GiB reserved, against 2.29 GiB in expandable segments); expandable
    segments grow one mapped range instead. Outside, the user's settings are back: later segments are plain."""
    global _left_behind
    settings = getattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "")() or \
        os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    chosen = "expandable_segments" in settings and settings != _left_behind
    if chosen or torch.cuda.memory.get_allocator_backend() != "native":
        yield
        return
    configure = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        torch.cuda.memory._set_allocator_settings
    configure("expandable_segments:True")
    try:
        yield
    finally:
        configure(_PLAIN_SEGMENTS)
        _left_behind = _PLAIN_SEGMENTS


_PLAIN_SEGMENTS = "expandable_segments:False"
# The settings string the last capture left (torch reports the last one set): the user's own choice otherwise,
# "expandable_segments:False" included.
_left_behind: str | None = None


class GraphedForward:
    """Replaces `module.forward` (an instance attribute; `remove()` takes it off) with graph replays."""

    def __init__(self, module: torch.nn.Module, max_graphs: int = 8, warmup: int = 2, train: bool = True):
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
        self.max_graphs, self.warmup, self.train = max_graphs, warmup, train
        # signature -> its graph (None: its capture failed, it runs eagerly)
        self.graphs: collections.OrderedDict[Any, _Graph | _TrainGraph | None] = collections.OrderedDict()
        self.captures = self.replays = self.eager_calls = 0
        self._warned = self._warned_held = False
        self._weights: tuple[list[torch.Tensor], tuple[int, ...]] = ([], ())
        self._params: list[torch.nn.Parameter] = []
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
        self._params = list(self.module.parameters())
        tensors = [*self._params, *self.module.buffers()]
        self._weights = (tensors, tuple(t.data_ptr() for t in tensors))
        return True

    def _signature(self, args: tuple, kwargs: dict) -> tuple[Any, list[torch.Tensor]] | None:
        """(key, tensor leaves) of a call that can replay a graph; None when it must run eagerly."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key: list[Any] = [spec, self.module.training, autocast]  # dropout and friends read the mode flag
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
        if torch.compiler.is_compiling():
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
        trainable = tuple(p.requires_grad for p in self._params) if torch.is_grad_enabled() else ()
        grads = any(trainable)
        if grads:
            if not self.train:
                self.eager_calls += 1
                return self.eager(*args, **kwargs)
            key = (*key, trainable)
        if key in self.graphs:
            entry = self.graphs[key]
            self.graphs.move_to_end(key)
        else:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"pydpm: {type(module).__name__} was called with more than max_graphs="
                                  f"{self.max_graphs} input signatures (shapes, dtypes, arguments); calls with "
                                  f"a signature that has no graph run eagerly: raise max_graphs in accelerate() "
                                  f"if the model really sees that many", stacklevel=2)
                self.eager_calls += 1
                return self.eager(*args, **kwargs)
            entry = self._capture_train(args, kwargs, tensors) if grads else self._capture(args, kwargs, tensors)
            if self._weights_changed():  # the warm-up registered or replaced weights: older graphs may be stale
                self.graphs.clear()
            self.graphs[key] = entry
        if entry is None or (grads and (entry.pending() or self._held_elsewhere(entry))):
            self.eager_calls += 1  # no graph, or its buffers serve a pending backward or a kept gradient
            return self.eager(*args, **kwargs)
        with torch.no_grad():
            for static, t in zip(entry.inputs, tensors):
                static.copy_(t)
        self.replays += 1
        if isinstance(entry, _TrainGraph):
            step = _Step()
            outputs = iter(_TrainReplay.apply(entry, step, *entry.params))
            entry.step = weakref.ref(step)
            return pytree.tree_unflatten([next(outputs) if leaf is _TENSOR else leaf for leaf in entry.leaves],
                                         entry.spec)
        entry.graph.replay()
        # copies: the next replay overwrites the static output (diffusers' BaseOutput is a pytree node)
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, entry.output)

    def _held_elsewhere(self, entry: _TrainGraph) -> bool:
        """`entry.held_elsewhere()`, with one warning per wrapper the first time it is."""
        if not entry.held_elsewhere():
            return False
        if not self._warned_held:
            self._warned_held = True
            warnings.warn(f"pydpm: a gradient of {type(self.module).__name__} from an earlier step replayed from a "
                          f"CUDA graph is still referenced outside .grad (kept past zero_grad, returned by "
                          f"torch.autograd.grad, or a view of it); it is the graph's gradient buffer, which the "
                          f"next replay overwrites, so steps run eagerly while it lives: clone gradients you keep",
                          stacklevel=3)
        return True

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

    def _statics(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[list, tuple, dict]:
        """Static copies of the call's tensors, and the call's arguments with those in their places."""
        statics = [t.clone() for t in tensors]
        it = iter(statics)
        s_args, s_kwargs = pytree.tree_map_only(torch.Tensor, lambda _: next(it), (args, kwargs))
        return statics, s_args, s_kwargs

    def _warm_up(self, step: Callable[[], Any]) -> None:
        """`step()` `warmup` times on a side stream, off the capture: lazy inits, autotuning, workspaces."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> _Graph:
        statics, s_args, s_kwargs = self._statics(args, kwargs, tensors)
        with torch.no_grad(), _autocast_cache_off():
            self._warm_up(lambda: self.eager(*s_args, **s_kwargs))
            graph = torch.cuda.CUDAGraph()
            with _expandable_segments(), torch.cuda.graph(graph):  # a private pool each: a dropped graph frees it
                output = self.eager(*s_args, **s_kwargs)
        self.captures += 1
        return _Graph(graph, statics, output)

    def _capture_train(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> _TrainGraph | None:
        """The training graph of a signature, or None (with one warning) when its capture fails."""
        statics, s_args, s_kwargs = self._statics(args, kwargs, tensors)
        params = tuple(p for p in self._params if p.requires_grad)

        def differentiable(output) -> list[torch.Tensor]:
            return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            outputs = differentiable(self.eager(*s_args, **s_kwargs))
            torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs], allow_unused=True)

        try:
            with _autocast_cache_off():
                self._warm_up(step)
                torch.clear_autocast_cache()  # its casts of the parameters hold an earlier step's autograd nodes
                pool = torch.cuda.graph_pool_handle()  # forward and backward share it: one step's memory
                forward = torch.cuda.CUDAGraph()
                with _expandable_segments(), torch.cuda.graph(forward, pool=pool):
                    output = self.eager(*s_args, **s_kwargs)
                leaves, spec = pytree.tree_flatten(output)
                outputs = [t for t in leaves if isinstance(t, torch.Tensor)]
                grad_outputs = [torch.empty_like(t) if t.requires_grad else None for t in outputs]
                if all(g is None for g in grad_outputs):
                    raise RuntimeError("no output of the forward requires grad")
                backward = torch.cuda.CUDAGraph()
                with _expandable_segments(), torch.cuda.graph(backward, pool=pool):
                    grads = torch.autograd.grad([t for t in outputs if t.requires_grad], params,
                                                [g for g in grad_outputs if g is not None], allow_unused=True)
        except RuntimeError as e:
            warnings.warn(f"pydpm: the training step of {type(self.module).__name__} could not be captured in a CUDA "
                          f"graph ({e}); calls with this signature run eagerly. An autograd graph of an earlier "
                          f"step still alive (a loss kept after its backward) stops the capture: drop it and call "
                          f"reset() on accelerate's report.graph to try again", stacklevel=3)
            return None
        self.captures += 1
        leaves = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return _TrainGraph(forward, backward, statics, [t.detach() for t in outputs], leaves, spec, grad_outputs,
                           params, grads)
