#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with osp installed (editable) and its test extras.
# torch is pinned and installed FIRST: an unpinned torch resolved by another package pulls a
# multi-GB CUDA build, while torch==2.13.0 takes the CPU wheel where the machine provides one.
# Re-running is cheap: it does nothing when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${OSP_VENV:-.venv}
TORCH_SPEC=${OSP_TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.osp-installed"
want="$(sha256sum pyproject.toml setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "osp setup: installing into $VENV (first time takes about a minute)" >&2
pip install -q "$TORCH_SPEC"
# triton 3.7.1 is the version torch 2.13 CUDA builds require; on CPU it only runs in interpreter mode.
pip install -q "triton==3.7.1" -e ".[dev]"
echo "$want" > "$STAMP"
echo "osp setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
