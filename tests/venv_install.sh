# Sourced by .ci/run and tests/trn1_line.sh: `venv_install VENV PIP-ARGS...` installs into the virtual
# environment VENV with uv where uv can be installed into it, else with pip; the same requirements and
# constraints either way (the resolved package sets were compared: equal). uv downloads, unpacks and
# compiles in parallel. It compiles bytecode at install, as pip does, because --compile-bytecode is not its
# default: where PYTHONDONTWRITEBYTECODE is set (this CI machine sets it) every process would otherwise
# compile torch, transformers and the rest from source at each import (measured: most of a trn1 test's
# time went to source_to_code).
venv_install() {
    local venv=$1
    shift
    if [ "${TRNFT_INSTALLER:-uv}" = uv ]; then
        if [ -x "$venv/bin/uv" ] || "$venv/bin/python" -m pip install --quiet uv >/dev/null 2>&1; then
            "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "$@" && return 0
            echo "venv_install: uv could not install $*; trying pip"
        fi
    fi
    "$venv/bin/python" -m pip install --quiet "$@"
}
