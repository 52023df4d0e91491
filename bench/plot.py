"""Plots of a run, one PNG per op family (matplotlib, optional): `pydpm bench --plot RESULTS... [--out DIR]`, and
at the end of every run when matplotlib is importable.

A family's figure has one panel per pydpm implementation: its speed-up over each peer on eager us (the peer's
wall time per call over its own, log scale, one bar group per case), and a last panel with the fraction of
the measured ceiling of each pydpm implementation and of the best peer (device time).
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

from .harness import link_plots, load_results, slug

MISSING = "pip install matplotlib to draw them"
Group = tuple[str, list[tuple[str, float]]]  # a case's label and its bars (name, value)
Panel = tuple[str, list[Group], bool]  # title, bar groups, log scale (speed-ups) or linear (percentages)


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _label(row: dict[str, Any]) -> str:
    return f"{row['case']} {row['shape']} {row['dtype']}"


def _usable(row: dict[str, Any]) -> bool:
    return not row["note"].startswith(("FAILED", "MISMATCH"))


def _speedups(cases: dict[str, list[dict[str, Any]]], by_ours: bool) -> list[Panel]:
    """Speed-up panels, one per pydpm implementation (bars: the peers) or one per peer (bars: the pydpm
    implementations)."""
    pairs: dict[str, list[Group]] = {}
    for label, case_rows in cases.items():
        ours = [r for r in case_rows if r["ours"] and r["loop_us"] and _usable(r)]
        peers = [r for r in case_rows if not r["ours"] and r["loop_us"]]
        bars: dict[str, list[tuple[str, float]]] = {}
        for mine in ours:
            for peer in peers:
                outer, inner = (mine, peer) if by_ours else (peer, mine)
                bars.setdefault(outer["impl"], []).append((inner["impl"], peer["loop_us"] / mine["loop_us"]))
        for outer, found in bars.items():
            pairs.setdefault(outer, []).append((label, found))
    title = "{}: speed-up over each peer (the peer's eager us / its own)" if by_ours else \
        "speed-up over {} (its eager us / pydpm's)"
    return [(title.format(name), groups, True) for name, groups in pairs.items()]


def panels(rows: list[dict[str, Any]]) -> list[Panel]:
    """The panels of a family's `rows`: the speed-ups on eager us of the pydpm implementations over the peers,
    per case, one panel per pydpm implementation or one per peer, whichever makes fewer; then the percentage
    of the ceiling of every pydpm implementation and of the best peer, per case."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        cases.setdefault(_label(row), []).append(row)
    found = min(_speedups(cases, by_ours=True), _speedups(cases, by_ours=False), key=len)
    ceiling = []
    for label, case_rows in cases.items():
        bars = [(r["impl"], 100 * r["of_ceiling"]) for r in case_rows if r["ours"] and r["of_ceiling"] and _usable(r)]
        peers = [100 * r["of_ceiling"] for r in case_rows if not r["ours"] and r["of_ceiling"]]
        bars += [("best peer", max(peers))] if peers else []
        if bars:
            ceiling.append((label, bars))
    return found + ([("% of the measured ceiling (device us)", ceiling, False)] if ceiling else [])


def _figure(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"


LABELLED_BARS = 60  # a panel with more bars leaves their values off (they would overlap)


def plot_family(rows: list[dict[str, Any]], title: str, path: Path) -> bool:
    """Draws the family's `rows` into the PNG `path`; False (nothing written) when no panel has a bar."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no backend or global state to set
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from PIL import Image

    found = panels(rows)
    if not found:
        return False
    names = list(dict.fromkeys(name for _, groups, _ in found for _, bars in groups for name, _ in bars))
    palette = colormaps["tab20"].colors
    color = {name: ("0.6" if name == "best peer" else palette[i % len(palette)]) for i, name in enumerate(names)}
    widest = max(len(groups) * max(len(bars) for _, bars in groups) for _, groups, _ in found)
    fig = Figure(layout="constrained", figsize=(min(18.0, max(8.0, 3.0 + 0.16 * widest)), 0.5 + 2.6 * len(found)))
    axes = fig.subplots(len(found), 1, squeeze=False)
    for ax, (panel_title, groups, log) in zip(axes[:, 0], found):
        width = 0.8 / max(len(bars) for _, bars in groups)
        base = 1.0 if log else 0.0  # speed-ups grow up from 1x (faster) or down from it (slower)
        labelled = sum(len(bars) for _, bars in groups) <= LABELLED_BARS
        shown = set()
        for i, (_, bars) in enumerate(groups):
            for j, (name, value) in enumerate(bars):
                x = i + (j - (len(bars) - 1) / 2) * width
                ax.bar(x, value - base, width, bottom=base, color=color[name], label=None if name in shown else name)
                if labelled:
                    ax.annotate(_figure(value), (x, value), ha="center",
                                va="bottom" if value >= base else "top", fontsize=6)
                shown.add(name)
        values = [value for _, bars in groups for _, value in bars]
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(min(values), 1.0) / 1.5, max(max(values), 1.0) * 1.5)
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.axhline(1.0, color="black", linewidth=0.8)
        else:
            ax.set_ylim(0.0, max(max(values), 100.0) * 1.1)
            ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(panel_title, fontsize=9, loc="left")
        ax.set_xticks(range(len(groups)), [label for label, _ in groups], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=72)
    # a palette of 256 colours (matplotlib depends on Pillow): a third of the bytes, for READMEs and repositories
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return True


def _run(meta: dict[str, str]) -> str:
    return f"commit {meta['git'].split()[0]}, {meta['date_utc']} UTC"


def plot_results(data: dict[str, Any], folder: Path, prefix: str = "", runs: str | None = None) -> list[Path]:
    """One PNG per op family of the results `data`, <prefix><family>.png in `folder`; the paths written. `runs`
    names the runs the rows come from in the titles (default: data's own)."""
    written = []
    for family in dict.fromkeys(r["op"] for r in data["rows"]):
        path = folder / f"{prefix}{family}.png"
        title = f"pydpm {family} on {data['meta']['card']} ({runs or _run(data['meta'])})"
        if plot_family([r for r in data["rows"] if r["op"] == family], title, path):
            written.append(path)
    return written


def main(paths: list[Path], out: Path | None) -> int:
    """Plots the runs at `paths`, per card and op family, each case from the newest run that has it (meta
    date_utc). Into `out` as bench-<card>-<family>.png, or else beside the newest of those runs' results
    (<family>.png beside a results.json, else <its name>-<family>.png) and linked from its results.md."""
    if not available():
        print(f"--plot: matplotlib is not installed ({MISSING})")
        return 1
    runs = []
    for path in paths:
        try:
            runs.append(load_results(path))
        except ValueError as exc:
            print(f"skipped {exc}")
    runs.sort(key=lambda run: run[1]["meta"]["date_utc"])
    newest: dict[tuple[str, str], dict[str, tuple[Path, dict[str, Any]]]] = {}  # (card, family) -> case -> run
    for file, data in runs:
        for row in data["rows"]:
            newest.setdefault((slug(data["meta"]["card"]), row["op"]), {})[_label(row)] = (file, data)
    written: dict[Path, list[Path]] = {}
    for (card, family), chosen in newest.items():
        used = list({id(data): (file, data) for file, data in chosen.values()}.values())
        rows = [r for file, data in used for r in data["rows"] if r["op"] == family and chosen[_label(r)][1] is data]
        file, data = used[-1]
        family_data = {**data, "rows": rows}
        runs_title = "; ".join(_run(d["meta"]) for _, d in used)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            plots = plot_results(family_data, out, f"bench-{card}-", runs_title)
        else:
            prefix = "" if file.name == "results.json" else f"{file.stem}-"
            plots = plot_results(family_data, file.parent, prefix, runs_title)
        written.setdefault(file, []).extend(plots)
        sources = ", ".join(str(f) for f, _ in used)
        print(f"{family} ({data['meta']['card']}; {sources}): {', '.join(map(str, plots)) or 'nothing to plot'}")
    for file, plots in written.items():
        md = file.with_suffix(".md")
        if out is None and plots and md.is_file():
            link_plots(md, plots)
            print(f"linked from {md}")
    return 0
