#!/usr/bin/env bash
# Image entrypoint: on a Neuron host, check that driver, runtime and compiler belong together before
# running anything (python -m trnft.neuron.preflight says what to fix); then run the command.
set -euo pipefail
if compgen -G "/dev/neuron[0-9]*" >/dev/null || [ "${TRNFT_PREFLIGHT:-auto}" = "always" ]; then
    python -m trnft.neuron.preflight
fi
exec "$@"
