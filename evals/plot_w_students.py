"""Plot: how `w`-conditioned students respond to the guidance scale, beside the teacher's own trade-off.

    python evals/plot_w_students.py            (reads evals/results/, writes evals/plots/text-digits-w-students.png)

Two panels over w in [1, 2] (the range the text-digits students are trained on): FD-text-digits against w, and
prompt accuracy against w, each point with its 95% bootstrap interval. The teacher's curve is DPM-Solver++(2M) at 8
steps (16 NFE guided, 8 unguided), its rows from `evals/baselines.py --teacher text-digits-sd` (the unguided, w = 1.5,
guidance and guidance-fine tables). A student that has learned its guidance input moves as the teacher does: FD
lowest near the teacher's best w and rising past it, accuracy rising with w. Every row is read from committed
results; nothing is re-measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "evals" / "results"

TEACHER = ("text-digits-sd", "dpmpp_2m", 8)
TEACHER_FILES = ["text-digits-text-digits-sd-baselines-unguided.jsonl", "text-digits-text-digits-sd-baselines.jsonl",
                 "text-digits-text-digits-sd-baselines-guidance.jsonl",
                 "text-digits-text-digits-sd-baselines-guidance-fine.jsonl"]
# (results file, model name, steps, label)
STUDENTS = [
    ("text-digits-progressive-sd-w1-2-p800.jsonl", "progressive-sd-w1-2-p800", 1,
     "progressive, phase one 800 steps, 1 step"),
    ("text-digits-progressive-sd-w1-2-p800.jsonl", "progressive-sd-w1-2-p800", 4,
     "progressive, phase one 800 steps, 4 steps"),
    ("text-digits-progressive-sd-w1-2.jsonl", "progressive-sd-w1-2", 4, "progressive, phase one 200 steps, 4 steps"),
    ("text-digits-consistency-sd-w1-2.jsonl", "consistency-sd-w1-2", 4, "LCM over [1, 2], 4 steps"),
    ("text-digits-consistency-sd-w1-2-emb10.jsonl", "consistency-sd-w1-2-emb10", 4,
     "LCM over [1, 2], embedding at 10x the rate, 4 steps"),
]


def rows(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(found: list[dict], model: str, sampler: str | None, steps: int) -> list[dict]:
    """One point per w in [1, 2] (the last row wins), sorted by w."""
    by_w: dict[float, dict] = {}
    for r in found:
        w = r.get("guidance")
        if r.get("model") != model or r.get("steps") != steps or w is None or not 1 <= w <= 2:
            continue
        if sampler is not None and r.get("sampler") != sampler:
            continue
        by_w[float(w)] = r
    return [by_w[w] for w in sorted(by_w)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "evals" / "plots" / "text-digits-w-students.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("teacher, DPM-Solver++ 8 steps", curve([r for f in TEACHER_FILES for r in rows(f)], TEACHER[0],
                                                     TEACHER[1], TEACHER[2]))]
    series += [(label, curve(rows(f), model, None, steps)) for f, model, steps, label in STUDENTS]
    series = [(label, pts) for label, pts in series if len(pts) >= 2]
    if not series:
        raise SystemExit(f"no rows with guidance sweeps in {RESULTS}")
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = ["s", "v", "^", "P", "o", "D"]
    floor = next((r for f, *_ in STUDENTS for r in rows(f) if r.get("model", "").startswith("real data")), None)
    for i, (label, pts) in enumerate(series):
        ws = [r["guidance"] for r in pts]
        style = dict(marker=markers[i % 6], linestyle="-" if i == 0 else "--", label=label)
        if i == 0:
            style.update(color="black", linewidth=2)
        (line,) = ax_fd.plot(ws, [r["value"] for r in pts], **style)
        ax_acc.plot(ws, [100 * r["accuracy"] for r in pts], **style)
        for r in pts:
            if r.get("value_ci"):
                ax_fd.vlines(r["guidance"], *r["value_ci"], color=line.get_color(), alpha=0.35, linewidth=1.5)
            if r.get("accuracy_ci"):
                ax_acc.vlines(r["guidance"], *(100 * c for c in r["accuracy_ci"]), color=line.get_color(), alpha=0.35,
                              linewidth=1.5)
    if floor is not None:
        ax_fd.axhline(floor["value"], color="gray", linestyle=":", label="data floor")
        if floor.get("accuracy") is not None:
            ax_acc.axhline(100 * floor["accuracy"], color="gray", linestyle=":", label="judge on real images")
    ax_fd.set_xlabel("guidance scale w")
    ax_fd.set_ylabel("FD-text-digits (n = 1,400)")
    ax_acc.set_xlabel("guidance scale w")
    ax_acc.set_ylabel("prompt accuracy (%)")
    for ax in (ax_fd, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_fd.legend(fontsize=7)
    fig.suptitle("w-conditioned students of text-digits-sd against the teacher's guidance trade-off", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
