#!/usr/bin/env bash
# Render one Kubernetes spec per stage into OUTDIR (00-config.yaml, 01-tokenize.yaml, ...), validate
# them offline and print the `kubectl apply` lines in order.
#   ./generate-jobspec.sh [CONFIG] [OUTDIR]
# CONFIG defaults to examples/llama31_8b_lora_trn1.yaml, OUTDIR to ./rendered. Any missing or invalid
# value stops with its key path; nothing partial is left in OUTDIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-$here/examples/llama31_8b_lora_trn1.yaml}"
outdir="${2:-rendered}"
if command -v trnft >/dev/null 2>&1; then
    exec trnft jobspec --config "$config" --out "$outdir" --validate
fi
exec python3 -m trnft.common.cli jobspec --config "$config" --out "$outdir" --validate
