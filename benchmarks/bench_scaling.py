"""Scaling: training images/s with 1 and 2 Ray Train workers on this machine, and the parallel efficiency.

Both sides run the real worker body (:func:`trainers.distributed.run_worker` inside ``TorchTrainer``) on the same
config, interleaved (1 worker, 2 workers, 1 worker, ...):

* 1 worker with both CPUs (2 torch threads), global batch B;
* 2 workers with one CPU each (1 thread each), global batch B (B/2 per worker): SimCLR negatives all-gathered with
  gradient, MoCo keys gathered into one queue, DDP gradient all-reduce over gloo, ``bn_mode`` as configured.

On one 2-core machine both sides have the same compute, so images/s(2 workers) / images/s(1 worker) *is* the
parallel efficiency of data parallelism here: what the collectives and the smaller per-worker matmuls cost.
Across machines (or GPUs) the same code scales the compute by N and keeps the communication per step listed in
the README (measured here only on loopback gloo).

Run (about 4 minutes on 2 cores; ``--quick``: one round of one epoch):

    .venv/bin/python benchmarks/bench_scaling.py --method simclr
    .venv/bin/python benchmarks/bench_scaling.py --method moco
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ray
from _common import load_note, machine_note, markdown_table, median, spread
from bench_ray_overhead import ray_run

from trainers.config import TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, one epoch")
    parser.add_argument("--method", default="simclr", choices=["simclr", "moco"])
    parser.add_argument("--subset", type=int, default=2048, help="pretraining images")
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bn-mode", default="shuffle", choices=["shuffle", "sync", "local"])
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds = 1, 1
    config = TrainConfig(method=args.method, batch_size=args.batch, pretrain_subset=args.subset, epochs=args.epochs,
                         probe=False, baselines=False, monitor_bank_size=0, loader_workers=0, device="cpu",
                         bn_mode=args.bn_mode)
    print(f"# bench_scaling ({machine_note()})\n", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scaling_") as folder:
            for r in range(args.rounds):
                for workers in (1, 2) if r % 2 == 0 else (2, 1):
                    runs[workers].append(ray_run(config, Path(folder), f"w{workers}-{r}", 2 / workers, workers))
                print(f"round {r + 1}/{args.rounds} done ({load_note()})", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    one, two = (median([run["ips"] for run in runs[w]]) for w in (1, 2))
    print(f"## {args.method}, global batch {args.batch}, {args.subset} Fashion-MNIST images x {args.epochs} epochs, "
          f"bn_mode {args.bn_mode}, {args.rounds} interleaved rounds\n")
    print(markdown_table(
        ["workers", "CPUs (threads) each", "training images/s", "spread"],
        [[1, "2 (2)", f"{one:.0f}", spread([run["ips"] for run in runs[1]])],
         [2, "1 (1)", f"{two:.0f}", spread([run["ips"] for run in runs[2]])]],
    ))
    print(f"\nparallel efficiency on this machine (2 workers / 1 worker, same total CPUs): {two / one:.2f}")
    print(f"Finished with {load_note()}.")


if __name__ == "__main__":
    main()
