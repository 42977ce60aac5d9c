"""What Ray Train costs: training images/s inside a 1-worker ``TorchTrainer`` vs a plain process, and start-up.

Both sides run the same :class:`trainers.loop.Trainer` on the same config and data (a Fashion-MNIST subset,
probes and kNN monitor off) for the same number of epochs:

* ``ray``: ``make_torch_trainer(config, workers=1, cpus_per_worker=C, loop=...)`` and ``fit()``. The loop is
  the real worker body, :func:`trainers.distributed.run_worker` (builds the worker's Trainer, trains, reports
  every epoch with a checkpoint), with an ``after_epoch`` hook that writes the epoch's metrics and a wall-clock
  timestamp to a file;
* ``plain``: in this driver process, ``Trainer(config)`` (which loads the data itself, like the worker), then the
  same epochs, saving the same checkpoint after each (``save_checkpoint(trainer.state_dict(), ...)``).

Interleaved: ray, plain, ray, plain... (``--rounds`` of each, after nothing: every round is a fresh run).

Reported, medians over rounds:

* training images/s: the ``images_per_second`` that ``Trainer.train_epoch`` measures (only the steps and the
  data waits of an epoch), averaged over the run's epochs; the ratio ray/plain is the slowdown of the training
  loop itself inside a Ray worker (threads, the Ray processes competing for the 2 cores, ...);
* start-up: from the ``fit()`` call to the first training step (first epoch's end minus its ``epoch_time_s``),
  against the same span in the plain run (``Trainer(config)`` call to its first step: data loading + model);
* wall time of ``fit()`` against the plain run's wall time, and the difference: Ray Train's fixed cost per run
  (start-up, reporting, checkpoint upload to storage, controller polling, shutdown).

Threads: Ray gives each worker ``OMP_NUM_THREADS = cpus_per_worker``, so ``--cpus-per-worker C`` (default 2,
the whole machine) is matched by ``torch.set_num_threads(C)`` in the plain process; the worker's actual
``torch.get_num_threads()`` is printed. ``ray.init(num_cpus=2, include_dashboard=False)`` is called here and
``ray.shutdown()`` at the end; run storage goes to a temporary folder that is deleted.

Run (about 2.5 minutes on 2 cores; ``--quick`` under 1 minute):

    .venv/bin/python benchmarks/bench_ray_overhead.py
    .venv/bin/python benchmarks/bench_ray_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from _common import load_note, machine_note, markdown_table, median, spread

from trainers.config import TrainConfig
from trainers.distributed import make_torch_trainer, run_worker
from trainers.loop import Trainer, save_checkpoint


def _timed_loop(loop_config: dict[str, Any]) -> None:
    """The real worker body, logging each epoch's metrics and the wall clock to ``loop_config["log"]``."""
    log = Path(loop_config["log"])
    entered = time.time()

    def after_epoch(trainer: Trainer) -> None:
        if trainer.rank != 0:  # metrics are already averaged over ranks; one line per epoch
            return
        record = {"t": time.time(), "entered": entered, "threads": torch.get_num_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS"), **trainer.history[-1]}
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    run_worker(loop_config, after_epoch=after_epoch)


def ray_run(config: TrainConfig, storage: Path, name: str, cpus_per_worker: float, workers: int = 1) -> dict[str, Any]:
    """One ``TorchTrainer.fit()`` with the real worker body; rank 0's epochs are logged (every rank appends)."""
    log = storage / f"{name}.jsonl"
    trainer = make_torch_trainer(config, workers=workers, storage_path=str(storage), name=name,
                                 cpus_per_worker=cpus_per_worker, loop=_timed_loop, loop_extras={"log": str(log)})
    start = time.time()
    trainer.fit()
    wall = time.time() - start
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    first = epochs[0]
    return {
        "ips": statistics.mean(e["images_per_second"] for e in epochs),
        "to_first_step": first["t"] - first["epoch_time_s"] - start,
        "to_loop": first["entered"] - start,
        "to_first_report": first["t"] - start,
        "after_last_epoch": start + wall - epochs[-1]["t"],
        "wall": wall,
        "train_time": sum(e["epoch_time_s"] for e in epochs),
        "threads": f"{first['threads']} (OMP_NUM_THREADS={first['omp']})",
    }


def plain_run(config: TrainConfig, storage: Path, name: str) -> dict[str, Any]:
    start = time.time()
    trainer = Trainer(config)
    built = time.time()
    folder = storage / name
    while trainer.epoch < config.epochs:
        trainer.train_epoch()
        save_checkpoint(trainer.state_dict(), folder / "checkpoint.pt")
    wall = time.time() - start
    history = trainer.history
    return {
        "ips": statistics.mean(e["images_per_second"] for e in history),
        "to_first_step": built - start,
        "wall": wall,
        "train_time": sum(e["epoch_time_s"] for e in history),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, one epoch, 512 images")
    parser.add_argument("--method", default="simclr", choices=["simclr", "moco"])
    parser.add_argument("--subset", type=int, default=1024, help="pretraining images (quick: 512)")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (quick: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="ray/plain pairs of runs (quick: 1)")
    parser.add_argument("--cpus-per-worker", type=int, default=2,
                        help="Ray worker CPUs = torch threads of both sides (1 or 2 on this machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.epochs, args.rounds = 512, 1, 1

    config = TrainConfig(method=args.method, batch_size=args.batch, pretrain_subset=args.subset,
                         epochs=args.epochs, probe=False, baselines=False, monitor_bank_size=0,
                         loader_workers=0, device="cpu")
    torch.set_num_threads(args.cpus_per_worker)
    print(f"# bench_ray_overhead ({machine_note()})\n", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[dict[str, Any]]] = {"ray": [], "plain": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ray_") as folder:
            storage = Path(folder)
            for r in range(args.rounds):
                results["ray"].append(ray_run(config, storage, f"ray{r}", args.cpus_per_worker))
                results["plain"].append(plain_run(config, storage, f"plain{r}"))
                print(f"round {r + 1}/{args.rounds} done ({load_note()})", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()

    def med(side: str, key: str) -> float:
        return median([run[key] for run in results[side]])

    ray_ips, plain_ips = med("ray", "ips"), med("plain", "ips")
    pair_ratio = median([r["ips"] / p["ips"] for r, p in zip(results["ray"], results["plain"])])
    print(f"## Ray Train (1 worker, {args.cpus_per_worker} CPUs) vs plain process, {args.method}, "
          f"{args.subset} Fashion-MNIST images x {args.epochs} epochs, batch {args.batch}, {args.rounds} rounds\n")
    print(f"torch threads: worker {results['ray'][0]['threads']}, plain {torch.get_num_threads()}\n")
    print(markdown_table(
        ["", "ray", "plain", "ray/plain"],
        [
            ["training images/s (train_epoch)", f"{ray_ips:.0f}", f"{plain_ips:.0f}", f"{ray_ips / plain_ips:.2f}"],
            ["same, median of per-round ratios", "", "", f"{pair_ratio:.2f}"],
            ["spread of images/s", spread([x["ips"] for x in results["ray"]]),
             spread([x["ips"] for x in results["plain"]]), ""],
            ["start -> first step (s)", f"{med('ray', 'to_first_step'):.1f}", f"{med('plain', 'to_first_step'):.1f}",
             f"{med('ray', 'to_first_step') / med('plain', 'to_first_step'):.1f}"],
            ["wall time of the run (s)", f"{med('ray', 'wall'):.1f}", f"{med('plain', 'wall'):.1f}",
             f"{med('ray', 'wall') / med('plain', 'wall'):.1f}"],
            ["of which training epochs (s)", f"{med('ray', 'train_time'):.1f}", f"{med('plain', 'train_time'):.1f}",
             ""],
        ],
    ))
    fixed = median([r["wall"] - p["wall"] for r, p in zip(results["ray"], results["plain"])])
    print(f"\nRay Train fixed cost per run (fit() wall - plain wall, median of pairs): {fixed:.1f} s. "
          f"fit() -> worker loop entered: {med('ray', 'to_loop'):.1f} s; "
          f"fit() -> first report: {med('ray', 'to_first_report'):.1f} s; "
          f"end of last epoch -> fit() returned: {med('ray', 'after_last_epoch'):.1f} s.\n")
    print(markdown_table(
        ["round", "ray images/s", "plain images/s", "ray/plain", "ray wall (s)", "plain wall (s)"],
        [[i + 1, f"{r['ips']:.0f}", f"{p['ips']:.0f}", f"{r['ips'] / p['ips']:.2f}", f"{r['wall']:.1f}",
          f"{p['wall']:.1f}"] for i, (r, p) in enumerate(zip(results["ray"], results["plain"]))],
    ))
    print(f"\nFinished with {load_note()}.")


if __name__ == "__main__":
    main()
