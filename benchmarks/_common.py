"""Shared helpers of the benchmark scripts: interleaved timing, medians, Markdown tables, a machine note.

Not a benchmark itself. The scripts import it as ``_common`` (Python puts the script's folder on ``sys.path``).

Every comparison in these benchmarks is measured *interleaved* in one process: one sample of A, one of B,
one of C, then A again, with the order rotated every round, so that a busy neighbour on this shared 2-core
machine slows every contender alike. Only medians and ratios of such interleaved samples are meant to be quoted.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn``, averaged over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    calls: int = 1,
    warmup_rounds: int = 1,
    before_round: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds-per-call samples of every function, taken round-robin.

    Each round times ``calls`` consecutive calls of every function once, starting with a different function
    each round (A,B,C / B,C,A / C,A,B ...). ``warmup_rounds`` rounds are run first and discarded.
    ``before_round`` (untimed) runs before each timed round, say to sample the machine's state.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup_rounds + rounds):
        if before_round is not None and round_index >= warmup_rounds:
            before_round()
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = time_calls(fns[name], calls)
            if round_index >= warmup_rounds:
                samples[name].append(seconds)
    return samples


def calls_for(fn: Callable[[], object], target_s: float, *, max_calls: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` (at least 1); calls ``fn`` twice."""
    fn()
    once = time_calls(fn, 1)
    return max(1, min(max_calls, round(target_s / max(once, 1e-9))))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """The interquartile range relative to the median, e.g. ``±3%`` (a crude noise indicator)."""
    if len(values) < 4:
        low, high = min(values), max(values)
        return f"{(high - low) / 2 / statistics.median(values) * 100:.0f}% (half range)"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"±{(q3 - q1) / 2 / statistics.median(values) * 100:.0f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers already formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_note() -> str:
    """The 1/5/15-minute load averages, to show whether other work shared the machine."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else ``platform.processor()``) and the vector instructions
    torch's own kernels use: machines of the same kind differ in both, and ratios move with them."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def machine_note() -> str:
    """One line: CPU, torch threads, versions, load; printed above every table."""
    return (
        f"{platform.machine()} with {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}; {load_note()}"
    )
