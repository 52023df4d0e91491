"""Sweep the attention kernels' launch configurations on the present GPU: the table behind
`kernels/attention.py`'s CONFIGS comes from this.

For each benchmark shape (bench/attention.py) and dtype (fp16, fp32; bf16 takes fp16's table), every
candidate (BLOCK_M, BLOCK_N, warps, stages) × (tensor-descriptor or pointer loads) of the forward, the dk/dv
and the dq kernel is timed (median device time, the harness's `measure`: launches queued behind a blocking
kernel, so the host's launch cost stays out of it) and checked against SDPA's outputs in the
same dtype; a configuration that does not fit the chip (shared memory) is listed as such. Compilation runs
first in parallel processes (Triton's disk cache), then one process times everything.

    python -m pydpm.bench.attention_tune --out DIR [--jobs 16] [--configured]

Writes DIR/attention_tune.json (every timing) and prints the best configuration per kernel, shape and dtype
(--configured: the table's entries only, each with both load paths, printed side by side).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import SHAPES
from .harness import Timing, measure

TIMING = Timing(warmup_ms=5, rep_ms=25, host_calls=0)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
WARPS_STAGES = {"fp16": [(4, 2), (4, 3), (4, 4), (8, 3)], "fp32": [(4, 2), (4, 3), (8, 2)]}
BLOCKS = {
    ("fwd", "fp16"): [(64, 64), (64, 128), (128, 32), (128, 64), (128, 128)],
    ("fwd", "fp32"): [(64, 32), (64, 64), (128, 32), (128, 64)],
    ("dkdv", "fp16"): [(32, 64), (32, 128), (64, 64), (64, 128), (128, 64)],
    ("dkdv", "fp32"): [(32, 32), (32, 64), (64, 32), (64, 64), (16, 64)],
    ("dq", "fp16"): [(64, 32), (128, 32), (64, 64), (128, 64)],
    ("dq", "fp32"): [(32, 32), (64, 32), (32, 64), (64, 64), (128, 16)],
}


def candidates(kind: str, dt: str, D: int, NK: int, configured: bool):
    """Launch configurations: the whole grid, or (configured) the table's entry with either load path."""
    from pydpm.kernels.attention import Blocks, configs
    if configured:
        entry = configs(D, NK, DTYPES[dt], False)[1 + ("fwd", "dkdv", "dq").index(kind)]
        yield from (dataclasses.replace(entry, tma=True), dataclasses.replace(entry, tma=False))
        return
    for (m, n), (w, s), tma in itertools.product(BLOCKS[kind, dt], WARPS_STAGES[dt], (True, False)):
        yield Blocks(m, n, w, s, tma)


def inputs(shape, nk, dtype, seed=0):
    B, H, NQ, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(B, H, NQ, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H, nk, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return q, k, v, do


def run(kind, blocks, q, k, v, do, o=None, lse=None):
    """One launch of the kernel `kind` ('fwd', or the backward with one of its kernels set by `blocks`)."""
    import pydpm.kernels.attention as ka
    scale = q.shape[-1] ** -0.5
    if kind == "fwd":
        return _forward(q, k, v, blocks)[:1]
    _, _, dkdv, dq = ka.configs(q.shape[-1], k.shape[2], q.dtype, False)
    pair = (blocks, dq) if kind == "dkdv" else (dkdv, blocks)
    dq_, dk_, dv_ = ka.attention_bwd(do, q, k, v, o, lse, scale, "bhnd", False, False, pair)
    return (dk_, dv_) if kind == "dkdv" else (dq_,)


def jobs(configured: bool = False):
    for dt, (shape, nk), kind in itertools.product(DTYPES, SHAPES, ("fwd", "dkdv", "dq")):
        for blocks in candidates(kind, dt, shape[3], nk, configured):
            yield dt, shape, nk, kind, blocks


def _compile(job):
    dt, shape, nk, kind, blocks = job
    q, k, v, do = inputs(shape, nk, DTYPES[dt])
    o, lse = _forward(q, k, v)
    try:
        run(kind, blocks, q, k, v, do, o, lse)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - out of resources etc.: recorded, timed as missing
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _forward(q, k, v, blocks=None):
    """(o, lse) of the forward kernel, at `blocks` or the table's configuration."""
    import pydpm.kernels.attention as ka
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    ka.attention_fwd(q, k, v, o, lse, q.shape[-1] ** -0.5, "bhnd", False, False, blocks)
    return o, lse


def _expected(kind, q, k, v, do):
    """SDPA's outputs in the same dtype (the efficient backend: fp32 too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        o = F.scaled_dot_product_attention(qq, kk, vv)
        o.backward(do)
    return {"fwd": (o.detach(),), "dkdv": (kk.grad, vv.grad), "dq": (qq.grad,)}[kind]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--configured", action="store_true",
                    help="time only the CONFIGS entries, with descriptor and with pointer loads")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = list(jobs(args.configured))
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        errors = dict(zip(map(str, todo), pool.map(_compile, todo, chunksize=4)))
    print(f"compiled {len(todo)} launches in {time.time() - t0:.0f} s", flush=True)
    rows, best = [], {}
    for (dt, shape, nk, kind), group in itertools.groupby(todo, key=lambda j: j[:4]):
        q, k, v, do = inputs(shape, nk, DTYPES[dt], seed=1)
        o, lse = _forward(q, k, v)
        expected = _expected(kind, q, k, v, do)
        B, H, NQ, D = shape
        flops = 4 * B * H * NQ * nk * D * (1 if kind == "fwd" else 2.5)  # the backward: 5 matmuls to 2
        for job in group:
            blocks = job[4]
            row = {"dtype": dt, "shape": shape, "nk": nk, "kernel": kind, "blocks": [blocks.m, blocks.n],
                   "warps": blocks.warps, "stages": blocks.stages, "tma": blocks.tma, "error": errors[str(job)]}
            if row["error"] is None:
                got = run(kind, blocks, q, k, v, do, o, lse)
                err = max(((g.float() - e.float()).abs().max() / e.float().abs().max()).item()
                          for g, e in zip(got, expected))
                row["rel_err"] = err
                ms = measure(lambda: run(kind, blocks, q, k, v, do, o, lse), q.device, TIMING)[0]
                row["ms"], row["tflops"] = ms, flops / ms / 1e9
                key = (dt, tuple(shape), nk, kind)
                if err < 5e-2 and (key not in best or ms < best[key]["ms"]):
                    best[key] = row
            rows.append(row)
    (args.out / "attention_tune.json").write_text(json.dumps(rows, indent=1))
    if args.configured:
        print("configured launches: descriptor loads vs pointer loads (µs; the backward rows time the whole backward)")
        for (dt, shape, nk, kind), group in itertools.groupby(rows, key=lambda r: (r["dtype"], tuple(r["shape"]),
                                                                                     r["nk"], r["kernel"])):
            cells = {r["tma"]: (f"{r['ms'] * 1e3:.1f} (err {r['rel_err']:.0e})" if r.get("ms") else r["error"])
                     for r in group}
            print(f"{dt} {shape} nk={nk} {kind}: tma {cells.get(True)} | pointer {cells.get(False)}")
        return 0
    print("best per kernel (the time of the forward, or of the whole backward: δ, dk/dv and dq, the other kernel "
          "at its current CONFIGS entry)")
    for (dt, shape, nk, kind), r in sorted(best.items()):
        print(f"{dt} {shape} nk={nk} {kind}: {r['blocks']} w{r['warps']} s{r['stages']} tma={int(r['tma'])} "
              f"{r['ms'] * 1e3:.1f} us {r['tflops']:.0f} TFLOP/s err {r['rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
