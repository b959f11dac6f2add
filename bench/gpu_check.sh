#!/usr/bin/env bash
# The GPU checks of issue 22 in one run, for a fresh GPU machine with no network (the device
# tool's H200: torch, timm, numpy, scipy, pillow, httpx, prometheus-client and uvloop, no
# fastapi/uvicorn/pydantic/litserve). Records land in OUTDIR as JSON, one per check.
#
#   here, once:  bash bench/gpu_check.sh --prepare
#       wheels for Python 3.12 of what that machine lacks into .whl/ (git-ignored), and .gpu/
#       (git-ignored) linking to a folder outside the tree with a part of the CIFAR-10 JPEG
#       copy (GPU_TRAIN_PER_CLASS training + GPU_TEST_PER_CLASS test images per class) and
#       Debian's `hey` load generator
#   there:       bash bench/gpu_check.sh OUTDIR    (carry: .whl .gpu/cifar10-part.zip .gpu/hey)
#
# Checks, each bounded by `timeout` so the whole stays under 7 minutes:
#   1. train CIFAR-10 (poolnet, cached memory) with --device cuda: epoch times, images/s,
#      test accuracy (record train-gpu.json; the same settings on the CPU: train-cpu-ref.json,
#      made here by --prepare-cpu-ref when there is time for it)
#   2. serve model_store/cifar10 with DEVICE=cuda and LitServe (accelerator cuda, 1 and 2
#      workers) on the same GPU, load from `hey` at 1 and 64 clients (bench.perf.load,
#      record gpu-load.json; every server's answers compared with ours)
#   3. the state hash of a DEVICE=cuda replica equals a DEVICE=cpu replica's on one log
#      (tests/test_serving_device.py's GPU test, run there)
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_PER_CLASS=${GPU_TRAIN_PER_CLASS:-700}
TEST_PER_CLASS=${GPU_TEST_PER_CLASS:-100}
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
        uvicorn==0.54.0 python-multipart==0.0.34 litserve==0.2.19"
TRAIN_FLAGS="--dataset cifar10 --backbone poolnet --memory cached --epochs 5 --seed 0 --no-progress
             --validation-size 500 --no-choose-threshold"

if [ "${1:-}" = "--prepare" ]; then
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d .whl $WHEELS
    rm -f .whl/uvloop-* .whl/watchfiles-* .whl/websockets-*  # that machine has uvloop; the rest unused
    mkdir -p /tmp/gpu-carry && ln -sfn /tmp/gpu-carry .gpu
    cp "$(command -v hey)" .gpu/hey
    python3 - "$TRAIN_PER_CLASS" "$TEST_PER_CLASS" <<'EOF'
import sys, zipfile
per = {"train": int(sys.argv[1]), "test": int(sys.argv[2])}
src = zipfile.ZipFile("../shared/data/cifar10-jpeg.zip")
seen = {}
with zipfile.ZipFile(".gpu/cifar10-part.zip", "w", zipfile.ZIP_STORED) as out:
    for name in sorted(src.namelist()):
        parts = name.split("/")
        if len(parts) == 3 and parts[2] and parts[0] in per:
            key = tuple(parts[:2])
            if seen.get(key, 0) < per[parts[0]]:
                seen[key] = seen.get(key, 0) + 1
                out.writestr(name, src.read(name))
print("wrote .gpu/cifar10-part.zip:", sum(seen.values()), "images")
EOF
    du -sh .whl .gpu/ 2>/dev/null; exit 0
fi

if [ "${1:-}" = "--prepare-cpu-ref" ]; then  # the same training on this machine's CPU
    mkdir -p bench/results
    python3 -m service train $TRAIN_FLAGS --data-dir .gpu/cifar10-part.zip --device cpu \
        --name cifar10-cpu-ref --store /tmp/gpu-ref-store
    cp /tmp/gpu-ref-store/cifar10-cpu-ref/metrics.json bench/results/train-gpu-check-cpu-ref.json
    exit 0
fi

OUT=${1:?usage: bench/gpu_check.sh OUTDIR | --prepare | --prepare-cpu-ref}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_RESULTS="$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.gpu:$PATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; date -u; } > "$OUT/machine.txt" || true

echo "== 1. training on the GPU"
start=$(date +%s)
timeout 150 python3 -m service train $TRAIN_FLAGS --data-dir .gpu/cifar10-part.zip --device cuda \
    --name cifar10-gpu --store /tmp/gpu-store 2>&1 | tail -20 || echo "training failed or timed out"
cp /tmp/gpu-store/cifar10-gpu/metrics.json "$OUT/train-gpu.json" 2>/dev/null || true
echo "training took $(( $(date +%s) - start )) s"

echo "== 2. serving on the GPU: this service and LitServe"
timeout 200 python3 -m bench.perf.load --model cifar10 --device cuda --images-zip .gpu/cifar10-part.zip --servers ours litserve-w1 litserve-w2 \
    --generators hey --bodies json --clients 1 64 --seconds 6 --repeats 2 --record gpu-load 2>&1 | tail -30 \
    || echo "load failed or timed out"

echo "== 3. a GPU replica and a CPU replica of one log"
timeout 90 python3 -m pytest -q tests/test_serving_device.py 2>&1 | tail -5 || true
ls -la "$OUT"
