#!/usr/bin/env bash
# The project's virtualenv (.venv): sourced by scripts/quickstart.sh and scripts/test.sh, or run by the
# Makefile (`bash scripts/venv.sh install EXTRAS`). Creates it once with `python3 -m venv`, puts its bin/
# first on PATH (so `python3` in the helper scripts and the tests' subprocesses is the venv's) and sets PY.
#
#   IDV_VENV=path     another location (default .venv in the checkout)
#   IDV_NO_VENV=1     use the interpreter on PATH (PYTHON, default python3) and install into it
#
# On Debian/Ubuntu the venv module is a separate package (python3-venv); as root it is installed when
# missing. If no venv can be made, this says so and falls back to the interpreter on PATH.
_venv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IDV_VENV:-$_venv_root/.venv}"

_venv_ok() { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

_venv_make() {
    local base="${PYTHON:-python3}"
    rm -rf "$VENV"
    "$base" -m venv "$VENV" >/dev/null 2>&1 && _venv_ok && return 0
    if ((EUID == 0)) && command -v apt-get >/dev/null; then
        local ver
        ver="$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)"
        echo "==> apt-get install python3-venv (the venv module is missing)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
            ${ver:+"python$ver-venv"} >/dev/null 2>&1; } || true
        rm -rf "$VENV"
        "$base" -m venv "$VENV" >/dev/null 2>&1 && _venv_ok && return 0
    fi
    rm -rf "$VENV"
    return 1
}

if [[ "${IDV_NO_VENV:-}" == 1 ]]; then
    PY="${PYTHON:-python3}"
elif _venv_ok || { echo "==> creating the virtualenv $VENV"; _venv_make; }; then
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
    PY="$VENV/bin/python"
else
    echo "==> could not create a virtualenv (python3 -m venv failed): using ${PYTHON:-python3} as it is" >&2
    PY="${PYTHON:-python3}"
fi
export PY

# pip_install EXTRAS: the package, editable, with those extras (quietly; pip's root warning dropped).
pip_install() {
    "$PY" -m pip install -q -e ".$1" 2>&1 | grep -v "Running pip as the 'root' user" || true
    "$PY" -c 'import consumer, producer' 2>/dev/null || { echo "pip install -e '.$1' failed" >&2; return 1; }
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run, not sourced
    set -euo pipefail
    cd "$_venv_root"
    case "${1:-}" in
        install) pip_install "${2:-[dev]}" ;;
        python) echo "$PY" ;;
        *) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    esac
fi
