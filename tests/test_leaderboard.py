"""Leaderboards with uncertainty, guidance scales and prompt accuracy; prompt grids. Synthetic rows: fast."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.eval.grid import save_prompt_grid
from distill.eval.leaderboard import (
    group,
    load_rows,
    markdown,
    plot,
    relink_grids,
    rich_tables,
)

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
BASE = {"protocol": {"name": "toy", "key": "abcdef0123456789"}, "metric": "FD-toy",
        "extractor": {"name": "toy-net", "weights_hash": "0123456789abcdef"}, "n": 200, "seed": 0,
        "machine": "a test", "git": "abc1234"}


def row(model, steps, value, ci=None, sampler="ddim", w=None, acc=None, acc_ci=None, nfe=None, **kw):
    r = {**BASE, "model": model, "method": "teacher", "recipe": None, "sampler": sampler, "steps": steps,
         "nfe": nfe or steps, "grid": "trailing", "value": value, **kw}
    if ci is not None:
        r["value_ci"] = list(ci)
    if w is not None:
        r["guidance"] = w
    if acc is not None:
        r["accuracy"], r["accuracy_ci"] = acc, list(acc_ci) if acc_ci else None
    return r


def floor(value=1.0, ci=(0.9, 1.1), acc=None, acc_ci=None):
    return {**BASE, "model": "real data (half B vs A)", "method": "data-floor", "sampler": None, "steps": None,
            "nfe": None, "value": value, "value_ci": list(ci) if ci else None, "accuracy": acc,
            "accuracy_ci": list(acc_ci) if acc_ci else None}


def table_lines(md: str) -> dict[str, list[str]]:
    """{row label: cells} of the markdown tables (the last table wins for a label)."""
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def rich_text(tables) -> str:
    from rich.console import Console

    c = Console(file=io.StringIO(), width=250, force_terminal=True, color_system="truecolor")
    for t in tables:
        c.print(t)
    return c.file.getvalue()


def test_overlapping_intervals_are_a_tie_and_separate_ones_are_not():
    rows = [floor(),
            row("a", 1, 4.15, (3.95, 4.37)), row("b", 1, 4.30, (4.10, 4.52)),  # overlap: a tie at 1 step
            row("a", 2, 2.00, (1.90, 2.10)), row("b", 2, 3.00, (2.80, 3.20))]  # apart: only a is best
    md = markdown(rows)
    t = table_lines(md)
    assert t["a · ddim"] == ["**4.15 [3.95, 4.37]**", "**2.00 [1.90, 2.10]**"]
    assert t["b · ddim"] == ["**4.30 [4.10, 4.52]**", "3.00 [2.80, 3.20]"]
    assert t["*data floor (real half B vs A)*"] == ["*1.00 [0.90, 1.10]*"] * 2
    assert "bold: best, or tied with the best (overlapping 95% intervals)" in md
    assert "[its 95% bootstrap interval" in md
    text = rich_text(rich_tables(rows))
    assert "4.30 [4.10, 4.52]" in text and "tied with the best" in text
    # the rich table bolds the same cells: b's 3.00 is plain, its 4.30 bold
    from rich.table import Table

    (tbl,) = rich_tables(rows)
    assert isinstance(tbl, Table)
    b_cells = [list(col.cells)[1] for col in tbl.columns[1:]]
    assert b_cells[0].startswith("[bold green]") and not b_cells[1].startswith("[bold")


def test_a_tie_only_counts_against_the_best():
    # b overlaps c but not a (the best): b is not bold, and neither is c
    rows = [row("a", 1, 1.0, (0.9, 1.1)), row("b", 1, 1.5, (1.2, 1.8)), row("c", 1, 1.7, (1.6, 1.9))]
    t = table_lines(markdown(rows))
    assert t["a · ddim"][0].startswith("**") and not t["b · ddim"][0].startswith("**")
    assert not t["c · ddim"][0].startswith("**")


def test_guidance_scales_are_separate_series_with_accuracy():
    rows = [floor(acc=0.99, acc_ci=(0.98, 1.0))]
    for w, fd, acc in [(1.0, 5.0, 0.60), (3.0, 3.12, 0.971)]:
        rows.append(row("teacher", 4, fd, (fd - 0.2, fd + 0.2), w=w, acc=acc, acc_ci=(acc - 0.01, acc + 0.01),
                        nfe=4 if w == 1 else 8))
    keys = list(next(iter(group(rows).values()))["series"])
    assert [k[3] for k in keys] == [1.0, 3.0]
    md = markdown(rows)
    t = table_lines(md)
    assert "teacher · ddim (w=1)" in t and "teacher · ddim (w=3)" in t
    assert "3.12 [2.92, 3.32] (8 NFE)" in md
    assert "**97.1% [96.1, 98.1]**" in md and "60.0% [59.0, 61.0]" in md
    assert "*99.0% [98.0, 100.0]*" in md  # the judge on real images
    assert "### prompt accuracy on protocol 'toy'" in md and "higher is better" in md
    assert "a row per classifier-free guidance scale w" in md
    tables = rich_tables(rows)
    assert len(tables) == 2 and "97.1%" in rich_text(tables) and "w=3" in rich_text(tables)


def test_tradeoff_plot_for_several_guidance_scales(tmp_path):
    rows = [floor(acc=0.99)]
    for steps in (2, 4):
        for w, fd, acc in [(1.0, 6.0, 0.5), (2.0, 4.0, 0.8), (4.0, 5.0, 0.95)]:
            rows.append(row("teacher", steps, fd / steps, (fd / steps * 0.9, fd / steps * 1.1), w=w, acc=acc,
                            acc_ci=(acc - 0.02, min(1.0, acc + 0.02))))
    rows.append(row("student", 2, 1.5, (1.4, 1.6), sampler="consistency", w=2.0, acc=0.9, acc_ci=(0.88, 0.92)))
    paths = plot(rows, tmp_path / "plots")
    key = next(iter(group(rows)))
    assert set(paths) == {key, (key, "tradeoff")}
    for p in paths.values():
        assert p.is_file() and p.read_bytes()[:8] == PNG and p.stat().st_size > 1000
    assert paths[(key, "tradeoff")].name.endswith("-tradeoff.png")
    rel = {k: str(p) for k, p in paths.items()}
    md = markdown(rows, rel)
    assert f"]({paths[key]})" in md and f"]({paths[(key, 'tradeoff')]})" in md
    assert "FD-toy against prompt accuracy across guidance scales" in md
    # one guidance scale, or no accuracy: no trade-off plot
    one_w = [r for r in rows if r.get("guidance") in (None, 2.0)]
    assert set(plot(one_w, tmp_path / "p1")) == {key}
    no_acc = [{k: v for k, v in r.items() if not k.startswith("accuracy")} for r in rows]
    assert set(plot(no_acc, tmp_path / "p2")) == {key}


def test_tradeoff_curves_leave_out_series_scored_at_one_guidance_scale():
    """Baselines scored unguided and at one w are two points each, not sweeps: only series with three scales or
    more are curves."""
    from distill.eval.leaderboard import _tradeoff_curves

    rows = [floor(acc=0.99)]
    rows += [row("teacher", 4, 5.0 * w, (4.5, 5.5), sampler=s, w=w, acc=0.98, acc_ci=(0.97, 0.99))
             for s in ("ddim", "unipc", "dpmpp_2m") for w in (1.0, 1.5)]
    rows += [row("student", 4, fd, (fd - 1, fd + 1), sampler="consistency", w=w, acc=acc, acc_ci=(acc - 0.01, acc))
             for w, fd, acc in [(1.0, 9.0, 0.9), (1.5, 7.0, 0.95), (3.0, 12.0, 0.97)]]
    curves = _tradeoff_curves(next(iter(group(rows).values())))
    assert [(k[0], [r["guidance"] for r in rs]) for k, rs in curves.items()] == [("student", [1.0, 1.5, 3.0])]


def test_rows_without_intervals_render_as_before(tmp_path):
    rows = [{k: v for k, v in floor(ci=None).items() if v is not None or k in ("sampler", "steps", "nfe")},
            row("a", 1, 3.0), row("b", 1, 3.5), row("a", 2, 2.0, nfe=3), row("b", 2, 1.5)]
    rows[0].pop("value_ci", None)
    md = markdown(rows)
    t = table_lines(md)
    assert t["a · ddim"] == ["**3.00**", "2.00 (3 NFE)"] and t["b · ddim"] == ["3.50", "**1.50**"]
    assert t["*data floor (real half B vs A)*"] == ["*1.00*", "*1.00*"]
    assert "tied" not in md and "prompt accuracy" not in md and "w=" not in md
    (tbl,) = rich_tables(rows)
    assert tbl.caption is None
    paths = plot(rows, tmp_path)
    assert len(paths) == 1 and next(iter(paths.values())).read_bytes()[:8] == PNG


def test_committed_digits_results_render_exactly_as_committed(monkeypatch):
    """The committed rows give the committed evals/LEADERBOARD.md byte for byte (`distill leaderboard --md
    evals/LEADERBOARD.md --plots evals/plots` rewrites it after rows are added)."""
    import os

    files = sorted((ROOT / "evals" / "results").glob("*.jsonl"))
    if not files or not (ROOT / "evals" / "LEADERBOARD.md").is_file():
        pytest.skip("no committed results")
    monkeypatch.chdir(ROOT)  # relink_grids resolves the grid links from the working directory, as the CLI does
    rows = load_rows([f.relative_to(ROOT) for f in files])
    # the links `distill leaderboard --md evals/LEADERBOARD.md --plots evals/plots` gives plot()'s files
    plots = {k: os.path.relpath(Path("evals/plots") / f"{k[0]}-{k[3]}-{k[1][:6]}{k[4][:6]}.png", "evals")
             for k in group(rows)}
    from distill.eval.leaderboard import _tradeoff_curves

    for k, g in group(rows).items():  # and the guidance trade-off, where some series has several scales
        if _tradeoff_curves(g):
            plots[(k, "tradeoff")] = plots[k].replace(".png", "-tradeoff.png")
    md = relink_grids(markdown(rows, plots), "evals")
    assert md == (ROOT / "evals" / "LEADERBOARD.md").read_text()
    # one table per group, and one more for a group whose rows carry prompt accuracy (the text-digits baselines)
    from distill.eval.leaderboard import _has

    groups = group(rows).values()
    assert len(rich_tables(rows)) == len(groups) + sum(_has(g, "accuracy") for g in groups)


def _blocks(path: Path, scale: int, pad: int, h: int, w: int) -> dict[tuple[int, int], np.ndarray]:
    from PIL import Image

    a = np.asarray(Image.open(path))
    a = a[::scale, ::scale]  # undo the nearest-neighbour upscaling
    rows, cols = (a.shape[0] - pad) // (h + pad), (a.shape[1] - pad) // (w + pad)
    return {(r, c): a[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w]
            for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize("channels", [1, 3])
def test_prompt_grid_puts_each_prompts_samples_in_its_row(tmp_path, channels):
    P, N, h, w = 5, 23, 4, 6  # prompts 0-2 have 5 samples, prompts 3-4 have 4
    # sample i is flat, with a level that names it (uint8 level 10 * i); channel c adds c
    levels = torch.arange(N, dtype=torch.float32) * 10
    img = levels.view(N, 1, 1, 1) + torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1)
    img = img.expand(N, channels, h, w) / 127.5 - 1
    path = save_prompt_grid(img, P, tmp_path / "g.png", rows=4, cols=5, scale=2)
    assert path.read_bytes()[:8] == PNG
    blocks = _blocks(path, 2, 1, h, w)
    assert max(blocks)[0] == 3 and max(blocks)[1] == 4  # 4 prompts shown (rows), 5 samples each (cols)
    for (p, j), b in blocks.items():
        i = p + j * P
        if i >= N:  # prompt 3 has only 4 samples: the row's end is empty
            assert (p, j) == (3, 4) and (b == 64).all()
            continue
        want = np.array([10 * i + c for c in range(channels)], dtype=np.uint8)
        got = b if channels > 1 else b[..., None]
        assert (got == want).all(), (p, j, got[0, 0], want)
    # fewer columns than samples: the first ones; grayscale stays one channel
    path = save_prompt_grid(img, P, tmp_path / "h.png", rows=8, cols=2, scale=1)
    blocks = _blocks(path, 1, 1, h, w)
    assert sorted(blocks) == [(p, j) for p in range(5) for j in range(2)]
    from PIL import Image

    assert Image.open(path).mode == ("L" if channels == 1 else "RGB")
    with pytest.raises(DistillError, match="at least one prompt"):
        save_prompt_grid(img, 0, tmp_path / "x.png")


def test_a_tie_needs_both_fd_and_kid_intervals_to_overlap():
    """Rows with KID are tied only where both measures cannot rank them: b's FD interval overlaps a's but its KID
    is apart (ranked: not bold); c overlaps a in both (tied: bold); a KID table shows each row's KID with its
    standard error; the quickstart's verdict uses the same rule."""
    from distill.eval.leaderboard import tied

    rows = [floor(), row("a", 1, 4.00, (3.80, 4.20), kid=0.0010, kid_se=0.0002),
            row("b", 1, 4.10, (3.90, 4.30), kid=0.0030, kid_se=0.0002),
            row("c", 1, 4.12, (3.92, 4.33), kid=0.0012, kid_se=0.0002)]
    assert not tied(rows[1], rows[2]) and tied(rows[1], rows[3])
    assert tied(row("x", 1, 4.0, (3.8, 4.2)), rows[2])  # a row without KID: the FD intervals decide
    md = markdown(rows)
    first = md.split("### KID")[0]
    cells = table_lines(first)
    assert cells["a · ddim"][0].startswith("**") and cells["c · ddim"][0].startswith("**")
    assert not cells["b · ddim"][0].startswith("**")
    assert "both the FD intervals and the KID intervals overlap" in first
    kid_cells = table_lines(md.split("### KID")[1])
    assert kid_cells["a · ddim"] == ["**0.001 ± 0.0002**"] and kid_cells["b · ddim"] == ["0.003 ± 0.0002"]
    assert "KID on protocol" in rich_text(rich_tables(rows))


def test_a_pooled_group_says_how_it_pooled_and_shows_the_first_draw():
    pooled = dict(draws=10, pooled_n=2000, kid=0.001, kid_se=0.0001)
    rows = [{**floor(0.5, (0.3, 0.7)), "draws": 10, "single": 1.0, "single_ci": [0.8, 1.2], "pooled_n": 898},
            row("a", 1, 2.0, (1.9, 2.1), single=2.4, single_ci=[2.0, 2.8], **pooled),
            row("b", 1, 2.6, (2.5, 2.7), single=2.5, single_ci=[2.1, 2.9], **pooled)]
    md = markdown(rows)
    assert "FD pooled over 10 draws of n = 200 samples (2000 samples, seeds 0..1999)" in md
    assert "10 draws of n = 200 (2000 samples per point)" in md
    single = table_lines(md.split("### FD-toy of the first draw")[1].split("###")[0])
    assert single["a · ddim"] == ["**2.40 [2.00, 2.80]**"] and single["b · ddim"] == ["**2.50 [2.10, 2.90]**"]
    assert single["*data floor (real half B vs A)*"] == ["*1.00 [0.80, 1.20]*"]
    head = table_lines(md.split("### ")[0])
    assert head["a · ddim"] == ["**2.00 [1.90, 2.10]**"] and head["b · ddim"] == ["2.60 [2.50, 2.70]"]


def test_two_feature_spaces_that_rank_a_pair_in_opposite_orders_are_flagged():
    """The same protocol key scored by two feature networks: a pair ranked apart in both, in opposite orders, is
    named; a pair tied in one space is not."""
    other = {"metric": "FD-toy-b", "extractor": {"name": "toy-net-b", "weights_hash": "fedcba9876543210"},
             "protocol": {"name": "toy-b", "key": BASE["protocol"]["key"]}}
    rows = [floor(), row("a", 4, 2.0, (1.9, 2.1)), row("b", 4, 3.0, (2.9, 3.1)), row("c", 4, 3.05, (2.95, 3.15)),
            {**floor(), **other}, {**row("a", 4, 5.0, (4.9, 5.1)), **other}, {**row("b", 4, 4.0, (3.9, 4.1)), **other},
            {**row("c", 4, 5.02, (4.92, 5.12)), **other}]
    md = markdown(rows)
    section = md.split("## Rankings in two feature spaces: FD-toy and FD-toy-b")[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("| 4 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "a · ddim < b · ddim = c · ddim" and cells[2] == "b · ddim < a · ddim = c · ddim"
    assert cells[3] == "**a · ddim vs b · ddim**"  # b vs c is tied in the first space: not a contradiction
    assert "Rankings in two feature spaces" not in markdown(rows[:4])  # one feature space: no section
