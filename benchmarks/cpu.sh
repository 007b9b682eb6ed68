#!/usr/bin/env bash
# Full CPU benchmark at 192×192: dunet, unet3d, unet2d × torch / onnxruntime / openvino
# (tensorrt listed so bench.md says why it is skipped) × fp32 / bf16 × batches 1,4,8,16,32.
#
# Sized for a 2-core machine (about 20 minutes): every record runs at least two timed
# iterations; further warm-ups and iterations only while they fit into TIME_BUDGET seconds.
# Results: benchmarks/results/<date>-<cpu-slug>/bench.{json,md,png}.
#
# Environment overrides: PYTHON, THREADS (default: all usable cores), TIME_BUDGET (8),
# ITERS (10), OUT (results folder). Extra arguments go to dunet-bench, e.g.
#   bash benchmarks/cpu.sh --models dunet --batch-sizes 1,8
# Run it on an otherwise idle machine: bench.json records the load average.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "cpu.sh: $*" >&2; exit 1; }

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "no Python at '$PYTHON' (set PYTHON=...)"
for mod in dunet_deploy torch onnx onnxruntime openvino click matplotlib nibabel; do
    "$PYTHON" -c "import $mod" 2>/dev/null \
        || die "Python module '$mod' is missing for $PYTHON: run 'make install' first"
done

CORES=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
THREADS="${THREADS:-$CORES}"
SLUG=$("$PYTHON" -c "
from dunet_deploy.bench.core import cpu_features, slug
print(f'{slug(cpu_features()[\"model\"])}-{$CORES}c')")
OUT="${OUT:-benchmarks/results/$(date +%F)-$SLUG}"

LOAD=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$LOAD" -v c="$CORES" 'BEGIN { exit !(l > 0.5 * c) }'; then
    echo "cpu.sh: warning: load average $LOAD on $CORES cores; other work will distort" \
         "the figures (bench.json records the load)" >&2
fi

echo "cpu.sh: $CORES cores, $THREADS threads -> $OUT" >&2
"$PYTHON" -m dunet_deploy.cli.bench \
    --models dunet,unet3d,unet2d \
    --backends torch,onnxruntime,openvino,tensorrt \
    --precision fp32,bf16 \
    --batch-sizes 1,4,8,16,32 \
    --image-size 192 \
    --warmup 1 --iters "${ITERS:-10}" --min-iters 2 --time-budget "${TIME_BUDGET:-8}" \
    --threads "$THREADS" --device cpu \
    --e2e --e2e-model dunet --e2e-batch-size 16 --e2e-repeats 2 \
    --out "$OUT" "$@"
echo "cpu.sh: results in $OUT (bench.md, bench.json, bench.png)"
