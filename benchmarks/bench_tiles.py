"""The loss kernel's tile size: forward+backward time of both losses at several tile sizes, interleaved in one run.

``trainers.streamed_ce`` makes and exponentiates the logits one tile at a time; a tile holds
``TILE_BYTES_PER_THREAD x threads`` bytes of logits (whole rows of a column block). The module sets that from the
last-level cache (``tile_bytes_per_thread``); this script times the same calls with the setting replaced by each
size given, round-robin, and prints each size's median time as a ratio to the first size's. It is the measurement
behind the rule in ``tile_bytes_per_thread``. The calls are bench_loss's "ours", so where the fused C++ kernel
(``trainers.fused_ce``) is built they time it (one process's SimCLR, MoCo's unit queue); its threads each make
their own tiles of ``TILE_BYTES_PER_THREAD`` bytes (``cpu_tile_rows`` with ``one_thread``), so the sweep applies to
either path. The README's figures were measured before the fused kernel, on the eager path.

Run (under a minute on 2 idle cores):

    .venv/bin/python benchmarks/bench_tiles.py
    .venv/bin/python benchmarks/bench_tiles.py --tile-mib 2 16 128 --cases nt_xent:1024 info_nce:65536
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from _common import calls_for, interleaved, machine_note, markdown_table, median, spread
from bench_loss import DIM, INFO_NCE_TEMPERATURE, NT_XENT_TEMPERATURE, QUERIES, info_nce_case, nt_xent_case

from trainers import streamed_ce
from trainers.runtime import keep_freed_memory


def make_call(case: str) -> Callable[[], None]:
    """bench_loss's "ours" call (forward+backward on its inputs) for ``nt_xent:N`` or ``info_nce:K``."""
    name, size = case.split(":")
    if name == "nt_xent":
        return nt_xent_case(int(size), DIM, NT_XENT_TEMPERATURE, use_lightly=False).contenders["ours"]
    if name == "info_nce":
        return info_nce_case(QUERIES, int(size), DIM, INFO_NCE_TEMPERATURE, use_lightly=False).contenders["ours"]
    raise SystemExit(f"unknown case {case!r}: use nt_xent:N or info_nce:K")


def with_tile(call: Callable[[], None], tile_bytes: int) -> Callable[[], None]:
    def run() -> None:
        streamed_ce.TILE_BYTES_PER_THREAD = tile_bytes
        call()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tile-mib", type=int, nargs="+", default=[2, 4, 8, 16, 32, 128],
                        help="tile sizes per thread in MiB; ratios are to the first")
    parser.add_argument("--cases", nargs="+", default=["nt_xent:256", "nt_xent:1024", "nt_xent:4096",
                                                       "info_nce:4096", "info_nce:65536"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--target-ms", type=float, default=150.0, help="length of one timed sample")
    args = parser.parse_args()
    keep_freed_memory()
    default = streamed_ce.TILE_BYTES_PER_THREAD
    print(f"# bench_tiles ({machine_note()})\n")
    print(f"last-level cache: {streamed_ce.last_level_cache_bytes()} bytes; the module's setting: "
          f"{default >> 20} MiB per thread\n")
    headers = ["case"] + [f"{mib} MiB" for mib in args.tile_mib] + ["spread (first)"]
    rows = []
    for case in args.cases:
        call = make_call(case)
        contenders = {mib: with_tile(call, mib << 20) for mib in args.tile_mib}
        calls = calls_for(contenders[args.tile_mib[0]], args.target_ms / 1000)
        samples = interleaved({str(mib): fn for mib, fn in contenders.items()}, rounds=args.rounds, calls=calls)
        first = median(samples[str(args.tile_mib[0])])
        ratios = [f"{median(samples[str(mib)]) / first:.3f}x" for mib in args.tile_mib]
        rows.append([case, *ratios, spread(samples[str(args.tile_mib[0])])])
        print(f"done: {case} ({first * 1e3:.3f} ms per call at {args.tile_mib[0]} MiB)", flush=True)
    streamed_ce.TILE_BYTES_PER_THREAD = default
    print("\nmedian time per forward+backward, as a ratio to the first tile size:\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
