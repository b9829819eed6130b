#!/bin/bash
# Short probe runs of a recipe under overrides, one line of results each (used for the tuning tables in the
# README and evals/probes.md):
#
#   evals/probe.sh recipes/digits/consistency.yaml NAME "key=value key=value" [NAME "overrides" ...]
#
# Each probe is `distill run RECIPE --out runs/probes/NAME --fresh OVERRIDES` on one torch thread; the
# probes behind the committed tables ran two at a time on the 2-core machine. Lines go to runs/probes/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=$1; shift
mkdir -p runs/probes
while [ $# -gt 0 ]; do
  name=$1; overrides=$2; shift 2
  # shellcheck disable=SC2086
  .venv/bin/python -m distill.cli run "$recipe" --out "runs/probes/$name" --fresh trainer.progress=false \
    trainer.threads=1 trainer.checkpoint_every=0 $overrides > "runs/probes/$name.log" 2>&1
  fd=$(grep -o 'FD-digits [0-9.]* at [0-9]*' "runs/probes/$name.log" | awk '{printf "%s@%s ", $2, $4}')
  echo "$name [$overrides]: $fd $(grep -o 'in [0-9]* s' "runs/probes/$name.log")" | tee -a runs/probes/summary.txt
done
