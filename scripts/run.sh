#!/usr/bin/env bash
# Set up (if needed) and run the default study: SimCLR and MoCo on Fashion-MNIST, searched with Ray Tune +
# Optuna on a local Ray cluster (dashboard on 127.0.0.1), results in Parquet. Extra arguments go to the launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m study.launch "$@"
