"""pydpm's benchmark suite: `pydpm bench [--quick] [--ops ...] [--cases REGEX] [--device cpu|cuda] [--out DIR]`.

One harness (harness.py) and one thin file per op family that declares its cases and peers. From a checkout,
`python -m bench` runs the same suite; `python -m pytest bench --benchmark-only` runs a few cases under
pytest-benchmark.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from . import harness

# One module of this package per op family, and `models`: pydpm inside real diffusers models.
OPS = ("solver_step", "samplers", "wavelet", "frequency", "attention", "models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydpm bench", description="Time every pydpm op on each of its backends against its peers, side by "
        "side on the device at hand; print a table and write results.json and results.md.")
    parser.add_argument("--out", type=Path, help="results folder (default: bench-results/<card>-<date>)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="op families to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    parser.add_argument("--cases", metavar="REGEX", help="only the cases whose label ('attn+bwd (2,8,4096,40) fp16') "
                        "matches REGEX (re.search)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available); CPU runs use small shapes and fp32")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run the benchmark suite with command-line arguments `argv`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; run with --device cpu")
    modules = {name: importlib.import_module(f".{name}", __name__) for name in args.ops}
    return harness.run_suite(modules, torch.device(args.device), quick=args.quick, out=args.out, cases=args.cases)
