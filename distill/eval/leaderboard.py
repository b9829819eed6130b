"""Leaderboards from result rows: a rich table, a markdown table, and a plot of the metric against NFE.

Rows are grouped by (protocol, metric, feature extractor): only numbers measured the same way share a
table. Within a group the last row read wins for each (model, sampler, grid, steps): files are read in the
order given (``distill leaderboard`` with no files: sorted by name), rows in file order. Every table shows the
protocol's data-vs-data floor.

Conditional models' rows carry their classifier-free guidance scale: each scale is a series of its own
("teacher · ddim (w=3)"). Where rows carry 95% bootstrap intervals (``value_ci``, ``accuracy_ci``) a cell reads
``4.15 [3.95, 4.37]`` and every value tied with the best one is bold with it (a tie, not a ranking): two rows are
tied where their FD intervals overlap and, where both carry KID (``kid``, ``kid_se``), their KID intervals
(KID +- 1.96 standard errors) overlap too; either measure that separates them ranks them. Rows with KID get a KID
table, and rows of a pooled protocol (``draws`` > 1: the headline is FD over all draws, bias-corrected) a table
of their first draw's plain FD (``single``), the number a one-draw protocol and older rows give. Rows without
intervals (older results) render as they always did. Rows with prompt accuracy get a
second table (accuracy as a percentage, higher is better) and, across several guidance scales, a trade-off plot
of the metric against prompt accuracy.
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


def best_training_free(rows: list[dict[str, Any]], nfe: int, teacher: str | None = None) -> dict[str, Any] | None:
    """The lowest-FD row among a teacher's training-free samplers at ``nfe`` network evaluations or fewer (any
    sampler, any guidance scale; guided steps count two), or None: what a distilled student at that NFE has to beat,
    since a user who does not distil runs exactly these."""
    cands = [r for r in rows if r.get("method") == "teacher" and r.get("nfe") is not None and r["nfe"] <= nfe
             and (teacher is None or r["model"] == teacher)]
    return min(cands, key=lambda r: r["value"]) if cands else None


def _group_key(r: dict[str, Any]) -> tuple:
    return (r["protocol"]["name"], r["protocol"]["key"], r["metric"], r["extractor"]["name"], r["extractor"]["weights_hash"])


def group(rows: list[dict[str, Any]]) -> "OrderedDict[tuple, dict[str, Any]]":
    """{group key: {"floor": row, "series": {(model, sampler, grid, guidance): {steps: row}}}} with the newest
    rows; ``guidance`` is the row's classifier-free guidance scale (None for unconditional models)."""
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for r in rows:
        try:
            g = groups.setdefault(_group_key(r), {"floor": None, "series": OrderedDict()})
        except (KeyError, TypeError) as exc:
            raise DistillError(f"a result row lacks protocol/metric/extractor keys: {str(r)[:120]}") from exc
        if r.get("method") == "data-floor":
            g["floor"] = r
        else:
            g["series"].setdefault((r["model"], r["sampler"], r.get("grid"), _guidance(r)), {})[r["steps"]] = r
    return groups


def _guidance(r: dict[str, Any]) -> float | None:
    w = r.get("guidance")
    return None if w is None else float(w)


def _label(series_key: tuple) -> str:
    model, sampler, grid = series_key[:3]
    w = series_key[3] if len(series_key) > 3 else None
    notes = [grid] if grid and grid not in ("trailing", "student") else []
    if w is not None:
        notes.append(f"w={w:g}")
    return f"{model} · {sampler}" + (f" ({', '.join(notes)})" if notes else "")


def _columns(g: dict[str, Any]) -> list[int]:
    return sorted({k for pts in g["series"].values() for k in pts})


def _interval(r: dict[str, Any], field: str) -> tuple[float, float] | None:
    """The row's 95% interval of ``field`` ("value" or "accuracy"), None where it has none."""
    ci = r.get(f"{field}_ci")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(v is None for v in ci):
        return None
    return float(ci[0]), float(ci[1])


def intervals_overlap(a: dict[str, Any], b: dict[str, Any], field: str = "value") -> bool:
    """Whether two rows' 95% intervals of ``field`` overlap: the evaluation cannot rank them (False where either
    row has no interval)."""
    ca, cb = _interval(a, field), _interval(b, field)
    return ca is not None and cb is not None and ca[0] <= cb[1] and cb[0] <= ca[1]


KID_Z = 1.96  # a KID interval is KID +- 1.96 standard errors (95% under a normal approximation)


def kid_interval(r: dict[str, Any]) -> tuple[float, float] | None:
    """The row's 95% KID interval (KID +- 1.96 standard errors), None where it has no KID."""
    if r.get("kid") is None or r.get("kid_se") is None:
        return None
    return r["kid"] - KID_Z * r["kid_se"], r["kid"] + KID_Z * r["kid_se"]


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the evaluation cannot rank two rows: their FD intervals overlap and, where both rows carry KID, their
    KID intervals overlap too. A measure that separates them ranks them (False where either row has no FD
    interval)."""
    if not intervals_overlap(a, b, "value"):
        return False
    return kid_interval(a) is None or kid_interval(b) is None or _kid_tied(a, b)


def _kid_tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ka, kb = kid_interval(a), kid_interval(b)
    return ka is not None and kb is not None and ka[0] <= kb[1] and kb[0] <= ka[1]


def _single_tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return intervals_overlap(a, b, "single")


def _winners(g: dict[str, Any], k: int, field: str = "value", higher: bool = False) -> set[tuple]:
    """The series that are best at step count ``k`` (lowest ``field``; highest with ``higher``), or tied with
    the best: for the headline ("value"), :func:`tied` (FD and, where rows have it, KID); for KID, overlapping KID
    intervals; otherwise overlapping 95% intervals of ``field``. Rows without intervals tie only on equal values."""
    pts = {s: p[k] for s, p in g["series"].items() if k in p and p[k].get(field) is not None}
    if not pts:
        return set()
    pick = max if higher else min
    best_value = pick(r[field] for r in pts.values())
    out = {s for s, r in pts.items() if r[field] == best_value}
    best = [pts[s] for s in out]
    same = {"value": tied, "kid": _kid_tied, "single": _single_tied}.get(
        field, lambda a, b: intervals_overlap(a, b, field))
    return out | {s for s, r in pts.items() if any(same(r, w) for w in best)}


def _has(g: dict[str, Any], what: str) -> bool:
    """Whether any point of the group has ``what``: "value_ci", "accuracy", "guidance", "kid" or "single"."""
    rows = [r for pts in g["series"].values() for r in pts.values()]
    if what == "value_ci":
        return any(_interval(r, "value") for r in rows)
    return any(r.get(what) is not None for r in rows)


def _fd(value: float, ci: tuple[float, float] | None) -> str:
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _pct(value: float, ci: tuple[float, float] | None) -> str:
    return f"{100 * value:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _cell(r: dict[str, Any]) -> str:
    v = _fd(r["value"], _interval(r, "value"))
    return v if r["nfe"] == r["steps"] else f"{v} ({r['nfe']} NFE)"


def _acc_cell(r: dict[str, Any]) -> str:
    return _pct(r["accuracy"], _interval(r, "accuracy")) if r.get("accuracy") is not None else ""


def _kid_cell(r: dict[str, Any]) -> str:
    """KID to three significant digits, +- its standard error: its scale is the feature network's (the cubic kernel
    of unnormalised features), so no fixed factor such as Inception KID's x 10^3 suits every network."""
    if r.get("kid") is None:
        return ""
    se = f" ± {r['kid_se']:.2g}" if r.get("kid_se") is not None else ""
    return f"{r['kid']:.3g}{se}"


def _single_cell(r: dict[str, Any]) -> str:
    return _fd(r["single"], _interval(r, "single")) if r.get("single") is not None else ""


def _pooled(g: dict[str, Any]) -> dict[str, Any] | None:
    """A pooled group's first row with ``draws`` (its draws and sample counts), None for one-draw rows."""
    rows = [r for pts in g["series"].values() for r in pts.values()] + ([g["floor"]] if g["floor"] else [])
    return next((r for r in rows if (r.get("draws") or 1) > 1), None)


def title(key: tuple) -> str:
    proto, _, metric, extractor, h = key
    return f"{metric} on protocol '{proto}' ({extractor} {h[:8]}), by sampling steps; lower is better"


def accuracy_title(key: tuple) -> str:
    proto, _, _, extractor, h = key
    return f"prompt accuracy on protocol '{proto}' (judged by {extractor} {h[:8]}), by sampling steps; higher is better"


TIE_NOTE = "bold: best, or tied with the best (overlapping 95% intervals)"
TIE_NOTE_KID = ("bold: best, or tied with the best (both the FD intervals and the KID intervals overlap; a measure "
                "that separates two rows ranks them)")


def _caption(g: dict[str, Any]) -> str | None:
    """What a group's metric table needs said beyond the page header: its interval form, ties, guidance; None
    for rows with none of them (older rows render as they always did)."""
    parts = []
    pooled = _pooled(g)
    if pooled is not None:
        total = pooled["draws"] * pooled["n"]
        parts.append(f"Cells: FD pooled over {pooled['draws']} draws of n = {pooled['n']} samples "
                     f"({total} samples, seeds {pooled['seed']}..{pooled['seed'] + total - 1}), "
                     "with its sample-size bias removed, so it does not depend on the sample count (the floor uses "
                     "every real image of half B) [95% bias-corrected bootstrap interval]; "
                     + (TIE_NOTE_KID if _has(g, "kid") else TIE_NOTE) + ".")
    elif _has(g, "value_ci"):
        parts.append("Cells: the metric [its 95% bootstrap interval over the samples]; "
                     + (TIE_NOTE_KID if _has(g, "kid") else TIE_NOTE) + ".")
    if _has(g, "guidance"):
        parts.append("Conditional models have a row per classifier-free guidance scale w.")
    return " ".join(parts) or None


def _accuracy_caption(g: dict[str, Any]) -> str:
    text = ("Prompt accuracy: the share of samples whose prompt the protocol's judge reads back from the image, "
            "as a percentage")
    if any(_interval(r, "accuracy") for pts in g["series"].values() for r in pts.values()):
        text += " [95% bootstrap interval]; " + TIE_NOTE
    text += "."
    if g["floor"] is not None and g["floor"].get("accuracy") is not None:
        text += " The judge row is its accuracy on real images, the reference for every model."
    return text


def _floor_fd(f: dict[str, Any]) -> str:
    return _fd(f["value"], _interval(f, "value"))


def rich_tables(rows: list[dict[str, Any]]) -> list:
    """Per group, the metric table; and, where rows have prompt accuracy, an accuracy table."""
    from rich.markup import escape
    from rich.table import Table

    tables = []
    for key, g in group(rows).items():
        cols = _columns(g)
        caption = _caption(g)
        # escaped: "[its 95% bootstrap interval ...]" is otherwise read as rich markup and vanishes
        t = Table(title=escape(title(key)), title_justify="left", caption=escape(caption) if caption else None,
                  caption_justify="left")
        t.add_column("model · sampler")
        for k in cols:
            t.add_column(str(k), justify="right")
        wins = {k: _winners(g, k) for k in cols}
        for skey, pts in g["series"].items():
            cells = []
            for k in cols:
                if k not in pts:
                    cells.append("")
                elif skey in wins[k]:
                    cells.append(f"[bold green]{_cell(pts[k])}[/bold green]")
                else:
                    cells.append(_cell(pts[k]))
            t.add_row(_label(skey), *cells)
        if g["floor"] is not None:
            f = g["floor"]
            t.add_row(f"data floor (real half B vs A, n={f.get('pooled_n', f['n'])})", *[_floor_fd(f)] * max(1, len(cols)),
                      style="dim")
        tables.append(t)
        for field in ("kid", "single"):
            if _has(g, field):
                tables.append(_rich_measure(key, g, cols, field))
        if _has(g, "accuracy"):
            tables.append(_rich_measure(key, g, cols, "accuracy"))
    return tables


def _measure_spec(key: tuple, g: dict[str, Any], field: str) -> tuple[str, str, Any, bool, str]:
    """(heading, caption, cell formatter, higher is better, the real data's row label) of a group's table of a
    second measure: "kid", "single" (the first draw's FD) or "accuracy"."""
    if field == "accuracy":
        return accuracy_title(key), _accuracy_caption(g), _acc_cell, True, "judge on real images (half B)"
    heading, caption = _measure_text(key, g, field)
    cell = {"kid": _kid_cell, "single": _single_cell}[field]
    return heading, caption, cell, False, "data floor (real half B vs A)"


def _rich_measure(key: tuple, g: dict[str, Any], cols: list[int], field: str) -> Any:
    from rich.markup import escape
    from rich.table import Table

    heading, caption, cell, higher, floor_label = _measure_spec(key, g, field)
    t = Table(title=escape(heading), title_justify="left", caption=escape(caption), caption_justify="left")
    t.add_column("model · sampler")
    for k in cols:
        t.add_column(str(k), justify="right")
    wins = {k: _winners(g, k, field, higher=higher) for k in cols}
    for skey, pts in g["series"].items():
        if not any(r.get(field) is not None for r in pts.values()):
            continue
        t.add_row(_label(skey), *[(f"[bold green]{escape(cell(pts[k]))}[/bold green]" if skey in wins[k]
                                   else escape(cell(pts[k]))) if k in pts else "" for k in cols])
    f = g["floor"]
    if f is not None and f.get(field) is not None:
        label = floor_label.replace("half B", f"half B, n={f.get('pooled_n', f['n'])}", 1)
        t.add_row(label, *[escape(cell(f))] * max(1, len(cols)), style="dim")
    return t


def markdown(rows: list[dict[str, Any]], plots: dict[Any, str] | None = None,
             source: str = "by `distill leaderboard` from the JSONL rows in `evals/results/`") -> str:
    """The leaderboard page: per group its metric table, its prompt-accuracy table where rows have accuracy,
    the plots in ``plots`` ({group key: path} and {(group key, "tradeoff"): path}) and links to sample grids."""
    plots = plots or {}
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
            draws = r0.get("draws") or 1
            per = (f"n = {r0['n']} samples per point" if draws == 1 else
                   f"{draws} draws of n = {r0['n']} ({draws * r0['n']} samples per point)")
            out.append(f"{per}, seeds {r0['seed']}.., measured on {'; '.join(machines)}; git {', '.join(gits)}.")
            out.append("")
        caption = _caption(g)
        if caption:
            out += [caption, ""]
        out.append("| model · sampler | " + " | ".join(str(k) for k in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        wins = {k: _winners(g, k) for k in cols}
        for skey, pts in g["series"].items():
            cells = []
            for k in cols:
                if k not in pts:
                    cells.append("")
                else:
                    c = _cell(pts[k])
                    cells.append(f"**{c}**" if skey in wins[k] else c)
            out.append(f"| {_label(skey)} | " + " | ".join(cells) + " |")
        if g["floor"] is not None:
            f = g["floor"]
            out.append("| *data floor (real half B vs A)* | " + " | ".join([f"*{_floor_fd(f)}*"] * len(cols)) + " |")
        out.append("")
        for field in ("kid", "single"):
            if _has(g, field):
                out += _markdown_measure(key, g, cols, field)
        if _has(g, "accuracy"):
            out += _markdown_measure(key, g, cols, "accuracy")
        if _has(g, "aspects"):
            out += _markdown_aspects(key, g)
        if key in plots:
            out += [f"![{title(key)}]({plots[key]})", ""]
        if (key, "tradeoff") in plots:
            alt = f"{key[2]} against prompt accuracy across guidance scales, protocol '{key[0]}'"
            out += [f"![{alt}]({plots[(key, 'tradeoff')]})", ""]
        grids = [(skey, k, r["grid_png"]) for skey, pts in g["series"].items() for k, r in pts.items() if r.get("grid_png")]
        if grids:
            out.append("Sample grids (first 64 samples of each point): " + ", ".join(
                f"[{_label(s)} {k}]({p})" for s, k, p in grids))
            out.append("")
    out += rank_comparison(rows)
    return "\n".join(out)


def _ranked(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the evaluation ranks two rows: both carry intervals and they are not :func:`tied`."""
    return _interval(a, "value") is not None and _interval(b, "value") is not None and not tied(a, b)


def _order(pts: dict[tuple, dict[str, Any]]) -> str:
    """Series from best to worst: ``<`` between ranked neighbours, ``=`` between tied ones, ``<=`` where a row has
    no interval (older rows: the order of the values, not a ranking)."""
    ranked = sorted(pts.items(), key=lambda kv: kv[1]["value"])
    text = _label(ranked[0][0])
    for (_, prev), (skey, r) in zip(ranked, ranked[1:]):
        sep = "<" if _ranked(prev, r) else "=" if intervals_overlap(prev, r) else "<="
        text += f" {sep} {_label(skey)}"
    return text


def rank_comparison(rows: list[dict[str, Any]]) -> list[str]:
    """Where one protocol's samples are scored in two feature spaces (groups with the same protocol key and another
    feature network, e.g. 'digits' and 'digits-b'), a section per pair: at each step count the order of the series in
    each space, and the pairs the two spaces rank in opposite orders, each ranking them apart (neither tied). A
    ranking that only one feature network supports is an artefact of that network's features, and says so here."""
    groups = group(rows)
    out: list[str] = []
    keys = list(groups)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if a[1] != b[1] or (a[3], a[4]) == (b[3], b[4]):
                continue
            ga, gb = groups[a], groups[b]
            lines = []
            for k in sorted(set(_columns(ga)) & set(_columns(gb))):
                pa = {s: p[k] for s, p in ga["series"].items() if k in p}
                pb = {s: p[k] for s, p in gb["series"].items() if k in p}
                common = [s for s in pa if s in pb]
                if len(common) < 2:
                    continue
                pa, pb = {s: pa[s] for s in common}, {s: pb[s] for s in common}
                flips = [f"{_label(x)} vs {_label(y)}" for j, x in enumerate(common) for y in common[j + 1 :]
                         if _ranked(pa[x], pa[y]) and _ranked(pb[x], pb[y])
                         and (pa[x]["value"] - pa[y]["value"]) * (pb[x]["value"] - pb[y]["value"]) < 0]
                lines.append(f"| {k} | {_order(pa)} | {_order(pb)} | {'**' + '; '.join(flips) + '**' if flips else 'none'} |")
            if not lines:
                continue
            out += [f"## Rankings in two feature spaces: {a[2]} and {b[2]} (protocols '{a[0]}' and '{b[0]}')", "",
                    "The same samples (the same protocol key) scored by two independently trained feature networks, "
                    "best first at each step count (`<`: ranked, `=`: tied, `<=`: a row without an interval, "
                    "whose order is not a ranking). Where the two rank a pair in opposite "
                    "orders, each apart, the last column names it: that ranking is an artefact of one network's "
                    "features, not a fact about the samples.", "",
                    f"| steps | {a[2]} | {b[2]} | ranked in opposite orders |", "|---:|---|---|---|", *lines, ""]
    return out


def _measure_text(key: tuple, g: dict[str, Any], field: str) -> tuple[str, str]:
    """(heading, caption) of the KID or the first-draw table of a group."""
    proto, _, metric, extractor, h = key
    if field == "kid":
        pooled = _pooled(g)
        over = f"the same {pooled['draws'] * pooled['n']} samples" if pooled else "the same samples"
        return (f"KID on protocol '{proto}' ({extractor} {h[:8]}), by sampling steps; lower is better",
                f"KID (kernel inception distance in the same features, cubic polynomial kernel; unbiased, so about 0 "
                f"for samples of the data's own distribution and comparable across sample counts; its scale is the feature "
                f"network's) over {over}, +- its standard error (jackknife over the samples); bold: best, or tied with the best "
                "(KID +- 1.96 standard errors overlap).")
    return (f"{metric} of the first draw on protocol '{proto}' ({extractor} {h[:8]}), by sampling steps; lower is better",
            "The plain FD of the first draw alone (n samples, seeds from the protocol's seed): the number a one-draw "
            "protocol gives and older leaderboards carry, for comparison with them [95% bootstrap interval]; bold: "
            "best, or overlapping the best's interval.")


def _markdown_measure(key: tuple, g: dict[str, Any], cols: list[int], field: str) -> list[str]:
    """A group's table of a second measure: "kid", "single" (the first draw's FD) or "accuracy" (higher is better),
    a row per series that has it, bold where best or tied with the best, the real data's row last."""
    heading, caption, cell, higher, floor_label = _measure_spec(key, g, field)
    out = [f"### {heading}", "", caption, "",
           "| model · sampler | " + " | ".join(str(k) for k in cols) + " |", "|---|" + "---:|" * len(cols)]
    wins = {k: _winners(g, k, field, higher=higher) for k in cols}
    for skey, pts in g["series"].items():
        if not any(r.get(field) is not None for r in pts.values()):
            continue
        cells = []
        for k in cols:
            c = cell(pts[k]) if k in pts else ""
            cells.append(f"**{c}**" if c and skey in wins[k] else c)
        out.append(f"| {_label(skey)} | " + " | ".join(cells) + " |")
    f = g["floor"]
    if f is not None and f.get(field) is not None:
        out.append(f"| *{floor_label}* | " + " | ".join([f"*{cell(f)}*"] * len(cols)) + " |")
    out.append("")
    return out


def _markdown_aspects(key: tuple, g: dict[str, Any]) -> list[str]:
    """The protocol's per-aspect diagnostics: a row per point, a column per aspect, the real images first."""
    rows = [(f"{_label(skey)}, {k} step{'s' if k != 1 else ''}", r) for skey, pts in g["series"].items()
            for k, r in sorted(pts.items()) if r.get("aspects")]
    names = list(dict.fromkeys(a for _, r in rows for a in r["aspects"]))
    out = [f"### Diagnostics on protocol '{key[0]}': what the samples look like, beside the real images", "",
           "Each cell is the mean of one per-sample aspect over the point's samples (the protocol's `diagnostics`; "
           "their definitions are in its module's documentation). A row far from the real images' in an aspect is "
           "worse in that respect, whatever its FD says.", "",
           "| point | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    f = g["floor"]
    if f is not None and f.get("aspects"):
        out.append("| *real images (half B)* | " + " | ".join(f"*{f['aspects'].get(a, float('nan')):.3f}*"
                                                           for a in names) + " |")
    for label, r in rows:
        out.append(f"| {label} | " + " | ".join(f"{r['aspects'][a]:.3f}" if a in r["aspects"] else "" for a in names)
                   + " |")
    out.append("")
    return out


def _tradeoff_curves(g: dict[str, Any]) -> OrderedDict[tuple, list[dict[str, Any]]]:
    """{(model, sampler, grid, steps): its rows with accuracy, by guidance scale}, for the series scored at three
    guidance scales or more: a sweep over w. Baselines run unguided and at one w are two points each, and a
    leaderboard of them would bury the sweeps in its legend. {} when there is none."""
    rows = [r for pts in g["series"].values() for r in pts.values()
            if r.get("accuracy") is not None and _guidance(r) is not None]
    curves: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
    for r in rows:
        curves.setdefault((r["model"], r["sampler"], r.get("grid"), r["steps"]), []).append(r)
    return OrderedDict((c, sorted(rs, key=_guidance)) for c, rs in curves.items() if len({_guidance(r) for r in rs}) >= 3)


def plot(rows: list[dict[str, Any]], folder: str | Path) -> dict[tuple, Path]:
    """Per group, a PNG of the metric against NFE (log-log), a line per model · sampler (· guidance scale), its
    95% intervals as error bars where rows have them, the floor dashed; and, for groups whose rows have prompt
    accuracy at several guidance scales, the guidance trade-off: the metric against prompt accuracy, a curve per
    (model, sampler, steps) through its guidance scales. Returns {group key: path, (group key, "tradeoff"): path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[tuple, Path] = {}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    for key, g in group(rows).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (skey, pts) in enumerate(g["series"].items()):
            pts_sorted = sorted(pts.values(), key=lambda r: r["nfe"])
            # distinct styles: samplers with the same math (DDIM and Euler) would otherwise hide each other
            (line,) = ax.plot([r["nfe"] for r in pts_sorted], [r["value"] for r in pts_sorted], marker=markers[i % 6],
                              linestyle=styles[i % 4], label=_label(skey))
            bars = [(r["nfe"], ci) for r in pts_sorted if (ci := _interval(r, "value")) is not None]
            if bars:  # vertical bars from the interval itself (errorbar() wants distances from the value)
                ax.vlines([x for x, _ in bars], [ci[0] for _, ci in bars], [ci[1] for _, ci in bars],
                          color=line.get_color(), alpha=0.6, linewidth=2)
        if g["floor"] is not None:
            ax.axhline(g["floor"]["value"], color="gray", linestyle="--", label="data floor")
            ci = _interval(g["floor"], "value")
            if ci is not None:
                ax.axhspan(ci[0], ci[1], color="gray", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(key[2])
        ax.set_title(f"{key[2]} against NFE, protocol '{key[0]}'", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        stem = f"{key[0]}-{key[3]}-{key[1][:6]}{key[4][:6]}"  # protocol key + weights hash: no collisions
        path = folder / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[key] = path
        curves = _tradeoff_curves(g)
        if curves:
            path = folder / f"{stem}-tradeoff.png"
            _plot_tradeoff(plt, key, g, curves, path, styles, markers)
            paths[(key, "tradeoff")] = path
    return paths


def _plot_tradeoff(plt: Any, key: tuple, g: dict[str, Any], curves: dict[tuple, list[dict[str, Any]]], path: Path,
                   styles: list[str], markers: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for i, ((model, sampler, grid, steps), rs) in enumerate(curves.items()):
        xs, ys = [100 * r["accuracy"] for r in rs], [r["value"] for r in rs]
        values += ys
        label = _label((model, sampler, grid)) + f", {steps} step{'s' if steps != 1 else ''}"
        (line,) = ax.plot(xs, ys, marker=markers[i % 6], linestyle=styles[i % 4], label=label)
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(f"w={_guidance(r):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.get_color())
            if (ci := _interval(r, "value")) is not None:
                ax.vlines(x, ci[0], ci[1], color=line.get_color(), alpha=0.5, linewidth=1.5)
            if (ci := _interval(r, "accuracy")) is not None:
                ax.hlines(y, 100 * ci[0], 100 * ci[1], color=line.get_color(), alpha=0.5, linewidth=1.5)
    f = g["floor"]
    if f is not None:
        ax.axhline(f["value"], color="gray", linestyle="--", label="data floor")
        values.append(f["value"])
        if f.get("accuracy") is not None:
            ax.axvline(100 * f["accuracy"], color="gray", linestyle=":", label="judge on real images")
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("prompt accuracy (%)")
    ax.set_ylabel(key[2])
    ax.set_title(f"{key[2]} against prompt accuracy across guidance scales, protocol '{key[0]}'", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
