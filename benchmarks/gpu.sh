#!/usr/bin/env bash
# GPU benchmark for a machine whose image has PyTorch with CUDA, onnx and onnxruntime
# (maybe without the CUDA provider), maybe TensorRT, and maybe not this package:
#   torch CUDA eager fp32 / fp16 / bf16 (autocast), torch CUDA graphs, ONNX Runtime CUDA
#   (fp32 and the mixed fp16 ONNX), TensorRT (engines built with dunet_deploy.export),
# for dunet, unet3d, unet2d at 192×192, batches 1..128.
# Results: benchmarks/results/<date>-<gpu-slug>/bench.{json,md,png}; the path is printed.
#
# Environment overrides: PYTHON (default python3), OUT, ITERS (50), TIME_BUDGET (20),
# BATCHES (1,4,8,16,32,64,128). Extra arguments go to dunet-bench.
# What is not available (no CUDA provider, no TensorRT, bf16 engines...) is reported as
# skipped with the reason in bench.md, not an error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "gpu.sh: error: $*" >&2; exit 1; }
note() { echo "gpu.sh: $*" >&2; }

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

# This package: use the installed one, else install it in place without touching
# dependencies (no network needed), else put the checkout on PYTHONPATH.
if ! "$PYTHON" -c "import dunet_deploy" 2>/dev/null; then
    if "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . >&2; then
        note "installed dunet-deploy in editable mode (--no-deps)"
    else
        note "pip install -e . failed; using PYTHONPATH=$PWD instead"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$PYTHON" -c "import dunet_deploy" 2>/dev/null || die "cannot import dunet_deploy from $PWD"

# Required by dunet-bench itself; the rest only narrows what is measured.
for mod in numpy onnx click; do
    "$PYTHON" -c "import $mod" 2>/dev/null || die "Python module '$mod' is missing: pip install $mod"
done
"$PYTHON" -c "import matplotlib" 2>/dev/null \
    || note "matplotlib missing: no bench.png (pip install matplotlib)"
"$PYTHON" -c "import nibabel" 2>/dev/null \
    || note "nibabel missing: the end-to-end pipeline ratio is skipped (pip install nibabel)"
if "$PYTHON" -c "import onnxruntime as o, sys; \
        sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    note "ONNX Runtime with CUDAExecutionProvider: measured"
else
    note "no ONNX Runtime CUDA provider (onnxruntime-gpu): ONNX Runtime reported as skipped"
fi
if TRT=$("$PYTHON" - 2>&1 <<'PY'
import sys
from dunet_deploy.errors import DunetError
from dunet_deploy.export.tensorrt_build import check_tensorrt_available
try:
    print(check_tensorrt_available())
except DunetError as exc:
    sys.exit(str(exc))
PY
); then
    note "TensorRT $TRT: engines are built with dunet_deploy.export (takes minutes)"
else
    note "TensorRT not usable ($TRT): reported as skipped"
fi

SLUG=$("$PYTHON" -c "
import torch
from dunet_deploy.bench.core import slug
print(slug(torch.cuda.get_device_name(0)))")
OUT="${OUT:-benchmarks/results/$(date +%F)-$SLUG}"
note "results -> $OUT"

"$PYTHON" -m dunet_deploy.cli.bench \
    --device cuda \
    --models dunet,unet3d,unet2d \
    --backends torch,torch-cudagraphs,onnxruntime,tensorrt \
    --precision fp32,fp16,bf16 \
    --batch-sizes "${BATCHES:-1,4,8,16,32,64,128}" \
    --image-size 192 \
    --warmup 10 --iters "${ITERS:-50}" --min-iters 5 --time-budget "${TIME_BUDGET:-20}" \
    --e2e --e2e-model dunet --e2e-batch-size 32 \
    --out "$OUT" "$@"
echo "gpu.sh: results in $OUT (bench.md, bench.json, bench.png)"
