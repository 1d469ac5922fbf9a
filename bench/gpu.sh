#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 machine (results: docs/benchmarks.md).
#   bash bench/gpu.sh OUT_DIR [STEP...]      STEP: index relax train search e2e (default: all)
# Needs python3 with a CUDA torch. ctsearch's other dependencies come from .whl/ when python3
# cannot import ray (bench/gpu_wheels.sh fills it on a machine with a package registry); nothing
# is fetched from the internet. Each step has its own time limit and log (OUT_DIR/<step>.log); a
# failing step does not stop the others. The whole script stays within GPU_BUDGET_S seconds
# (default 470: under 8 minutes, installing included): a step gets at most what is left, and a
# step that would get under 20 s is skipped and says so. The default steps are in order of what
# the GPU figures lack; e2e (~2 minutes) runs when named.
set -u
out=${1:-gpu-out}
shift || true
steps=${*:-index train relax search}
budget=${GPU_BUDGET_S:-470}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import ray, nibabel, pydicom, faiss" 2>/dev/null; then
    if [ ! -d /tmp/site/ray ]; then
        echo "=== installing .whl/ into /tmp/site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=${GPU_WORK:-/tmp/ctsearch-gpu}
mkdir -p "$work"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the ${budget}s budget left: $*"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local rc=$?
    grep -v "Warning\|warn(" "$out/$name.log" | tail -n 26
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi -L
python3 -c "import torch, ray; print('torch', torch.__version__, torch.cuda.get_device_name(), '| ray', ray.__version__)"
for s in $steps; do
    case $s in
    index)
        # The GPU pipeline against min(bare model, cores x decode), then the null encoder on the
        # same archive: the pipeline against the node's 16 decoding cores alone.
        step index 130 python3 bench/index.py --device cuda --backbone resnet50 --volumes 64 --distinct 4 \
            --size 512 --batch-size 256 --archive "$work/arc" --stats
        step index 70 python3 bench/index.py --backbone null --volumes 64 --size 512 --batch-size 256 \
            --num-cpus "$(($(nproc) + 1))" --archive "$work/arc" ;;
    relax)
        step relax 50 python3 bench/relax.py --device cuda --repeats 2
        step relax 120 python3 bench/relax.py --device cuda --repeats 2 --compile ;;
    train)
        step train 120 python3 bench/train.py --device cuda --seconds 2 --slices 512,128 ;;
    search)
        step search 90 python3 bench/search.py --device cuda --sizes 300000 --queries 100 --baseline-queries 1 ;;
    e2e)
        step e2e 140 bash -c "set -ex; w=$work/e2e; rm -rf \$w
          python3 -m ctsearch synth \$w/a --volumes 6 --size 128 --format nifti --quiet
          python3 -m ctsearch prepare \$w/a/nifti \$w/p --protocol decathlon --train-volumes 4 --quiet
          python3 -m ctsearch train \$w/p \$w/r --backbone resnet50 --image-size 128 --init random --epochs 2 \
              --batch-size 16 --eval-every 1 --workers 1 --gpus-per-worker 1 --json
          python3 -m ctsearch index \$w/a/nifti --model \$w/r --out \$w/i --gpus 1 --json
          python3 -m ctsearch search \$w/i liver_0:20 -k 3 --device cuda --json
          python3 -m ctsearch evaluate \$w/p --model \$w/r --gpus 1 --relax-masks 300 --json" ;;
    *) echo "unknown step $s" ;;
    esac
done
