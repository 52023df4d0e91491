"""Command line: `pydpm info` (build, devices, backends and why others are unavailable), `pydpm bench`,
`pydpm --version`.

Output piped into a reader that stops early (`pydpm info | head -3`) ends the command quietly with exit
status 141, the status of a command killed by SIGPIPE, as `cat` and other shell tools report it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

# 128 + SIGPIPE: what the shell reports for a command whose reader closed the pipe.
EXIT_BROKEN_PIPE = 141


def info() -> dict[str, Any]:
    """Version, build info of `_C` (or its load error), devices, and per-op backend availability."""
    import torch

    from pydpm import __version__, _backend
    from pydpm.ops import REGISTRY

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    ops = {}
    for name, op in REGISTRY.items():
        probe = next(iter(op.sample_inputs(device, torch.float32, small=True)))[1]
        ops[name] = op.not_supported_reasons(op.check(**probe))
    return {
        "pydpm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "build": _backend.build_info() or {"load_error": _backend.C_LOAD_ERROR},
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "triton": _backend.triton_reason(device, forced=False) or "available",
        "ops": ops,
    }


def _print_info() -> int:
    data = info()
    for key in ("pydpm", "python", "torch", "device", "triton"):
        print(f"{key:8s} {data[key]}")
    print("build    " + ", ".join(f"{k}={v}" for k, v in data["build"].items()))
    for op, reasons in data["ops"].items():
        print(f"op {op} (float32 on {data['device']}):")
        for backend, why in reasons.items():
            print(f"  {backend:10s} {'available' if not why else 'unavailable: ' + '; '.join(why)}")
    return 0


def _run(argv: list[str]) -> int:
    from pydpm import __version__

    parser = argparse.ArgumentParser(prog="pydpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pydpm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build, devices and available backends")
    sub.add_parser("bench", help="run the benchmark suite (pydpm bench --help for options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return _print_info()
    from pydpm.bench import run

    return run(rest)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _run(argv if argv is not None else sys.argv[1:])
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's flush at exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status
