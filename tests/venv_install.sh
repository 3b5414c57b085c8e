# Sourced by .ci/run and tests/trn1_line.sh: `venv_install VENV PIP-ARGS...` installs into the virtual
# environment VENV with uv where uv can be installed into it, else with pip; the same requirements and
# constraints either way (the resolved package sets were compared: equal). uv downloads and unpacks in
# parallel and compiles no bytecode up front: measured on the 2-core CI machine, the trn1 environment in 25 s
# instead of pip's 190 s and the current one in 15 s instead of 135 s. TRNFT_INSTALLER=pip forces pip.
venv_install() {
    local venv=$1
    shift
    if [ "${TRNFT_INSTALLER:-uv}" = uv ]; then
        if [ -x "$venv/bin/uv" ] || "$venv/bin/python" -m pip install --quiet uv >/dev/null 2>&1; then
            "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" "$@" && return 0
            echo "venv_install: uv could not install $*; trying pip"
        fi
    fi
    "$venv/bin/python" -m pip install --quiet "$@"
}
