#!/usr/bin/env bash
# The GPU check: every figure of the GPU work in one command of at most 10 minutes, on one CUDA machine
# with its own torch:
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--tiny] [STEP...]     STEP: install probe lora full tests
#
#   benchmarks/gpu_check.sh --wheels .whl           # install, probe, lora, full: each step cut at its
#                                                   # budget (probe 100 s, lora 240 s, full 200 s)
#   benchmarks/gpu_check.sh --wheels .whl tests     # the `gpu`-marked tests (cut at 330 s), a run of its own
#
# probe (benchmarks/gpu_probe.py): one decoder layer's attention variants, recompute off/selective/full,
# the LM head's cross-entropy and FSDP2's one-rank cost; lora and full (benchmarks/gpu_throughput.py):
# Llama-3.1-8B shapes, 32 layers with LoRA and 16 (fewer where they do not fit) fully fine-tuned.
# No step stops the others: each prints "gpu_check: <step> ok|FAILED (exit N) in S s", every row is
# printed as soon as it is measured, and the exit status is the number of failed steps. Without STEP the
# first four run, in that order.
#
# trnft and what it needs beyond the machine's CUDA PyTorch go into a folder of their own
# ($TRNFT_GPU_SITE, default /tmp/trnft-gpu-site) put first on PYTHONPATH, so the machine's torch and
# transformers stay as they are; a step finds it there or installs it. With --wheels DIR (made by
# benchmarks/gpu_wheels.sh) nothing is downloaded: the machine may reach no package index. Without it
# the same packages come from PyPI. --tiny checks the script itself on a machine without a GPU: only trnft
# is installed (the environment has the rest), the tests skip what needs CUDA, and the benchmark runs its
# tiny shape on the CPU. Tests that need two GPUs, flash-attn or vLLM skip themselves when those are
# missing. Each benchmark mode works in shared memory when it has room (no model or checkpoint on disk)
# and deletes its folder before the next starts.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=""
tiny=""
steps=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=${2:?gpu_check: --wheels needs a folder}; shift 2 ;;
        --tiny) tiny=--tiny; shift ;;
        install | probe | lora | full | tests) steps+=("$1"); shift ;;
        *) echo "gpu_check: unknown argument $1 (steps: install probe lora full tests)" >&2; exit 2 ;;
    esac
done
[ "${#steps[@]}" -gt 0 ] || steps=(install probe lora full)
site=${TRNFT_GPU_SITE:-/tmp/trnft-gpu-site}
pip=(python -m pip install --quiet --no-deps --no-compile --target "$site")

install() {
    rm -rf "$site"
    if [ -n "$wheels" ]; then
        shopt -s nullglob
        local files=("$wheels"/*.whl) pins
        [ "${#files[@]}" -gt 0 ] || { echo "gpu_check: no wheels in $wheels (run benchmarks/gpu_wheels.sh)" >&2; return 1; }
        # By name from the folder: pip takes the one wheel of each that fits this machine's Python.
        mapfile -t pins < <(benchmarks/gpu_site_pins.sh)
        [ "${#pins[@]}" -gt 0 ] || return 1
        "${pip[@]}" --no-index --find-links "$wheels" "${pins[@]}" || return 1
    elif [ -z "$tiny" ]; then
        local pins
        mapfile -t pins < <(benchmarks/gpu_site_pins.sh)
        [ "${#pins[@]}" -gt 0 ] || return 1
        "${pip[@]}" "${pins[@]}" || return 1
    fi
    # trnft itself, built with the machine's setuptools (no build environment to download).
    "${pip[@]}" --no-index --no-build-isolation . || return 1
}

describe() {
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python - "$tiny" <<'PY'
import sys
import torch
if not torch.cuda.is_available() and sys.argv[1] != "--tiny":
    sys.exit("gpu_check: no CUDA device")
# Everything the later steps import, so a missing package fails the install step, not a step minutes later.
import datasets, lightning, peft, transformers
import trnft
import trnft.common.fsdp.trainer
where = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
print(f"gpu_check: {where}; torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}; trnft from {trnft.__path__[0]}", flush=True)
PY
}

run_step() {
    case "$1" in
        install) install && describe ;;
        tests) timeout 330 python -m pytest -q -p no:cacheprovider -m gpu -rs tests ;;
        probe) timeout 100 python benchmarks/gpu_probe.py $tiny ;;
        lora) timeout 240 python benchmarks/gpu_throughput.py --modes lora $tiny ;;
        full) timeout 200 python benchmarks/gpu_throughput.py --modes full $tiny ;;
    esac
}

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
failed=0
for step in "${steps[@]}"; do
    if [ "$step" != install ] && [ ! -d "$site/trnft" ]; then
        echo "gpu_check: $site has no trnft; installing first"
        run_step install || { echo "gpu_check: install FAILED"; failed=$((failed + 1)); break; }
    fi
    start=$SECONDS
    if [ "$step" = install ]; then
        run_step install
    else
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" run_step "$step"
    fi
    code=$?
    if [ "$code" -eq 0 ]; then
        echo "gpu_check: $step ok in $((SECONDS - start)) s"
    else
        echo "gpu_check: $step FAILED (exit $code) in $((SECONDS - start)) s"
        failed=$((failed + 1))
        [ "$step" = install ] && break  # nothing else can run without it
    fi
done
exit "$failed"
