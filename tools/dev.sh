#!/usr/bin/env bash
# One entry point for a fresh machine. It creates .venv (once), installs torch and the project
# with its test extra (again only when pyproject.toml changed), then runs the chosen job:
#
#   bash tools/dev.sh demo    # short CPU fine-tune of the SmolLM2 fixture, then a chat answer
#   bash tools/dev.sh test    # the whole test suite (kernels under the Triton interpreter on CPU)
#
# Extra arguments after the job name go to pytest (test) or are ignored (demo).
set -euo pipefail
cd "$(dirname "$0")/.."

job=${1:-}
case "$job" in demo|test|setup) shift ;; *) echo "usage: bash tools/dev.sh demo|test|setup [pytest args]" >&2; exit 2 ;; esac

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install "torch>=2.5,<3"          # CUDA machine: the registry's CUDA build
    else
        pip install "torch==2.13.0"          # CPU machine: the local CPU wheel, no CUDA packages
    fi
fi
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    pip install -e ".[test]"
    touch "$stamp"
fi

case "$job" in
    setup) ;;
    test) exec "$py" -m pytest -q tests "$@" ;;
    demo) exec "$py" -m tools.demo ;;
esac
