"""`pydpm bench --compare OLD NEW [--threshold PCT]`: two runs side by side, row by row.

Rows match on (op, case, shape, dtype, impl). Each matched row gets the ratio of its eager us (wall time per
call of back-to-back calls, what a model pays) NEW / OLD; a row more than the threshold slower, or one that
ran in OLD and fails in NEW, is a regression, and any regression makes the exit status 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .harness import load_results

Key = tuple[str, str, str, str, str]


def _key(row: dict[str, Any]) -> Key:
    return row["op"], row["case"], row["shape"], row["dtype"], row["impl"]


def _broken(row: dict[str, Any]) -> bool:
    return row["note"].startswith(("FAILED", "MISMATCH"))


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[list[str], int]:
    """(the report's lines, the number of regressions) of the results `new` against `old`; `threshold` is a
    fraction (0.1: more than 10% slower is a regression)."""
    old_rows = {_key(r): r for r in old["rows"]}
    new_rows = {_key(r): r for r in new["rows"]}
    header = f"{'op':12} {'case':10} {'shape':16} {'dtype':5} {'impl':24} {'old us':>10} {'new us':>10} {'new/old':>8}"
    lines = [header, "-" * len(header)]
    regressions = faster = within = 0
    for key, n in new_rows.items():
        o = old_rows.get(key)
        if o is None:
            continue
        flag, cells = "", f"{key[0]:12} {key[1]:10} {key[2]:16} {key[3]:5} {key[4]:24}"
        if _broken(n) and not _broken(o):
            regressions += 1
            old_us = f"{o['loop_us']:10.1f}" if o["loop_us"] else f"{'-':>10}"
            lines.append(f"{cells} {old_us} {'-':>10} {'-':>8}  REGRESSION: now {n['note']}")
            continue
        if not (o["loop_us"] and n["loop_us"]):
            continue
        ratio = n["loop_us"] / o["loop_us"]
        if ratio > 1 + threshold:
            regressions += 1
            flag = f"  REGRESSION (> {threshold:.0%} slower)"
        elif ratio < 1 / (1 + threshold):
            faster += 1
            flag = "  faster"
        else:
            within += 1
        lines.append(f"{cells} {o['loop_us']:10.1f} {n['loop_us']:10.1f} {ratio:7.2f}x{flag}")
    only_old, only_new = len(old_rows.keys() - new_rows.keys()), len(new_rows.keys() - old_rows.keys())
    lines.append(f"{regressions} regression{'s' if regressions != 1 else ''}, {faster} faster by more than "
                 f"{threshold:.0%}, {within} within it; rows only in OLD: {only_old}, only in NEW: {only_new}")
    return lines, regressions


def _describe(file: Path, data: dict[str, Any]) -> str:
    meta = data["meta"]
    return f"{file}: {meta['card']}, commit {meta['git']}, {meta['date_utc']} UTC"


def main(old_path: Path, new_path: Path, threshold: float) -> int:
    """Prints the comparison of the runs at `old_path` and `new_path`; 1 when a row regressed, else 0."""
    try:
        (old_file, old), (new_file, new) = load_results(old_path), load_results(new_path)
    except ValueError as exc:
        print(f"--compare: {exc}")
        return 2
    print(f"OLD {_describe(old_file, old)}\nNEW {_describe(new_file, new)}")
    if old["meta"]["card"] != new["meta"]["card"]:
        print(f"different cards ({old['meta']['card']}, {new['meta']['card']}): the ratios compare the cards too")
    print(f"eager us per call, NEW / OLD; a regression: more than {threshold:.0%} slower\n")
    lines, regressions = compare(old, new, threshold)
    print(*lines, sep="\n")
    return 1 if regressions else 0
