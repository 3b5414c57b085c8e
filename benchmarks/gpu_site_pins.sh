#!/usr/bin/env bash
# Print name==version for each package of benchmarks/gpu_site.txt, at containers/constraints/current.txt's
# version; a package the constraints do not pin is an error (exit 1), so the GPU check never floats.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
while read -r name; do
    case "$name" in '' | '#'*) continue ;; esac
    # pip freeze writes names as packages spell them (huggingface_hub); match - and _ alike
    pattern=$(printf '%s' "$name" | sed 's/[-_]/[-_]/g')
    line=$(grep -i -E "^${pattern}==" containers/constraints/current.txt || true)
    if [ -z "$line" ]; then
        echo "gpu_site_pins: $name is not pinned in containers/constraints/current.txt" >&2
        status=1
    else
        echo "$line"
    fi
done < benchmarks/gpu_site.txt
exit "$status"
