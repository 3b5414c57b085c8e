# Sourced by .ci/run and tests/trn1_line.sh: `venv_install VENV PIP-ARGS...` installs into the virtual
# environment VENV with uv where uv can be installed into it, else with pip; the same requirements and
# constraints either way (the resolved package sets were compared: equal). uv downloads and unpacks in
# parallel (measured on the 2-core CI machine: the trn1 environment in 25 s instead of pip's 190 s, the
# current one in 15 s instead of 135 s). Bytecode: where PYTHONDONTWRITEBYTECODE is set (this CI machine's
# default environment sets it), nothing imported is ever cached, so every process would compile torch,
# transformers and the rest from source at each import (measured: most of a trn1 test's time went to
# source_to_code); there it compiles everything at install, as pip does. Elsewhere the first import of
# each module writes its bytecode, and only what is imported is compiled (.ci/run unsets the variable).
venv_install() {
    local venv=$1
    shift
    if [ "${TRNFT_INSTALLER:-uv}" = uv ]; then
        if [ -x "$venv/bin/uv" ] || "$venv/bin/python" -m pip install --quiet uv >/dev/null 2>&1; then
            local compile=()
            [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && compile=(--compile-bytecode)
            "$venv/bin/uv" pip install --quiet "${compile[@]}" --python "$venv/bin/python" "$@" && return 0
            echo "venv_install: uv could not install $*; trying pip"
        fi
    fi
    "$venv/bin/python" -m pip install --quiet "$@"
}
