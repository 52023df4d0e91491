"""Where a diffusers model's device time goes: one forward's CUDA kernels by kind, per way of running it.

    python -m pydpm.bench.device_profile [--model unet-sd15] [--batch 2 [8 ...]] [--top 12] [--train]

The model is one of bench/models.py's published configurations with random weights, fp16, in eval mode. Per
variant (diffusers eager; accelerate's fused blocks without a graph, NCHW and channels-last, the kernels
`accelerate` replays from its graph; torch.compile's kernels):
- `device ms`: the kernels' time per forward (torch.profiler over a few forwards), split by kind: layout
  (NCHW <-> NHWC conversions and copies), attention, inductor (torch.compile's generated Triton kernels), conv
  (cuDNN convolutions), gemm, norm, elementwise (the rest: torch's elementwise kernels, pydpm's fused kernels
  not named above);
  and the variant's `top` kernels by time;
- `wall ms` (the graphed `accelerate` and torch.compile): back-to-back calls per forward, host and device
  together, what a sampling loop pays.
With --train it profiles bench/models.py's training step instead (bf16: forward, a mean-square loss, backward
into every parameter) for diffusers eager, accelerate without graphs (TRAIN_VARIANTS: its default, with the
block ops, in channels-last, both) and torch.compile: per variant the device time by kind and the top kernels,
the wall time per step, the host time of the forward and of the backward (enqueued after a synchronisation),
and the `top` host operators by their own host time (torch.profiler's CPU events). accelerate's graphed
training step is timed by `pydpm bench --models --cases train`.
It is the tool that found cuDNN converting every NCHW input of SD1.5's convolutions to NHWC (3.1 of 11.9 ms at
batch 2 on an H200), which `accelerate` now avoids by putting convolutional networks in channels-last memory.
"""
from __future__ import annotations

import argparse
import collections
import re
import time
from typing import Callable

import torch

from .host_cost import per_call_us
from .models import MODELS, _cast, build, forward, model_inputs

# (kind, regex on the kernel's name), first match wins
KINDS = (("layout", r"nchwToNhwc|nhwcToNchw|transpose|permute|[Cc]opy"),
         ("attention", r"attn|attention|flash|fmha"),
         ("inductor", r"^triton_(poi|red|per)_"),
         ("conv", r"conv|fprop|implicit|dgrad|wgrad"),
         ("gemm", r"gemm|Gemm|cutlass|cublas|nvjet|splitK|gemv"),
         ("norm", r"norm|Norm|group|RowwiseMoments"),
         ("elementwise", r"."))


def kind(kernel: str) -> str:
    """The kind of a CUDA kernel, from its name (KINDS)."""
    for name, pattern in KINDS:
        if re.search(pattern, kernel):
            return name
    raise AssertionError("KINDS ends with a catch-all")


def kernel_times(fn: Callable[[], object], calls: int = 3, grad: bool = False,
                 host: dict[str, float] | None = None) -> dict[str, float]:
    """µs per call of every CUDA kernel `fn` launches (after three warm-up calls), under torch.no_grad unless
    `grad`; `host`, if given, receives the µs per call of host time of every operator (its own, CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host is not None else [])
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    times: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.key] += event.device_time_total / calls
        elif host is not None and event.device_type == torch.autograd.DeviceType.CPU:
            host[event.key] = host.get(event.key, 0.0) + event.self_cpu_time_total / calls
    return dict(times)


def by_kind(times: dict[str, float]) -> dict[str, float]:
    """µs per kind (KINDS order), from `kernel_times`."""
    totals = dict.fromkeys((name for name, _ in KINDS), 0.0)
    for kernel, us in times.items():
        totals[kind(kernel)] += us
    return totals


def wall_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """ms per call of back-to-back inference calls with one synchronisation (host_cost.per_call_us)."""
    with torch.no_grad():
        return per_call_us(fn, torch.device("cuda"), calls)[0] / 1e3


def report(label: str, times: dict[str, float], top: int, wall: float | None = None) -> list[str]:
    kinds = by_kind(times)
    head = f"{label}: device {sum(kinds.values()) / 1e3:.2f} ms" + (f", wall {wall:.2f} ms" if wall else "")
    lines = [head, "  " + ", ".join(f"{k} {us / 1e3:.2f}" for k, us in kinds.items())]
    for kernel, us in sorted(times.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {us:9.1f} us  {kind(kernel):11s} {kernel[:100]}")
    return lines


def _model(name: str, batch: int, train: bool):
    """(model `name` on CUDA with random weights, its inputs at `batch`): bf16 in training mode with every
    parameter requiring grad (`train`), else fp16 in eval mode without grads."""
    dtype = torch.bfloat16 if train else torch.float16
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = _cast(build(name), dtype).train(train).requires_grad_(train)
    return model, model_inputs(name, batch, dtype, device)


# accelerate's options per --train variant: its default without graphs (attention alone), then the block ops and
# the channels-last layout it leaves out there, one at a time and together
TRAIN_VARIANTS: tuple[dict[str, bool], ...] = ({}, {"blocks": True}, {"channels_last": True},
                                               {"blocks": True, "channels_last": True})


def train_report(label: str, step: Callable[[], tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]],
                 top: int) -> list[str]:
    """The --train lines of one variant; `step()` returns (forward to the loss, backward of a loss)."""
    def full():
        forward_, backward_ = step()
        backward_(forward_())

    host: dict[str, float] = {}
    times = kernel_times(full, grad=True, host=host)
    wall, _ = per_call_us(full, torch.device("cuda"), 10)
    fwd_host = bwd_host = float("inf")
    for _ in range(5):
        forward_, backward_ = step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = forward_()
        middle = time.perf_counter()
        backward_(loss)
        end = time.perf_counter()
        torch.cuda.synchronize()
        fwd_host, bwd_host = min(fwd_host, middle - start), min(bwd_host, end - middle)
    lines = report(label, times, top, wall / 1e3)
    lines.insert(1, f"  host: forward {fwd_host * 1e3:.2f} ms, backward {bwd_host * 1e3:.2f} ms")
    lines.append("  host operators (own µs per step):")
    for name, us in sorted(host.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {us:9.1f} us  {name[:100]}")
    return lines


def train(args: argparse.Namespace, batch: int) -> None:
    from pydpm.integrations.diffusers import accelerate, restore

    model, inputs = _model(args.model, batch, train=True)

    def stepper(fn: Callable[..., object]):
        def step():
            model.zero_grad(set_to_none=True)
            return (lambda: forward(args.model, fn, inputs).float().square().mean()), (lambda loss: loss.backward())
        return step

    print(f"{args.model} training step at batch {batch}, bf16, {torch.cuda.get_device_name()}:")
    print(*train_report("diffusers eager", stepper(model), args.top), sep="\n")
    for options in TRAIN_VARIANTS:
        done = accelerate(model, cuda_graph=False, **options)
        label = f"accelerate[no graph]({', '.join(f'{k}={v}' for k, v in options.items())}): {', '.join(done.swapped)}"
        print(*train_report(label, stepper(model), args.top), sep="\n")
        restore(model)
    print(*train_report("torch.compile", stepper(torch.compile(model)), args.top), sep="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.device_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="unet-sd15")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="one profile per batch (default: 2)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant (default: 12)")
    parser.add_argument("--train", action="store_true", help="profile the bf16 training step instead of a forward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (it profiles CUDA kernels)")
    for batch in args.batch:
        (train if args.train else forward_profile)(args, batch)
    return 0


def forward_profile(args: argparse.Namespace, batch: int) -> None:
    from pydpm.integrations.diffusers import accelerate, restore

    model, inputs = _model(args.model, batch, train=False)

    def call(m=model):
        return forward(args.model, m, inputs)

    print(f"{args.model} at batch {batch}, fp16, {torch.cuda.get_device_name()}; per forward:")
    print(*report("diffusers eager", kernel_times(call), args.top, wall_ms(call)), sep="\n")
    for layout in (False, True):
        accelerate(model, cuda_graph=False, blocks=True, channels_last=layout)
        times = kernel_times(call)
        restore(model)
        accelerate(model)  # what it graphs by default (its layout and blocks)
        wall = wall_ms(call) if layout else None
        restore(model)
        name = "accelerate's kernels, " + ("channels-last (graphed: the wall time)" if layout else "NCHW")
        print(*report(name, times, args.top, wall), sep="\n")
    compiled = torch.compile(model)
    print(*report("torch.compile", kernel_times(lambda: call(compiled)), args.top, wall_ms(lambda: call(compiled))),
          sep="\n")


if __name__ == "__main__":
    raise SystemExit(main())
