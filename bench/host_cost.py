"""Where the host time of one eager call goes: every public op at a host-bound size, beside the torch op it
replaces, its host time split into layers, and the cost of each Triton launch path.

    python -m pydpm.bench.host_cost [--device cuda|cpu] [--calls N] [--out FILE]

Per case:
- `wall us`: N back-to-back calls and one synchronisation at the end, per call: what a model pays for the op
  (host and device together; the larger of the two when they overlap).
- `host us`: the same loop timed before the synchronisation: the host's cost of issuing one call.
- the split of `host us` into layers, from cProfile's self time per function over N calls, scaled to the
  unprofiled host time (cProfile's own cost per Python call would otherwise inflate the Python layers):
  checks (pydpm argument checks), dispatch (the framework: front door and backend choice), pydpm (the rest of
  pydpm's Python: backends, launchers), launcher (pydpm.kernels._launch: variant key and call), autograd
  (torch.autograd.Function), torch.library (custom-op dispatch), triton JIT (Triton's Python dispatch:
  argument specialisation, cache key), triton helpers (triton.cdiv and the like), triton launch (the
  compiled kernel's launcher, with cuLaunchKernel),
  descriptors (host tensor descriptors), _C (pydpm._C calls, with the launch), torch (torch's own ops:
  allocations, views, SDPA), other.
- launches: every Triton kernel one call launches, µs per launch through pydpm's launcher (Kernel), through
  Triton's JIT (`kernel[grid](...)`) and through the compiled kernel's launcher alone.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

LAYERS = ("checks", "dispatch", "pydpm", "launcher", "autograd", "torch.library", "triton JIT", "triton helpers",
          "triton launch", "descriptors", "_C", "torch", "other")


class HostCase(NamedTuple):
    name: str
    call: Callable[[], Any]          # one eager call of the op (inputs bound)
    peer: str
    peer_call: Callable[[], Any]     # the torch op or composition it replaces, on the same tensors


def _rand(*shape, device, dtype=torch.float32, grad=False):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def call():
        fn().backward(grad)
    return call


def cases(device: torch.device) -> list[HostCase]:
    """Host-bound sizes: the kernels take a few µs, so what a call costs is what issuing it costs."""
    from pydpm import ops
    from pydpm.ops.spectral import focal_frequency_loss_reference
    from torch.nn import functional as F

    half = torch.float16 if device.type == "cuda" else torch.float32
    out = []
    x, m, m2 = (_rand(1, 4, 64, 64, device=device, dtype=half) for _ in range(3))
    out.append(HostCase("solver_step x + c·m (1,4,64,64)", lambda: ops.solver_step(x, [m], [1.0, 0.5]),
                        "torch.add(alpha=)", lambda: torch.add(x, m, alpha=0.5)))
    save = torch.empty_like(x)
    out.append(HostCase(
        "solver_step dpm++2m (1,4,64,64)",
        lambda: ops.solver_step(x, [m2], [0.9, 0.3, -0.1], model_output=m, convert=[1.2, -0.4], save=save),
        "torch.add(alpha=)", lambda: torch.add(x, m, alpha=0.5)))

    w = _rand(2, 64, 32, 32, device=device)
    gates = torch.rand(2, 4, 64, device=device)
    up = _rand(2, 256, 16, 16, device=device)
    ll, high = ops.haar_dwt2(w)
    out += [
        HostCase("haar_dwt2 (2,64,32,32)", lambda: ops.haar_dwt2(w), "x * 2", lambda: w * 2),
        HostCase("haar_idwt2 (2,64,16,16)", lambda: ops.haar_idwt2(ll, high), "x * 2", lambda: w * 2),
        HostCase("wavelet_gate_down (2,64,32,32)", lambda: ops.wavelet_gate_down(w, gates), "x * 2", lambda: w * 2),
        HostCase("wavelet_gate_up (2,256,16,16)", lambda: ops.wavelet_gate_up(up, gates), "x * 2", lambda: w * 2),
    ]
    wg = _rand(2, 64, 32, 32, device=device, grad=True)
    gg = torch.rand(2, 4, 64, device=device).requires_grad_()
    dy = torch.randn(2, 64, 16, 16, device=device)
    out.append(HostCase("wavelet_gate_down fwd+bwd (2,64,32,32)",
                        _fwd_bwd(lambda: ops.wavelet_gate_down(wg, gg), dy),
                        "(x * 2) fwd+bwd", _fwd_bwd(lambda: wg[:, :, ::2, ::2] * 2, dy)))

    ffw = _rand(64, 32, 17, 2, device=device)
    out.append(HostCase("ff_parser (2,64,32,32)", lambda: ops.ff_parser(w, ffw), "eager rfft2·w·irfft2",
                        lambda: torch.fft.irfft2(torch.fft.rfft2(w, norm="ortho") * torch.view_as_complex(ffw),
                                                 s=(32, 32), norm="ortho")))
    sca_w = _rand(32, 32, device=device)
    sca_b = _rand(32, device=device)
    half_c = w[:, :32]
    out += [
        HostCase("simple_gate (2,64,32,32)", lambda: ops.simple_gate(w), "x1 * x2",
                 lambda: w[:, :32] * w[:, 32:]),
        HostCase("simplified_channel_attention (2,32,32,32)",
                 lambda: ops.simplified_channel_attention(half_c, sca_w, sca_b), "eager sca",
                 lambda: half_c * (half_c.mean((2, 3)) @ sca_w.t() + sca_b)[..., None, None]),
        HostCase("simple_gate_sca (2,64,32,32)", lambda: ops.simple_gate_sca(w, sca_w, sca_b), "eager gate+sca",
                 lambda: (w[:, :32] * w[:, 32:]).mean((2, 3)) @ sca_w.t() + sca_b),
    ]

    sp, st = _rand(4, 3, 64, 64, device=device, grad=True), _rand(4, 3, 64, 64, device=device)
    sw = ops.spectrum_weight(st)
    one = torch.ones((), device=device)

    def fwmse_eager(pred=sp):
        return (sw * torch.fft.fft2(pred - st, norm="ortho").abs().square()).mean()
    out += [
        HostCase("frequency_weighted_mse (4,3,64,64)", lambda: ops.frequency_weighted_mse(sp.detach(), st, sw),
                 "eager fft2 weighted mse", lambda: fwmse_eager(sp.detach())),
        HostCase("frequency_weighted_mse fwd+bwd (4,3,64,64)",
                 _fwd_bwd(lambda: ops.frequency_weighted_mse(sp, st, sw), one),
                 "eager fwd+bwd", _fwd_bwd(fwmse_eager, one)),
        HostCase("focal_frequency_loss fwd+bwd (4,3,64,64)",
                 _fwd_bwd(lambda: ops.focal_frequency_loss(sp, st), one),
                 "reference fwd+bwd", _fwd_bwd(lambda: focal_frequency_loss_reference(sp, st), one)),
    ]

    from .time_shift import K, MODULUS, eager_pick
    promised = torch.linspace(0.8, 1.2, K, dtype=torch.float64, device=device)
    for shape in ((8, 4, 64, 64), (2, 4, 128, 128)):  # on an H200 the second is split into chunks
        xp = _rand(*shape, device=device, dtype=half)
        row = torch.randint(0, K * MODULUS, shape[:1], device=device)
        label = "(" + ",".join(map(str, shape)) + ")"
        out.append(HostCase(f"time_shift_pick {label}",
                            lambda xp=xp, row=row: ops.time_shift_pick(xp, promised, row, MODULUS),
                            "eager var+argmin", lambda xp=xp, row=row: eager_pick(xp, promised, row)))

    for shape in ((1, 1, 64, 64), (2, 10, 1024, 64)):
        q, k, v = (_rand(*shape, device=device, dtype=half) for _ in range(3))
        label = "(" + ",".join(map(str, shape)) + ")"
        out.append(HostCase(f"attention fwd {label}", lambda q=q, k=k, v=v: ops.attention(q, k, v), "SDPA fwd",
                            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)))
    q, k, v = (_rand(2, 10, 1024, 64, device=device, dtype=half, grad=True) for _ in range(3))
    do = torch.randn_like(q)
    out.append(HostCase("attention fwd+bwd (2,10,1024,64)", _fwd_bwd(lambda: ops.attention(q, k, v), do),
                        "SDPA fwd+bwd", _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), do)))

    def triton(fn):
        def call():
            with ops.use_backend("triton"):
                return fn()
        return call
    x77 = _rand(2, 8, 77, 64, device=device, dtype=half)
    q8 = _rand(2, 8, 4096, 64, device=device, dtype=half)
    out += [
        HostCase("attention[triton] fwd (2,10,1024,64)", triton(lambda: ops.attention(q.detach(), k.detach(),
                                                                                      v.detach())),
                 "SDPA fwd", lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())),
        HostCase("attention[triton] fwd+bwd (2,10,1024,64)", triton(_fwd_bwd(lambda: ops.attention(q, k, v), do)),
                 "SDPA fwd+bwd", _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), do)),
        HostCase("attention[triton] fwd (2,8,4096,64)x77", triton(lambda: ops.attention(q8, x77, x77)),
                 "SDPA fwd", lambda: F.scaled_dot_product_attention(q8, x77, x77)),
    ]
    return out


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def per_call_us(fn: Callable[[], Any], device: torch.device, calls: int) -> tuple[float, float]:
    """(wall µs per call of `calls` back-to-back calls with one sync at the end, host µs per call before it)."""
    sync = _sync(device)
    for _ in range(max(3, calls // 10)):
        fn()
    sync()
    best_wall = best_host = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - start
        sync()
        wall = time.perf_counter() - start
        best_wall, best_host = min(best_wall, wall), min(best_host, host)
    return best_wall / calls * 1e6, best_host / calls * 1e6


def layer_of(filename: str, func: str) -> str:
    """The layer a profiled function belongs to (see the module docstring)."""
    f = filename.replace("\\", "/")
    if f == "~":  # a built-in: classify by name
        if "solver_step_c" in func or "pydpm._C" in func or "launch_kernel" in func:
            return "_C"
        if "launch" in func and "triton" not in func:
            return "triton launch"
        if "native_specialize" in func:
            return "triton JIT"
        if "fill_tma" in func or "fill_1d_tma" in func or "fill_2d_tma" in func:
            return "descriptors"
        if "apply" in func and "FunctionBase" in func:
            return "autograd"
        if "torch" in func or "Tensor" in func or "method" in func:
            return "torch"
        return "other"
    if "/pydpm/" in f or "/kernels/" in f:
        if f.endswith("_framework.py"):
            return "checks" if func.startswith(("check", "fail")) else "dispatch"
        if f.endswith("_launch.py"):
            return "launcher"
        if func.startswith(("check", "_check", "_fail", "_coef_table", "_explain", "_like_x")):
            return "checks"
        return "pydpm"
    if "/triton/" in f:
        if "tensor_descriptor" in f or func in ("make_tensordesc_arg", "inner"):
            return "descriptors"
        if "driver" in f:
            return "triton launch"
        return "triton JIT" if f.endswith("runtime/jit.py") else "triton helpers"
    if "/torch/autograd/" in f:
        return "autograd"
    if "/torch/_library/" in f or f.endswith("/torch/_ops.py") or "/torch/_higher_order_ops/" in f:
        return "torch.library"
    if "/torch/" in f:
        return "torch"
    return "other"


def split(fn: Callable[[], Any], device: torch.device, calls: int) -> dict[str, float]:
    """Fractions of the host time per layer, from cProfile's self time over `calls` calls."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    _sync(device)()
    stats = pstats.Stats(profile).stats
    per_layer = dict.fromkeys(LAYERS, 0.0)
    for (filename, _, func), (_, _, tottime, _, _) in stats.items():
        per_layer[layer_of(filename, func)] += tottime
    total = sum(per_layer.values()) or 1.0
    return {k: v / total for k, v in per_layer.items()}


class _Recorder:
    """Records the Triton launches made through pydpm's launcher while it is active: (Kernel, grid, args, key,
    constexprs, options), the arguments as the launcher received them."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __enter__(self):
        from pydpm.kernels._launch import Kernel

        self._orig = Kernel.__call__
        launches, orig = self.launches, self._orig

        def call(kernel, grid, args, key, constexprs, num_warps=4, num_stages=3):
            launches.append((kernel, tuple(grid), list(args), key, dict(constexprs), num_warps, num_stages))
            return orig(kernel, grid, args, key, constexprs, num_warps, num_stages)

        Kernel.__call__ = call
        return self

    def __exit__(self, *exc):
        from pydpm.kernels._launch import Kernel

        Kernel.__call__ = self._orig


def launch_costs(fn: Callable[[], Any], device: torch.device, calls: int) -> list[dict]:
    """Per Triton launch of one call: µs through pydpm's launcher, through Triton's JIT, and through the
    compiled kernel's launcher alone (the floor of a Python-side launch)."""
    if device.type != "cuda":
        return []
    with _Recorder() as rec:
        fn()
    torch.cuda.synchronize(device)
    rows = []
    for kernel, grid, args, key, constexprs, warps, stages in rec.launches:
        g = tuple(grid) + (1,) * (3 - len(grid))
        ints = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        tail = [constexprs[n] for n in kernel.constexpr_names]
        compiled = kernel.fn[g](*args, **constexprs, num_warps=warps, num_stages=stages)
        launcher, stream = compiled.run, torch.cuda.current_stream(device).cuda_stream

        def ours():
            kernel(grid, list(args), key, constexprs, warps, stages)

        def via_jit():
            kernel.fn[g](*args, **constexprs, num_warps=warps, num_stages=stages)

        def direct():
            launcher(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *ints,
                     *tail)

        rows.append({"kernel": kernel.name, "args": len(args), "pydpm_us": per_call_us(ours, device, calls)[1],
                     "jit_us": per_call_us(via_jit, device, calls)[1],
                     "launcher_us": per_call_us(direct, device, calls)[1]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.host_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300, help="calls per timed loop (default 300)")
    parser.add_argument("--cases", default="", help="only cases whose name contains this text")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = []
    head = f"{'case':44s} {'wall us':>8s} {'host us':>8s}  {'peer':22s} {'wall us':>8s} {'host us':>8s} {'ratio':>6s}"
    print(head + "\n" + "-" * len(head), flush=True)
    for case in cases(device):
        if args.cases not in case.name:
            continue
        wall, host = per_call_us(case.call, device, args.calls)
        pwall, phost = per_call_us(case.peer_call, device, args.calls)
        layers = split(case.call, device, args.calls)
        launches = launch_costs(case.call, device, args.calls)
        results.append(dict(case=case.name, wall_us=wall, host_us=host, peer=case.peer, peer_wall_us=pwall,
                            peer_host_us=phost, split={k: v * host for k, v in layers.items()}, launches=launches))
        print(f"{case.name:44s} {wall:8.1f} {host:8.1f}  {case.peer:22s} {pwall:8.1f} {phost:8.1f} "
              f"{wall / pwall:5.2f}x", flush=True)
        print("    split (us): " + ", ".join(f"{k} {v * host:.1f}" for k, v in layers.items() if v * host >= 0.05))
        for row in launches:
            print(f"    launch {row['kernel']} ({row['args']} args): pydpm {row['pydpm_us']:.1f} us, Triton JIT "
                  f"{row['jit_us']:.1f} us, compiled launcher alone {row['launcher_us']:.1f} us")
    if args.out:
        args.out.write_text(json.dumps(dict(device=str(device), card=torch.cuda.get_device_name(device)
                                            if device.type == "cuda" else "cpu", torch=torch.__version__,
                                            results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
