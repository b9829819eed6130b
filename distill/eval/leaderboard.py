"""Leaderboards from result rows: a rich table, a markdown table, and a plot of the metric against NFE.

Rows are grouped by (protocol, metric, feature extractor): only numbers measured the same way share a
table. Within a group the last row read wins for each (model, sampler, grid, steps): files are read in the
order given (``distill leaderboard`` with no files: sorted by name), rows in file order. Every table shows the
protocol's data-vs-data floor.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

from distill.errors import DistillError


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        p = Path(p)
        try:
            lines = p.read_text().splitlines()
        except OSError as exc:
            raise DistillError(f"cannot read results file {p}: {exc.strerror}.") from exc
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DistillError(f"{p}:{i} is not a JSON row ({exc.msg}).") from exc
    return rows


def _group_key(r: dict[str, Any]) -> tuple:
    return (r["protocol"]["name"], r["protocol"]["key"], r["metric"], r["extractor"]["name"], r["extractor"]["weights_hash"])


def group(rows: list[dict[str, Any]]) -> "OrderedDict[tuple, dict[str, Any]]":
    """{group key: {"floor": row, "series": {(model, sampler, grid): {steps: row}}}} with the newest rows."""
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for r in rows:
        try:
            g = groups.setdefault(_group_key(r), {"floor": None, "series": OrderedDict()})
        except (KeyError, TypeError) as exc:
            raise DistillError(f"a result row lacks protocol/metric/extractor keys: {str(r)[:120]}") from exc
        if r.get("method") == "data-floor":
            g["floor"] = r
        else:
            g["series"].setdefault((r["model"], r["sampler"], r.get("grid")), {})[r["steps"]] = r
    return groups


def _label(series_key: tuple) -> str:
    model, sampler, grid = series_key
    return f"{model} · {sampler}" + (f" ({grid})" if grid and grid not in ("trailing", "student") else "")


def _columns(g: dict[str, Any]) -> list[int]:
    return sorted({k for pts in g["series"].values() for k in pts})


def _best(g: dict[str, Any], k: int) -> float | None:
    vals = [pts[k]["value"] for pts in g["series"].values() if k in pts]
    return min(vals) if vals else None


def _cell(r: dict[str, Any]) -> str:
    v = f"{r['value']:.2f}"
    return v if r["nfe"] == r["steps"] else f"{v} ({r['nfe']} NFE)"


def title(key: tuple) -> str:
    proto, _, metric, extractor, h = key
    return f"{metric} on protocol '{proto}' ({extractor} {h[:8]}), by sampling steps; lower is better"


def rich_tables(rows: list[dict[str, Any]]) -> list:
    from rich.table import Table

    tables = []
    for key, g in group(rows).items():
        cols = _columns(g)
        t = Table(title=title(key), title_justify="left")
        t.add_column("model · sampler")
        for k in cols:
            t.add_column(str(k), justify="right")
        for skey, pts in g["series"].items():
            cells = []
            for k in cols:
                if k not in pts:
                    cells.append("")
                elif pts[k]["value"] == _best(g, k):
                    cells.append(f"[bold green]{_cell(pts[k])}[/bold green]")
                else:
                    cells.append(_cell(pts[k]))
            t.add_row(_label(skey), *cells)
        if g["floor"] is not None:
            f = g["floor"]
            t.add_row(f"data floor (real half B vs A, n={f['n']})", *[f"{f['value']:.2f}"] * max(1, len(cols)), style="dim")
        tables.append(t)
    return tables


def markdown(rows: list[dict[str, Any]], plots: dict[tuple, str] | None = None,
             source: str = "by `distill leaderboard` from the JSONL rows in `evals/results/`") -> str:
    out = ["# Leaderboard", "", f"Generated {source}. Cells are the "
           "metric at that many sampling steps (NFE in brackets where it differs); **bold** is the best at that step "
           "count. The data floor is the same metric between two disjoint halves of the real data, with the same "
           "sample count as every model.", ""]
    for key, g in group(rows).items():
        cols = _columns(g)
        out += [f"## {title(key)}", ""]
        measured = [r for pts in g["series"].values() for r in pts.values()]
        if measured:
            r0 = measured[0]
            machines = sorted({str(r.get("machine", "an unrecorded machine")) for r in measured})
            gits = sorted({str(r.get("git")) for r in measured})
            out.append(f"n = {r0['n']} samples per point, seeds {r0['seed']}.., measured on {'; '.join(machines)}; "
                       f"git {', '.join(gits)}.")
            out.append("")
        out.append("| model · sampler | " + " | ".join(str(k) for k in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for skey, pts in g["series"].items():
            cells = []
            for k in cols:
                if k not in pts:
                    cells.append("")
                else:
                    c = _cell(pts[k])
                    cells.append(f"**{c}**" if pts[k]["value"] == _best(g, k) else c)
            out.append(f"| {_label(skey)} | " + " | ".join(cells) + " |")
        if g["floor"] is not None:
            f = g["floor"]
            out.append("| *data floor (real half B vs A)* | " + " | ".join([f"*{f['value']:.2f}*"] * len(cols)) + " |")
        out.append("")
        if plots and key in plots:
            out += [f"![{title(key)}]({plots[key]})", ""]
        grids = [(skey, k, r["grid_png"]) for skey, pts in g["series"].items() for k, r in pts.items() if r.get("grid_png")]
        if grids:
            out.append("Sample grids (first 64 samples of each point): " + ", ".join(
                f"[{_label(s)} {k}]({p})" for s, k, p in grids))
            out.append("")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], folder: str | Path) -> dict[tuple, Path]:
    """One PNG per group: metric against NFE (log-log), a line per model · sampler, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, g in group(rows).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = ["-", "--", ":", "-."]
        markers = ["o", "s", "^", "D", "v", "P"]
        for i, (skey, pts) in enumerate(g["series"].items()):
            pts_sorted = sorted(pts.values(), key=lambda r: r["nfe"])
            # distinct styles: samplers with the same math (DDIM and Euler) would otherwise hide each other
            ax.plot([r["nfe"] for r in pts_sorted], [r["value"] for r in pts_sorted], marker=markers[i % 6],
                    linestyle=styles[i % 4], label=_label(skey))
        if g["floor"] is not None:
            ax.axhline(g["floor"]["value"], color="gray", linestyle="--", label="data floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(key[2])
        ax.set_title(f"{key[2]} against NFE, protocol '{key[0]}'", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{key[0]}-{key[3]}-{key[1][:6]}{key[4][:6]}.png"  # protocol key + weights hash: no collisions
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[key] = path
    return paths


def relink_grids(md: str, base: str | Path) -> str:
    """Rewrite relative ``(path.png)`` links in ``md`` (relative to the working directory) to be relative to
    ``base``, the folder the markdown file is written to."""
    import os
    import re

    def fix(m: "re.Match[str]") -> str:
        target = m.group(1)
        if target.startswith("http") or not Path(target).exists():
            return m.group(0)
        return f"]({os.path.relpath(target, base)})"

    return re.sub(r"\]\(([^)]+\.png)\)", fix, md)
