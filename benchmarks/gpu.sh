#!/usr/bin/env bash
# GPU benchmark for a machine whose image has PyTorch with CUDA, numpy, onnx and onnxruntime
# (maybe without the CUDA provider), maybe TensorRT, maybe not this package, maybe not click:
#   torch CUDA eager / CUDA graphs / torch.compile (max-autotune), TensorRT (strongly typed
#   engines built with dunet_deploy.export), ONNX Runtime CUDA (IOBinding).
#
#   bash benchmarks/gpu.sh            # full: dunet, unet3d, unet2d; fp32/fp16/bf16; 1..64
#   bash benchmarks/gpu.sh --quick    # dunet and unet3d; fp16/bf16; batches 1, 8, 32
#
# Either mode stops measuring at DEADLINE seconds (default 480) and the whole script is
# killed DEADLINE+90 s after it starts. bench.json is rewritten after every record, so
# whatever was measured before a crash, a kill or the deadline is kept.
# Results: benchmarks/results/<date>-<gpu-slug>/bench.{json,md,png}; the path is printed.
#
# Environment overrides: PYTHON (python3), OUT, DEADLINE, and everything
# dunet_deploy.bench.script reads (MODELS, BACKENDS, PRECISIONS, BATCHES, ITERS, TIME_BUDGET,
# CUDA_GRAPH=1, ...). What is not available (no CUDA provider, no TensorRT, bf16 engines...)
# is reported as skipped with the reason in bench.md, not an error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "gpu.sh: error: $*" >&2; exit 1; }
note() { echo "gpu.sh: $*" >&2; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (only --quick; set variables for the rest)" ;;
    esac
done
export QUICK
export DEADLINE="${DEADLINE:-480}"

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "no Python at '$PYTHON' (set PYTHON=/path/to/python)"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L >&2 || note "nvidia-smi failed; torch decides whether a GPU is usable"
else
    note "nvidia-smi not found; torch decides whether a GPU is usable"
fi
"$PYTHON" -c "import torch" 2>/dev/null || die "torch is not importable by $PYTHON"
"$PYTHON" - <<'PY' || die "torch sees no CUDA GPU (see the line above)"
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
print(f"gpu.sh: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)}", file=sys.stderr)
PY

# This package: the installed one, else the checkout on PYTHONPATH (no pip, no network).
if ! "$PYTHON" -c "import dunet_deploy" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    note "dunet_deploy not installed: using PYTHONPATH=$PWD"
fi
"$PYTHON" -c "import dunet_deploy" 2>/dev/null || die "cannot import dunet_deploy from $PWD"

# Required by the bench itself; the rest only narrows what is measured.
for mod in numpy onnx; do
    "$PYTHON" -c "import $mod" 2>/dev/null || die "Python module '$mod' is missing: pip install $mod"
done
"$PYTHON" -c "import matplotlib" 2>/dev/null \
    || note "matplotlib missing: no bench.png (pip install matplotlib)"
"$PYTHON" -c "import nibabel" 2>/dev/null \
    || note "nibabel missing: the end-to-end pipeline ratio is skipped (pip install nibabel)"
if "$PYTHON" -c "import onnxruntime as o, sys; \
        sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    note "ONNX Runtime with CUDAExecutionProvider: measured (IOBinding)"
else
    note "no ONNX Runtime CUDA provider (onnxruntime-gpu): ONNX Runtime reported as skipped"
fi
if TRT=$("$PYTHON" - 2>&1 <<'PY'
import sys
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.loaders import require_tensorrt
try:
    print(require_tensorrt())
except DunetError as exc:
    sys.exit(str(exc))
PY
); then
    note "TensorRT $TRT: engines are built with dunet_deploy.export (a minute or two each)"
else
    note "TensorRT not usable ($TRT): reported as skipped"
fi

SLUG=$("$PYTHON" -c "
import torch
from dunet_deploy.bench.core import slug
print(slug(torch.cuda.get_device_name(0)))")
export OUT="${OUT:-benchmarks/results/$(date +%F)-$SLUG}"
note "results -> $OUT (quick=$QUICK, deadline ${DEADLINE} s)"

# The bench stops starting work at DEADLINE; the kill is the backstop for a hung call.
status=0
timeout --signal=TERM --kill-after=15 "$((${DEADLINE%.*} + 90))" \
    "$PYTHON" -m dunet_deploy.bench.script || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    note "killed after $((${DEADLINE%.*} + 90)) s; $OUT/bench.json keeps what was measured"
fi
[[ $status -eq 0 ]] && echo "gpu.sh: results in $OUT (bench.md, bench.json, bench.png)"
exit "$status"
