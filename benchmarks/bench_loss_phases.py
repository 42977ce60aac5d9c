"""Where the fused loss kernel's time goes, per thread and step, beside the bare matrix products (bench_loss's floor).

bench_loss.py gives one ratio per case (ours / the bare products). This script takes ours apart, for the fused
kernel of ``trainers/csrc/fused_ce.cpp``: it builds that file a second time with
``-DCONTRASTIVE_STUDY_PHASE_TIMERS`` (each thread then adds the wall time of its steps to its own counters; the build
the losses use has no timers) and runs, round after round, in one process:

* ``floor``: bench_loss's bare products (for nt_xent the (G + G^T) A form), both threads, a block of calls;
* ``ours``: the timed build's forward + backward (the kernel called directly, as ``trainers.fused_ce`` calls it),
  a block of as many calls, and the timers' means per call over that block;
* ``one thread's products``: one thread's share of the same products alone, with torch on one thread (for
  nt_xent at N = 256 on 2 threads: (256 x 128) @ (128 x 512) and (256 x 512) @ (512 x 128)).

Per round it prints ours / floor, the kernel call, what autograd and Python add around it (ours - call), and for
each thread its products and its time waiting (its time in the parallel region minus its steps: at the barriers
for the other thread, and at the end). Then the medians over rounds of every step, per thread. A thread whose
products or waiting stand out in some rounds shows the machine's state in those rounds (on a shared host one core
can run slower than the other for seconds); rounds where both threads' steps slow while the floor does not show
memory contention (the floor's operands stay in each core's L2; ours streams its inputs and logits through L3). The
last column is the cores' cache-line round trip sampled before the round (``benchmarks/round_trip.py``): how far
apart the host has put the two vCPUs at that moment.

Run (about 30 s per case):

    .venv/bin/python benchmarks/bench_loss_phases.py
    .venv/bin/python benchmarks/bench_loss_phases.py --sizes 256 1024 --queues 4096 --rounds 30
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import calls_for, machine_note, markdown_table, median, time_calls
from bench_loss import DIM, INFO_NCE_TEMPERATURE, NT_XENT_TEMPERATURE, QUERIES, info_nce_case, nt_xent_case
from round_trip import round_trip_ns

from trainers import fused_ce
from trainers.runtime import keep_freed_memory

TIMERS_FLAG = "-DCONTRASTIVE_STUDY_PHASE_TIMERS"
# The kernel's PhaseSlot order (trainers/csrc/fused_ce.cpp).
STEPS = ["normalise", "logits products", "exp pass", "scaling", "gradient products", "gradient rows"]
REGION, CALL = len(STEPS), len(STEPS) + 1


def load_timed_kernel() -> object:
    """The kernel built with its phase timers on (its own build name, so the losses' build is untouched)."""
    fused_ce.load()  # puts ninja on PATH as the losses' build does, and says why where the kernel cannot be built
    from torch.utils import cpp_extension

    return cpp_extension.load(name=f"{fused_ce.BUILD_NAME}_phase_timers", sources=[str(fused_ce.SOURCE)],
                              extra_cflags=[*fused_ce.CFLAGS, TIMERS_FLAG], verbose=False)


@dataclass
class Case:
    label: str
    floor: Callable[[], None]
    ours: Callable[[], None]
    one_thread_products: Callable[[], None]


def simclr(module: object, n: int, dim: int) -> Case:
    gen = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()
    beta, tile_rows = 1 / NT_XENT_TEMPERATURE, fused_ce.simclr_tile_rows(n, torch.float32)

    def ours() -> None:
        module.simclr_loss(z1, z2, beta, tile_rows).backward()  # type: ignore[attr-defined]
        z1.grad = z2.grad = None

    share = -(-2 * n // torch.get_num_threads())  # one thread's rows of 2n
    unit = F.normalize(torch.randn(2 * n, dim, generator=gen), dim=1)
    rows, logits, grad = unit[:share].clone(), torch.randn(share, 2 * n, generator=gen), torch.empty(share, dim)
    out = torch.empty(share, 2 * n)

    def one_thread_products() -> None:
        torch.mm(rows, unit.T, out=out)
        torch.mm(logits, unit, out=grad)

    floor = nt_xent_case(n, dim, NT_XENT_TEMPERATURE, use_lightly=False).contenders["floor"]
    return Case(f"nt_xent N={n} D={dim}", floor, ours, one_thread_products)


def moco(module: object, n: int, k: int, dim: int) -> Case:
    gen = torch.Generator().manual_seed(k + n)
    query = torch.randn(n, dim, generator=gen).requires_grad_()
    key = torch.randn(n, dim, generator=gen)
    queue = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    beta = 1 / INFO_NCE_TEMPERATURE
    tile_rows, block_columns = fused_ce.keyed_tiles(k, torch.float32)

    def ours() -> None:
        module.keyed_loss(query, key, queue, beta, tile_rows, block_columns).backward()  # type: ignore[attr-defined]
        query.grad = None

    share = -(-n // torch.get_num_threads())
    rows, logits = query[:share].detach().clone(), torch.randn(share, k, generator=gen)
    out, grad = torch.empty(share, k), torch.empty(share, dim)

    def one_thread_products() -> None:
        torch.mm(rows, queue.T, out=out)
        torch.mm(logits, queue, out=grad)

    floor = info_nce_case(n, k, dim, INFO_NCE_TEMPERATURE, use_lightly=False).contenders["floor"]
    return Case(f"info_nce N={n} K={k} D={dim}", floor, ours, one_thread_products)


def one_thread(fn: Callable[[], None], calls: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_calls(fn, calls)
    finally:
        torch.set_num_threads(threads)


def run(case: Case, module: object, rounds: int, target_s: float) -> None:
    calls = calls_for(case.ours, target_s)
    one_calls = calls_for(case.one_thread_products, target_s / 2)
    module.phase_times()  # type: ignore[attr-defined]  # drop the warm-up's
    round_rows, per_round = [], []
    for index in range(rounds):
        trip = round_trip_ns()
        order = [case.floor, case.ours] if index % 2 == 0 else [case.ours, case.floor]
        seconds = {}
        for fn in order:
            seconds[fn] = time_calls(fn, calls)
            if fn is case.ours:
                means, counted = module.phase_times()  # type: ignore[attr-defined]
        one = one_thread(case.one_thread_products, one_calls) * 1e6
        floor_us, ours_us = seconds[case.floor] * 1e6, seconds[case.ours] * 1e6
        threads = [t for t in range(means.shape[0]) if means[t, REGION] > 0]
        steps = {t: [float(means[t, s]) for s in range(len(STEPS))] for t in threads}
        waiting = {t: float(means[t, REGION]) - sum(steps[t]) for t in threads}
        products = {t: steps[t][1] + steps[t][4] for t in threads}
        call = float(means[0, CALL])
        per_round.append((steps, waiting, {t: float(means[t, REGION]) for t in threads}, call, ours_us, one))
        round_rows.append([index, f"{floor_us:.0f}", f"{ours_us:.0f}", f"{ours_us / floor_us:.3f}", f"{call:.0f}",
                           f"{ours_us - call:.0f}", f"{one:.0f}",
                           " / ".join(f"{products[t]:.0f}" for t in threads),
                           " / ".join(f"{waiting[t]:.0f}" for t in threads),
                           "n/a" if trip is None else f"{trip:.0f}"])
        assert counted == calls, f"timed {counted} kernel calls, expected {calls}"
    print(f"## {case.label}: {rounds} rounds of {calls} calls each (microseconds per call)\n")
    print(markdown_table(["round", "floor", "ours", "ours/floor", "kernel call", "autograd + Python (ours - call)",
                          "one thread's products alone", "products by thread", "waiting by thread",
                          "round trip ns"], round_rows))
    threads = sorted(per_round[0][0])
    summary = []
    for t in threads:
        summary.append([f"thread {t}", *(f"{median([r[0][t][s] for r in per_round]):.1f}" for s in range(len(STEPS))),
                        f"{median([r[1][t] for r in per_round]):.1f}", f"{median([r[2][t] for r in per_round]):.1f}"])
    print(f"\nMedians over the rounds, per thread: ours/floor "
          f"{median([float(row[3]) for row in round_rows]):.3f}; kernel call {median([r[3] for r in per_round]):.0f}; "
          f"autograd + Python {median([r[4] - r[3] for r in per_round]):.0f}; one thread's products alone "
          f"{median([r[5] for r in per_round]):.0f}\n")
    print(markdown_table(["thread", *STEPS, "waiting", "in the region"], summary))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256], help="nt_xent batch sizes N")
    parser.add_argument("--queues", type=int, nargs="*", default=[], help="info_nce queue lengths K")
    parser.add_argument("--queries", type=int, default=QUERIES, help="info_nce queries N")
    parser.add_argument("--dim", type=int, default=DIM, help="embedding size D")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per case")
    parser.add_argument("--target-ms", type=float, default=50.0, help="duration of one block of calls")
    args = parser.parse_args(argv)
    if fused_ce.load() is None:
        print("the fused kernel cannot be built here (see the warning above): nothing to take apart")
        return 1
    keep_freed_memory()  # as the trainers and bench_loss
    module = load_timed_kernel()
    round_trip_ns(100)  # builds the round-trip helper (once) before anything is timed
    print(f"# bench_loss_phases: the fused kernel's steps per thread ({machine_note()})\n")
    cases = [simclr(module, n, args.dim) for n in args.sizes]
    cases += [moco(module, args.queries, k, args.dim) for k in args.queues]
    for case in cases:
        run(case, module, args.rounds, args.target_ms / 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
