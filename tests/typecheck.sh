#!/usr/bin/env bash
# Type-check the package with mypy at the level pyproject.toml's [tool.mypy] sets. The folders are installed
# as subpackages of `trnft` (package-dir), which no folder in the checkout is named; a temporary folder
# holding a `trnft` link to the checkout lets mypy read them under the names the code imports.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ln -s "$root" "$tmp/trnft"
cd "$tmp"
MYPYPATH="$tmp" python -m mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
    -p trnft.common -p trnft.gpu -p trnft.neuron -p trnft.jobspecs
