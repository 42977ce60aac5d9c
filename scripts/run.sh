#!/usr/bin/env bash
# Set up (if needed) and run the default job: SimCLR pretraining on Fashion-MNIST in this process, then the
# linear-probe / kNN evaluation against raw-pixel and random-init baselines. Extra arguments override flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trainers.pretrain --method simclr --pretrain-subset 10000 --epochs 5 --lr 0.5 "$@"
