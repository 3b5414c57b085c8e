#!/usr/bin/env bash
# The trn1 line's tests, in the trn1 line's own environment: torch 2.8.0, torch-xla 2.8.1, transformers
# 4.57.1, peft 0.17.0, optimum-neuron 0.4.5 (containers/constraints/trn1.txt). It cannot share a virtual
# environment with the current line's torch 2.14, so it lives in .venv-trn1 (TRNFT_TRN1_VENV), built on first
# use with Python 3.10 or 3.11 (optimum-neuron 0.4.5 supports no later one; TRNFT_TRN1_PYTHON picks it).
# Runs the tests marked `trn1` (the XLA path, optimum-neuron's trainer) and `both_lines` (shared code whose
# behaviour could differ between the lines): the default and slow selections, in one session. Exit 5 (nothing
# collected) counts as success, any other failure is returned.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
phase() { echo "trn1_line: [$((SECONDS - started)) s] $*"; }
venv=${TRNFT_TRN1_VENV:-.venv-trn1}
python=${TRNFT_TRN1_PYTHON:-python3.11}

if ! "$venv/bin/python" -c "import torch_xla, optimum.neuron, trnft" >/dev/null 2>&1; then
    echo "trn1_line: building $venv from containers/constraints/trn1.txt"
    # shellcheck source=tests/venv_install.sh
    . tests/venv_install.sh
    "$python" -m venv "$venv" || exit 1
    venv_install "$venv" -r containers/constraints/trn1.txt || exit 1
    venv_install "$venv" --no-deps -e . || exit 1
fi
"$venv/bin/python" -c "import torch, transformers, peft; print('trn1_line: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

run_pytest() {
    "$venv/bin/python" -m pytest "$@"
    local rc=$?
    [ "$rc" -eq 5 ] && { echo "trn1_line: pytest $* collected no tests (exit 5)"; rc=0; }
    return "$rc"
}
if [ $# -eq 0 ]; then
    # The default and slow selections in one session (module fixtures such as the uninterrupted reference
    # run are built once for both): "not faults or slow" is their union, as in .ci/run.
    phase "default and slow selections"
    run_pytest -m "not faults or slow" || exit $?
else
    phase "pytest $*"
    run_pytest "$@" || exit $?
fi
phase "done"
echo "trn1_line: passed"
