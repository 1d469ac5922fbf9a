#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 machine (results: docs/benchmarks.md).
#   bash bench/gpu.sh OUT_DIR
# Needs python3 with a CUDA torch and ctsearch's dependencies importable; the repo root goes on
# PYTHONPATH here. Each step has its own time limit and log (OUT_DIR/<step>.log); a failing step
# does not stop the others. The limits add up to 580 s, inside one 10-minute device call.
set -u
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d)

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step train 130 python3 bench/train.py --device cuda
step relax 50 python3 bench/relax.py --device cuda
step search 180 python3 bench/search.py --device cuda --sizes 1000000 --queries 100 --baseline-queries 1
step index 80 python3 bench/index.py --device cuda --backbone resnet50 --volumes 8 --size 256
step e2e 140 bash -c "set -ex
  python3 -m ctsearch synth $work/a --volumes 6 --size 128 --format nifti --quiet
  python3 -m ctsearch prepare $work/a/nifti $work/p --protocol decathlon --train-volumes 4 --quiet
  python3 -m ctsearch train $work/p $work/r --backbone resnet50 --image-size 128 --init random --epochs 2 \
      --batch-size 16 --eval-every 1 --workers 1 --gpus-per-worker 1 --json
  python3 -m ctsearch index $work/a/nifti --model $work/r --out $work/i --gpus 1 --json
  python3 -m ctsearch search $work/i liver_0:20 -k 3 --device cuda --json
  python3 -m ctsearch evaluate $work/p --model $work/r --gpus 1 --relax-masks 300 --json"
