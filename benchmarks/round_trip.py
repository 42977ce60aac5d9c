"""The cores' cache-line round trip: how far apart the CPUs this process runs on are, right now.

Two threads pinned to two CPUs pass a counter back and forth through one atomic (``csrc/round_trip.cpp``, built
once through ``torch.utils.cpp_extension``); the mean time per round trip is what a barrier or a row written by one
core and read by the other costs. On this project's 2-vCPU VMs it moved between about 60 and 600 ns from one
second to the next (the host places the vCPUs on near or distant cores), and the fused SimCLR loss's ratio to the
bare products moved with it (benchmarks/bench_loss.py prints it beside its ratios). Not a benchmark of ours.

    .venv/bin/python benchmarks/round_trip.py                 # a sample every half second for 30 s
    .venv/bin/python benchmarks/round_trip.py --seconds 120 --every 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "round_trip.cpp"
TRIPS = 20_000  # about 1-12 ms per sample at 60-600 ns


@cache
def _module() -> object | None:
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name="contrastive_study_round_trip", sources=[str(SOURCE)],
                                  extra_cflags=["-O2"], verbose=False)
    except Exception as error:  # no compiler here: the benchmarks still run, without this column
        print(f"round_trip: not built ({type(error).__name__}: {error})", file=sys.stderr)
        return None


def cpu_pair() -> tuple[int, int] | None:
    """The first two CPUs this process may run on (None with fewer than two)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def round_trip_ns(trips: int = TRIPS) -> float | None:
    """Mean nanoseconds per cache-line round trip between this process's first two CPUs; None where there are not
    two CPUs or the helper cannot be built. The calling thread's CPU affinity is left as it was."""
    pair, module = cpu_pair(), _module()
    if pair is None or module is None:
        return None
    try:
        return float(module.round_trip_ns(trips, *pair))  # type: ignore[attr-defined]
    except RuntimeError as error:  # say, a container that refuses pinning a thread: no column, not a failed run
        print(f"round_trip: {error}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to sample")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args(argv)
    pair = cpu_pair()
    if pair is None or round_trip_ns(1000) is None:
        print("round_trip: needs two CPUs and a C++ compiler")
        return 1
    print(f"# cache-line round trip between CPUs {pair[0]} and {pair[1]} (ns, {TRIPS} trips per sample)")
    samples, end = [], time.monotonic() + args.seconds
    while time.monotonic() < end:
        samples.append(round_trip_ns())
        print(f"{samples[-1]:.0f}", flush=True)
        time.sleep(args.every)
    if len(samples) >= 2:
        low, q1, mid, q3, high = min(samples), *statistics.quantiles(samples, n=4), max(samples)
        print(f"{len(samples)} samples: min {low:.0f}, quartiles {q1:.0f} / {mid:.0f} / {q3:.0f}, max {high:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
