"""Commit a `make demo` (`distill quickstart`) output: its leaderboard, plot, grids and rows, not its weights.

    make demo && python evals/publish_quickstart.py demo-out
    make demo-text && python evals/publish_quickstart.py demo-text-out evals/quickstart-text-digits

Copies DIR/LEADERBOARD.md, DIR/plots/, DIR/grids/, DIR/results/ and each DIR/runs/<recipe>/{results.jsonl,
metrics.jsonl, grids/} into evals/quickstart/ or the folder named second (replacing it), keeping the layout so the markdown's links work.
Checkpoints and exported students stay out (megabytes of weights that `make demo` rebuilds).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "evals" / "quickstart"


def publish(src: Path, dest: Path = DEST) -> Path:
    if not (src / "LEADERBOARD.md").is_file():
        sys.exit(f"error: {src} has no LEADERBOARD.md; run `distill quickstart --out {src}` (make demo) first.")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(src / "LEADERBOARD.md", dest / "LEADERBOARD.md")
    for name in ("plots", "grids", "results"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
    for run in sorted((src / "runs").iterdir()):
        out = dest / "runs" / run.name
        out.mkdir(parents=True)
        for name in ("results.jsonl", "metrics.jsonl", "config.yaml"):
            if (run / name).is_file():
                shutil.copy2(run / name, out / name)
        if (run / "grids").is_dir():
            shutil.copytree(run / "grids", out / "grids")
    return dest


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(f"wrote {publish(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else DEST)}")
