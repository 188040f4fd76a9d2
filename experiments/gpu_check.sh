#!/usr/bin/env bash
# The main job's resource handling on a GPU machine, as a user meets it. Run from the project root with the
# project's stack importable (Ray, MLflow, torch with CUDA):
#
#   bash experiments/gpu_check.sh [OUT_DIR]
#
# 1. an impossible request (more GPU workers than GPUs) must stop with one line and exit 2 within seconds;
# 2. with no run.* settings, a training job must take the GPU by default (run.use_gpu=auto) with one worker
#    per GPU, and finish;
# Run it with Ray and MLflow reached through PYTHONPATH only (as HPC module systems provide them) to check that
# the workers' PYTHONPATH extends the caller's instead of replacing it: step 2 then fails if it does not.
# Each step prints one result line; the exit status is the number of failed steps.
set -u
out=${1:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-python}
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
failed=0
now() { date +%s.%N; }
secs() { $py -c "print(f'{$2 - $1:.1f}')"; }
common=(--config experiments/configs/smoke.yaml train.epochs=1 "run.storage_path=$out/ray"
        "tracking.uri=sqlite:///$out/mlflow.db" "tracking.offline_dir=$out/offline")

t0=$(now)
$py experiments/train.py "${common[@]}" run.use_gpu=true "run.num_workers=$((gpus + 1))" >"$out/impossible.log" 2>&1
rc=$?
t1=$(now)
if [ "$rc" -eq 2 ] && grep -q "GPUs, the cluster has" "$out/impossible.log"; then verdict=ok; else verdict=FAILED; failed=$((failed + 1)); fi
echo "1. $((gpus + 1)) GPU workers on $gpus GPU(s): exit $rc after $(secs "$t0" "$t1") s [$verdict]: $(grep -m1 '^error:' "$out/impossible.log")"

t0=$(now)
$py experiments/train.py "${common[@]}" run.num_workers=null run.use_gpu=auto run.name=gpu-default \
    >"$out/default.log" 2>&1
rc=$?
t1=$(now)
line=$(grep -m1 "resources:" "$out/default.log" | sed 's/.*resources: //')
if [ "$rc" -eq 0 ] && grep -q "$gpus GPU worker(s)" "$out/default.log"; then verdict=ok; else verdict=FAILED; failed=$((failed + 1)); fi
echo "2. defaults on $gpus GPU(s): exit $rc after $(secs "$t0" "$t1") s [$verdict]: $line"

echo "   PYTHONPATH=${PYTHONPATH:-<unset>}"
exit "$failed"
