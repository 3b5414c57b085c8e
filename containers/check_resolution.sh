#!/usr/bin/env bash
# Does each image's PyPI part resolve at the pinned versions? pip's resolver, without installing, against
# the package index (the AWS-only packages, torch-neuronx / neuronx-cc / nki / neuronx-distributed, are
# not on PyPI and are left to the image builds):
#   gpu            trnft + vLLM 0.33.0 + Ray 2.60.0 under containers/constraints/current.txt, for the GPU image's Python
#   neuron-native  trnft + Ray 2.60.0 under containers/constraints/current.txt, for Python 3.12 (Ubuntu 24.04)
#   trn1           containers/constraints/trn1.txt, for Python 3.11 (the Neuron DLC's)
# Prints "check_resolution: <image> resolves" or pip's conflict and exits non-zero. Needs the index;
# takes a few minutes (vLLM's dependency tree).
#   containers/check_resolution.sh [gpu] [neuron-native] [trn1]
set -uo pipefail
cd "$(dirname "$0")/.."
images=("$@")
[ "${#images[@]}" -gt 0 ] || images=(gpu neuron-native trn1)
wheels_for() {  # pip's target-interpreter flags: that Python, binary wheels for glibc 2.39 (Ubuntu 24.04) and older
    echo --only-binary=:all: --python-version "$1" --implementation cp --platform any --platform linux_x86_64 \
        --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64
    for minor in $(seq 5 39); do echo --platform "manylinux_2_${minor}_x86_64"; done
}
failed=0
for image in "${images[@]}"; do
    case "$image" in
        gpu) args=(-c containers/constraints/current.txt "vllm==0.33.0" "ray[default,train]==2.60.0" .) ;;
        neuron-native) args=(-c containers/constraints/current.txt $(wheels_for 3.12) --target /tmp/check-resolution "ray[default,train]==2.60.0" .) ;;
        trn1) args=(-r containers/constraints/trn1.txt $(wheels_for 3.11) --target /tmp/check-resolution) ;;
        *) echo "check_resolution: unknown image $image" >&2; exit 2 ;;
    esac
    if out=$(python -m pip install --dry-run --ignore-installed --quiet --report - "${args[@]}" 2>&1 >/tmp/check-resolution-$image.json); then
        count=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))['install']))" "/tmp/check-resolution-$image.json")
        echo "check_resolution: $image resolves ($count packages)"
    else
        echo "$out" | grep -v "^WARNING: Location" | tail -40
        echo "check_resolution: $image does NOT resolve"
        failed=$((failed + 1))
    fi
done
exit "$failed"
