#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels benchmarks/gpu_check.sh installs on a GPU machine
# that reaches nothing (an air-gapped node, a lent benchmark machine):
#
#   benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION...]  # default .whl and 3.11 to 3.13; about 22 MB
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
shift || true
# Whatever Python the GPU machine has: multiprocess publishes one wheel per Python version (the others are
# pure Python or abi3, one file for all); gpu_check.sh lets pip pick the one that fits.
pythons=("$@")
[ "${#pythons[@]}" -gt 0 ] || pythons=(3.11 3.12 3.13)
mapfile -t wheels < <(benchmarks/gpu_site_pins.sh)
[ "${#wheels[@]}" -gt 0 ] || exit 1
rm -rf "$dir"
mkdir -p "$dir"
for python in "${pythons[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "${wheels[@]}" || { echo "gpu_wheels: no wheels for Python $python" >&2; exit 1; }
done
# Every package is there, and only multiprocess has more than one file (one per Python version).
for pin in "${wheels[@]}"; do
    name=$(printf '%s' "${pin%%==*}" | tr '-' '_')
    found=$(find "$dir" -maxdepth 1 -iname "${name}-*.whl" | wc -l)
    expected=1
    [ "$name" = multiprocess ] && expected=${#pythons[@]}
    if [ "$found" -ne "$expected" ]; then
        echo "gpu_wheels: expected $expected wheel(s) of ${pin%%==*} in $dir, found $found" >&2
        exit 1
    fi
done
du -sh "$dir"
