"""Publish a run's evaluation into the committed results: rows, sample grids, and the leaderboard.

    python evals/publish.py runs/progressive            (after `distill run recipes/digits/progressive.yaml --out runs/progressive`)

Copies RUN/results.jsonl to evals/results/<protocol>-<run name>.jsonl (replacing it; grid paths rewritten to
evals/grids/), the run's grids to evals/grids/, and re-renders evals/LEADERBOARD.md and evals/plots/.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import cli  # noqa: E402
from distill.errors import DistillError  # noqa: E402


def publish(run: Path) -> Path:
    src = run / "results.jsonl"
    if not src.is_file():
        raise DistillError(f"{src} does not exist; run the recipe with an eval protocol first.")
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    for r in rows:
        if r.get("grid_png"):
            rel = Path(*Path(r["grid_png"]).parts[-2:])  # <model>/<sampler>-<steps>.png under the run's grids/
            dest = ROOT / "evals" / "grids" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            # the run's own grids are in RUN/grids/; `distill eval --out RUN/results.jsonl` puts its grids beside
            # that file (RUN/results-grids/), and the row names where
            src_png = Path(r["grid_png"])
            shutil.copyfile(src_png if src_png.is_file() else run / "grids" / rel, dest)
            r["grid_png"] = str(Path("evals") / "grids" / rel)
    proto = rows[0]["protocol"]["name"]
    out = ROOT / "evals" / "results" / f"{proto}-{run.name}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        print(f"wrote {publish(Path(sys.argv[1]))}")
    except DistillError as exc:
        sys.exit(f"error: {exc}")
    import os

    os.chdir(ROOT)
    cli.main(["leaderboard", "--md", "evals/LEADERBOARD.md", "--plots", "evals/plots"])
