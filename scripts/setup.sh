#!/usr/bin/env bash
# Idempotent setup on a fresh machine: Fashion-MNIST from Debian where apt exists, a virtualenv in .venv
# with the project and its test extra. Re-running is cheap: pip is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "[setup] installing dataset-fashion-mnist with apt"
        $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
            || echo "[setup] apt could not install dataset-fashion-mnist; torchvision will download it"
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
STAMP=.venv/.setup-stamp
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing the project and its test extra into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$WANT" > "$STAMP"
fi
# The fused C++ loss kernel: built once here (20-30 s) so that no training run waits for the compiler; where it
# cannot be built, this prints why and the losses use the eager path (same values, slower at small batches).
.venv/bin/python -m trainers.fused_ce
