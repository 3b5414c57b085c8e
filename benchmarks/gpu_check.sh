#!/usr/bin/env bash
# Every `gpu`-marked test, then the throughput benchmark, on one CUDA machine with its own torch:
#
#   benchmarks/gpu_check.sh [--wheels DIR] [benchmark arguments...]
#
# trnft and what it needs beyond the machine's CUDA PyTorch go into a folder of their own
# ($TRNFT_GPU_SITE, default /tmp/trnft-gpu-site) put first on PYTHONPATH, so the machine's torch and
# transformers stay as they are. With --wheels DIR (made by benchmarks/gpu_wheels.sh) nothing is
# downloaded: the machine may reach no package index. Without it the same packages come from PyPI.
# Tests that need two GPUs, flash-attn or vLLM skip themselves when those are missing. Prints the
# benchmark's table last; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=""
if [ "${1:-}" = "--wheels" ]; then
    wheels=${2:?gpu_check: --wheels needs a folder}
    shift 2
fi
site=${TRNFT_GPU_SITE:-/tmp/trnft-gpu-site}
rm -rf "$site"
pip=(python -m pip install --quiet --no-deps --no-compile --target "$site")
if [ -n "$wheels" ]; then
    shopt -s nullglob
    files=("$wheels"/*.whl)
    [ "${#files[@]}" -gt 0 ] || { echo "gpu_check: no wheels in $wheels (run benchmarks/gpu_wheels.sh)" >&2; exit 1; }
    "${pip[@]}" --no-index "${files[@]}"
else
    "${pip[@]}" "peft==0.21.2" "datasets==4.4.1" "dill==0.4.0" "multiprocess==0.70.18" "fsspec==2025.10.0" \
        "lightning==2.5.6" "lightning-utilities==0.15.3" "torchmetrics==1.9.0"
fi
# trnft itself, built with the machine's setuptools (no build environment to download).
"${pip[@]}" --no-index --no-build-isolation .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device")
import peft, transformers
import trnft
print(f"gpu_check: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; trnft from {trnft.__path__[0]}")
PY
start=$SECONDS
timeout 300 python -m pytest -q -p no:cacheprovider -m gpu -rs tests
echo "gpu_check: gpu tests took $((SECONDS - start)) s"
start=$SECONDS
timeout 420 python benchmarks/gpu_throughput.py "$@"
echo "gpu_check: benchmark took $((SECONDS - start)) s"
