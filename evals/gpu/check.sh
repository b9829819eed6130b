#!/bin/bash
# The GPU check of the speed issue, as one prepared script for a lent GPU machine (the project's CI has none):
#
#   OUT=/tmp/gpu-check WHEELS=.gpuw evals/gpu/check.sh
#
# WHEELS: a folder of wheels for what the machine's Python lacks (diffusers, datasets, dill, multiprocess), installed
# with --no-deps into /tmp/site; an optional WHEELS/stub folder goes on the path if sklearn's digits do not load.
# Each part has its own time limit, so the whole stays under about nine minutes and what finished is kept:
#   1. trainer overhead (bench_trainer.py): each digits recipe against the bare loop, with the non-finite guard on
#      the device (the CUDA default) and on the host (nonfinite_guard=sync);
#   2. 1-step sampling throughput (bench_sampling.py) at batch 1 and 256;
#   3. the LCM recipe on the SD-shaped text teacher at its default 1,500 steps, scored as on the CPU;
#   4. fp16 and bf16 training steps, and the frozen teacher in bf16 (distill only);
#   5. torch.compile (inductor) of the teacher recipe and of the consistency recipe.
# Everything lands in $OUT/r and is packed into $OUT/results.tgz; the log is $OUT/log.txt.
set -u
OUT=${OUT:-/tmp/gpu-check}
WHEELS=${WHEELS:-.gpuw}
PY=${PY:-python3}
STEPS=${STEPS:-20}
DEVICE=${DEVICE:-cuda}  # a dry run of the script on a CPU: DEVICE=cpu STEPS=1 LCM_EXTRA="method.iters=2 eval.n=100"
LCM_EXTRA=${LCM_EXTRA:-}
mkdir -p "$OUT/r"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*"; }

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || say "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if ! $PY -c "from sklearn.datasets import load_digits; load_digits()" 2>/dev/null && [ -d "$WHEELS/stub" ]; then
  export PYTHONPATH=$PWD/$WHEELS/stub:$PYTHONPATH
  say "sklearn's digits did not load: using the stub"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/r/nvidia-smi.csv"
$PY -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
torch.cuda.get_device_name())" | tee "$OUT/r/versions.txt"

part() {  # part NAME LIMIT_S command...
  local name=$1 limit=$2; shift 2
  say "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$OUT/r/$name.log" 2>&1
  say "== $name: exit $?"
  tail -n 30 "$OUT/r/$name.log"
}

part trainer 130 $PY evals/bench_trainer.py --steps "$STEPS" --repeats 3 --warmup 5 \
  --methods teacher,teacher-sync,consistency,consistency-sync,progressive,adversarial --out "$OUT/r/trainer"
part sampling 50 $PY evals/bench_sampling.py --device "$DEVICE" --batches 1,256 --out "$OUT/r/sampling"
part lcm-sd 210 $PY -m distill.cli run recipes/text-digits/consistency-sd.yaml --out "$OUT/r/lcm-sd" \
  trainer.progress=false trainer.checkpoint_every=0 trainer.log_every=50 $LCM_EXTRA
part precision 60 $PY evals/bench_trainer.py --steps "$STEPS" --repeats 3 --warmup 5 \
  --methods teacher-bf16,teacher-fp16,consistency-bf16-teacher,consistency-bf16 --out "$OUT/r/precision"
part compile 110 $PY evals/bench_trainer.py --steps "$STEPS" --repeats 3 --warmup 5 \
  --methods teacher-compile,consistency-compile --out "$OUT/r/compile"
rm -rf "$OUT/r/lcm-sd/checkpoints"
tar czf "$OUT/results.tgz" -C "$OUT" r
say "done"
