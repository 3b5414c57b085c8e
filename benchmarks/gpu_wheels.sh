#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels benchmarks/gpu_check.sh installs on a GPU machine
# that reaches nothing (an air-gapped node, a lent benchmark machine):
#
#   benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]     # default .whl and 3.12; about 2 MB
#   benchmarks/gpu_check.sh --wheels DIR
#
# Only pure-Python packages the GPU tests and the throughput benchmark need beyond what a CUDA PyTorch
# image already has (torch, transformers, safetensors, tokenizers, numpy, pyarrow, pandas, pyyaml, jinja2,
# psutil, tensorboard, pytest, tqdm). lightning is the FSDP2 trainer's (with its two pure-Python
# dependencies); peft and datasets are pinned to the versions this repository's GPU path
# is tested with on transformers 5 (see README, "GPU check"); fsspec to what datasets 4.4.1 accepts.
# vLLM, flash-attn and the MiniLM scorer are too large to carry: their tests skip without them.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${2:-3.12}
mapfile -t wheels < <(benchmarks/gpu_site_pins.sh)
[ "${#wheels[@]}" -gt 0 ] || exit 1
rm -rf "$dir"
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${wheels[@]}"
# multiprocess publishes one wheel per Python version; keep exactly one of each package.
count=$(find "$dir" -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
    echo "gpu_wheels: expected ${#wheels[@]} wheels in $dir, found $count" >&2
    exit 1
fi
du -sh "$dir"
