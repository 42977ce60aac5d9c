"""Forward+backward time of our contrastive losses against a plain reference, lightly, and the matmul floor.

What is measured, per call (median over interleaved rounds, in milliseconds):

* ``nt_xent`` (SimCLR, ``trainers.losses``) on ``z1, z2`` of shape (N, D), N in {256, 1024, 4096}, D = 128,
  both with gradient, as the trainers call it (``ours``: the fused C++ kernel of ``trainers.fused_ce`` where it is
  built, which the header line says) and on the eager path alone (``ours eager``: ``trainers.streamed_ce``),
  against
  - ``reference``: the textbook version written below: normalise ``cat(z1, z2)``, one full (2N x 2N) similarity
    matrix, diagonal set to -1e9 in place, ``cross_entropy`` with the other view as the target;
  - ``lightly``: ``lightly.loss.NTXentLoss(temperature)`` (four (N x N) blocks, the diagonal removed by indexing);
  - ``floor``: the bare matrix products the loss cannot avoid, into preallocated outputs: forward
    (2N x D) @ (D x 2N), and backward the gradient of the logits A A^T with respect to A, (G + G^T) @ A: one
    (2N x 2N) @ (2N x D) product (forming G + G^T is an elementwise pass, like exp, and not in the floor; our
    kernel does it). The table also times two wider forms of the backward that other code uses, G @ A and
    G^T @ A as two products (autograd's, the reference's and lightly's), and E @ [A | W A] as one product of
    2D columns (our eager path's); the floor is the fastest of the three (so the ratio never flatters ours).
* ``info_nce`` (MoCo) with N = 256 queries (with gradient), N positive keys and K in {4096, 65536} queue
  negatives (no gradient, already unit-norm, as in MoCo's queue; ours is called as ``MoCo.forward`` calls it,
  with ``unit_negatives=True``), against
  - ``reference``: MoCo's own code: normalise q and k, ``einsum`` logits (positive first), ``cross_entropy``;
    the queue is used as stored (it holds normalised keys);
  - ``lightly``: ``NTXentLoss(temperature, memory_bank_size=(K, D))`` with its bank set to the same queue. It
    also clones its bank and enqueues the N keys on every call (our ``MoCo.forward`` clones the queue outside
    ``info_nce``, so that copy is not in our number);
  - ``floor``: forward (N x D) @ (D x K), backward one (N x K) @ (K x D) (the queue has no gradient, so the
    gradient needs only the query side).
* ``ours' kernel alone`` (both losses, where the fused kernel is built): the same kernel call as ``ours`` under
  ``torch.no_grad()``: it still makes the loss and its gradients (the kernel makes the gradients in its forward), but
  records no graph and runs no backward, so ``ours - kernel`` is what autograd adds to the call. Beside it,
  ``autograd call``: ``(x * 1.0).sum().backward()`` on a one-element leaf, the fixed cost of any forward+backward
  through autograd on this machine in the same rounds (the floor's bare products pay neither).
* ``floor + exp/sum pass`` (both losses): the floor (nt_xent: its (G + G^T) @ A form) plus the one elementwise
  pass that every exact softmax loss makes, ``exp`` of every logit and its row sum, done block by block right
  after each block's product (in cache). ``(floor + exp/sum)/floor`` is how much of issue #7's 1.3x allowance
  that pass alone takes on this machine.

Every row's contenders are timed in the same process, round-robin (ours, reference, lightly, floor, then again
with the order rotated), after a warm-up round; each sample averages enough back-to-back calls to last about
``--target-ms``. Ratios are of medians. Before each round the cores' cache-line round trip is sampled
(``benchmarks/round_trip.py``): on a VM it moves with where the host puts the vCPUs, and code whose threads pass
data between the cores slows with it where the bare products do not; the table gives its median and range per row.
Values are checked first: loss and input gradients of ours against the reference and lightly (relative tolerance
1e-5 on the loss; the max abs differences are printed).

Peak memory is measured, not estimated: one extra (untimed) call under ``torch.profiler`` with
``profile_memory=True``; the peak is the running sum of the CPU allocations and frees recorded during the
forward+backward (memory held by the inputs before the call is not counted). The size of one float32 logits
matrix is printed beside it for scale. The floor writes into preallocated buffers, so it has no peak. The same way,
a forward alone gives what each loss holds from its forward to its backward (the allocations it leaves: saved
tensors and the loss), which stays allocated while the rest of a model runs its backward.

Allocator: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so by default
the large rows (N = 4096, K = 65536) spend much of their time page-faulting new logits buffers in the kernel.
The trainers call :func:`trainers.runtime.keep_freed_memory` (glibc keeps freed memory for reuse), and so does
this benchmark unless ``--system-malloc`` is given; the setting applies to every contender alike (the floor
writes into preallocated buffers either way). The header line says which was in effect.

Run (about 1-2 minutes on 2 idle cores; ``--quick`` about 20 s):

    .venv/bin/python benchmarks/bench_loss.py
    .venv/bin/python benchmarks/bench_loss.py --quick

lightly is optional (``pip install -e .[bench]``); without it the lightly columns read "lightly not installed".
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _common import calls_for, interleaved, machine_note, markdown_table, median, spread
from round_trip import round_trip_ns
from torch import Tensor

from trainers import fused_ce
from trainers.losses import info_nce, nt_xent
from trainers.runtime import keep_freed_memory
from trainers.streamed_ce import BLOCK_COLUMNS

try:
    from lightly.loss import NTXentLoss

    LIGHTLY: str | None = None
except Exception as error:  # not installed, or broken by its own dependencies: run without it
    NTXentLoss = None  # type: ignore[assignment,misc]
    LIGHTLY = f"lightly not installed ({error})"

NOT_INSTALLED = "lightly not installed"
RTOL = 1e-5
DIM, QUERIES = 128, 256  # embedding size D and info_nce's N (defaults of --dim and --queries)
NT_XENT_TEMPERATURE, INFO_NCE_TEMPERATURE = 0.5, 0.2


# ------------------------------------------------------------------------------------------ references


def reference_nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent as usually written: a full (2N x 2N) similarity matrix with its diagonal masked."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-1e9)  # an anchor is never its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


def reference_info_nce(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE as in its reference code: the queue already holds unit-norm keys."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    positive = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    negative = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


# ----------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One row: the loss under test, its contenders as zero-argument fwd+bwd calls, and their inputs."""

    label: str
    logits_shape: tuple[int, int]
    contenders: dict[str, Callable[[], None]] = field(default_factory=dict)
    values: dict[str, Callable[[], tuple[Tensor, list[Tensor]]]] = field(default_factory=dict)
    forwards: dict[str, Callable[[], Tensor]] = field(default_factory=dict)  # the losses alone, for held_bytes

    def set_losses(self, losses: dict[str, Callable[[], Tensor]], leaves: list[Tensor]) -> None:
        """Each loss as a timed forward+backward, a value check and a forward alone."""
        self.contenders = {name: _fwd_bwd(fn, leaves) for name, fn in losses.items()}
        self.values = {name: _value(fn, leaves) for name, fn in losses.items()}
        self.forwards = dict(losses)


def _eager(loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``loss_fn`` on the eager path (trainers.streamed_ce), even where the fused kernel is built."""

    def call() -> Tensor:
        with fused_ce.eager_only():
            return loss_fn()

    return call


def _fwd_bwd(loss_fn: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], None]:
    def call() -> None:
        loss_fn().backward()
        for leaf in leaves:
            leaf.grad = None

    return call


def _value(loss_fn: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def call() -> tuple[Tensor, list[Tensor]]:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), list(grads)

    return call


def _kernel_alone(call: Callable[[], object]) -> Callable[[], None]:
    """The fused kernel's call without autograd: loss and gradients made, no graph recorded, no backward."""

    def run() -> None:
        with torch.no_grad():
            call()

    return run


def _autograd_call() -> Callable[[], None]:
    """A trivial forward+backward through autograd: what any loss called through autograd pays on top of its work."""
    leaf = torch.ones(1, requires_grad=True)

    def run() -> None:
        (leaf * 1.0).sum().backward()
        leaf.grad = None

    return run


def _column_blocks(rows: int, columns: int) -> list[Tensor]:
    return [torch.empty(rows, min(BLOCK_COLUMNS, columns - c0)) for c0 in range(0, columns, BLOCK_COLUMNS)]


def _logits_exp_sum(rows: Tensor, columns: Tensor, blocks: list[Tensor], sums: Tensor) -> None:
    """The floor's forward product plus the one elementwise pass no exact softmax loss avoids: exp of every logit
    and its row sum, done block by block (our kernel's column blocks, preallocated) right after each block's
    product, while the block is in cache. ``sums``: (blocks, rows) partial row sums."""
    for j, block in enumerate(blocks):
        c0 = j * BLOCK_COLUMNS
        torch.mm(rows, columns[c0 : c0 + block.shape[1]].T, out=block)
        torch.sum(block.exp_(), dim=1, out=sums[j])


def nt_xent_case(n: int, dim: int, temperature: float, *, use_lightly: bool) -> Case:
    gen = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()
    leaves = [z1, z2]
    losses: dict[str, Callable[[], Tensor]] = {
        "ours": lambda: nt_xent(z1, z2, temperature=temperature),
        "eager": _eager(lambda: nt_xent(z1, z2, temperature=temperature)),
        "reference": lambda: reference_nt_xent(z1, z2, temperature),
    }
    if use_lightly:
        lightly_loss = NTXentLoss(temperature=temperature)
        losses["lightly"] = lambda: lightly_loss(z1, z2)
    case = Case(f"nt_xent N={n} D={dim}", (2 * n, 2 * n))
    case.set_losses(losses, leaves)

    a = F.normalize(torch.randn(2 * n, dim, generator=gen), dim=1)
    g = torch.randn(2 * n, 2 * n, generator=gen)
    s, da1, da2 = torch.empty(2 * n, 2 * n), torch.empty(2 * n, dim), torch.empty(2 * n, dim)
    da, a_and_wa, da_wide = torch.empty(2 * n, dim), torch.cat([a, a], dim=1), torch.empty(2 * n, 2 * dim)

    def floor_symmetric() -> None:
        torch.mm(a, a.T, out=s)  # forward: all similarities
        torch.mm(g, a, out=da)  # backward: (G + G^T) A, G + G^T formed beforehand (the elementwise pass, not here)

    def floor_wide() -> None:
        torch.mm(a, a.T, out=s)
        torch.mm(g, a_and_wa, out=da_wide)  # backward, symmetric E: E @ [A | W A], both sides in one 2D product

    def floor_two() -> None:
        torch.mm(a, a.T, out=s)
        torch.mm(g, a, out=da1)  # backward: d/d(rows)
        torch.mm(g.T, a, out=da2)  # backward: d/d(columns)

    exp_blocks, exp_sums = _column_blocks(2 * n, 2 * n), torch.empty(-(-2 * n // BLOCK_COLUMNS), 2 * n)

    def floor_exp() -> None:
        _logits_exp_sum(a, a, exp_blocks, exp_sums)
        torch.mm(g, a, out=da)

    case.contenders["floor"] = floor_symmetric
    case.contenders["floor-wide"] = floor_wide
    case.contenders["floor-2"] = floor_two
    case.contenders["floor+exp"] = floor_exp
    module = fused_ce.load()
    if module is not None:
        tile_rows = fused_ce.simclr_tile_rows(n, torch.float32)
        case.contenders["kernel"] = _kernel_alone(lambda: module.simclr_loss(z1, z2, 1 / temperature, tile_rows))
    case.contenders["autograd call"] = _autograd_call()
    return case


def info_nce_case(n: int, k: int, dim: int, temperature: float, *, use_lightly: bool) -> Case:
    gen = torch.Generator().manual_seed(k + n)
    query = torch.randn(n, dim, generator=gen).requires_grad_()
    key = torch.randn(n, dim, generator=gen)
    queue = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    leaves = [query]
    losses: dict[str, Callable[[], Tensor]] = {
        # As MoCo calls it: the queue holds unit keys, so ours skips re-normalising them (as the reference does).
        "ours": lambda: info_nce(query, key, queue, temperature=temperature, unit_negatives=True),
        "eager": _eager(lambda: info_nce(query, key, queue, temperature=temperature, unit_negatives=True)),
        "reference": lambda: reference_info_nce(query, key, queue, temperature),
    }
    if use_lightly:
        lightly_loss = NTXentLoss(temperature=temperature, memory_bank_size=(k, dim))
        lightly_loss.memory_bank.bank = queue.clone()

        def lightly_value() -> Tensor:
            # The bank enqueues ``key`` on every call; for the value check it must hold exactly ``queue``.
            lightly_loss.memory_bank.bank = queue.clone()
            lightly_loss.memory_bank.bank_ptr.zero_()
            return lightly_loss(query, key)

        losses["lightly"] = lambda: lightly_loss(query, key)
    case = Case(f"info_nce N={n} K={k} D={dim}", (n, k + 1))
    case.set_losses(losses, leaves)
    if use_lightly:
        case.values["lightly"] = _value(lightly_value, leaves)

    q = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    g = torch.randn(n, k, generator=gen)
    s, dq = torch.empty(n, k), torch.empty(n, dim)

    def floor() -> None:
        torch.mm(q, queue.T, out=s)  # forward: query x queue similarities
        torch.mm(g, queue, out=dq)  # backward: the query gradient (the queue has none)

    exp_blocks, exp_sums = _column_blocks(n, k), torch.empty(-(-k // BLOCK_COLUMNS), n)

    def floor_exp() -> None:
        _logits_exp_sum(q, queue, exp_blocks, exp_sums)
        torch.mm(g, queue, out=dq)

    case.contenders["floor"] = floor
    case.contenders["floor+exp"] = floor_exp
    module = fused_ce.load()
    if module is not None:
        tiles = fused_ce.keyed_tiles(k, torch.float32)
        case.contenders["kernel"] = _kernel_alone(
            lambda: module.keyed_loss(query, key, queue, 1 / temperature, *tiles))
    case.contenders["autograd call"] = _autograd_call()
    return case


# ---------------------------------------------------------------------------------------------- checks


@dataclass
class Check:
    loss_diff: dict[str, float]
    grad_diff: dict[str, float]
    ok: dict[str, bool]
    grad_scale: float = 0.0


def check_values(case: Case) -> Check:
    ours_loss, ours_grads = case.values["ours"]()
    check = Check({}, {}, {})
    for name, fn in case.values.items():
        if name == "ours":
            continue
        loss, grads = fn()
        check.loss_diff[name] = float((ours_loss - loss).abs())
        check.grad_diff[name] = max(float((a - b).abs().max()) for a, b in zip(ours_grads, grads))
        check.grad_scale = max(float(g.abs().max()) for g in ours_grads)
        check.ok[name] = bool(torch.isclose(ours_loss, loss, rtol=RTOL, atol=0.0))
    return check


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop log lines (kineto writes them straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocations(fn: Callable[[], object]) -> list[int] | None:
    """The CPU allocation sizes (frees negative) during one call of ``fn``, in time order; ``None`` where the
    profiler's private API has changed. What ``fn`` returns stays alive until the events are read."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _returned = fn()  # alive until the events are read: a loss's saved state is what held_bytes measures
        events: list[tuple[int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except (AttributeError, RuntimeError):  # a private profiler API: degrade to "n/a" if it changes
        return None
    return [size for _, size in sorted(events)]


def peak_bytes(fn: Callable[[], None]) -> int | None:
    """Peak CPU bytes allocated during one call of ``fn`` (running sum of the profiler's allocation events)."""
    allocations = _allocations(fn)
    if allocations is None:
        return None
    current = peak = 0
    for size in allocations:
        current += size
        peak = max(peak, current)
    return peak


def held_bytes(loss_fn: Callable[[], Tensor]) -> int | None:
    """CPU bytes a loss's forward leaves allocated (its graph's saved state and the loss), which stay held while the
    rest of a model runs its backward."""
    allocations = _allocations(loss_fn)
    return None if allocations is None else sum(allocations)


# ---------------------------------------------------------------------------------------------- report


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter samples, no N=4096/K=65536")
    parser.add_argument("--rounds", type=int, default=9, help="timed round-robin rounds per row (quick: 3)")
    parser.add_argument("--target-ms", type=float, default=150.0, help="duration of one timed sample (quick: 50)")
    parser.add_argument("--dim", type=int, default=DIM, help="embedding size D")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 4096], help="nt_xent batch sizes N")
    parser.add_argument("--queues", type=int, nargs="*", default=[4096, 65536], help="info_nce queue lengths K")
    parser.add_argument("--queries", type=int, default=QUERIES, help="info_nce queries N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-lightly", action="store_true", help="skip lightly even if it is installed")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc defaults (trainers call trainers.runtime.keep_freed_memory)")
    args = parser.parse_args(argv)
    malloc = "glibc defaults" if args.system_malloc or not keep_freed_memory() else "keep_freed_memory()"
    if args.quick:
        args.rounds, args.target_ms = 3, 50.0
        args.sizes = [s for s in args.sizes if s <= 1024] or args.sizes[:1]
        args.queues = [k for k in args.queues if k <= 4096] or args.queues[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    use_lightly = LIGHTLY is None and not args.no_lightly
    lightly_note = "skipped (--no-lightly)" if args.no_lightly else (LIGHTLY or "")

    cases = [nt_xent_case(n, args.dim, NT_XENT_TEMPERATURE, use_lightly=use_lightly) for n in args.sizes]
    cases += [info_nce_case(args.queries, k, args.dim, INFO_NCE_TEMPERATURE, use_lightly=use_lightly)
              for k in args.queues]

    kernel = "fused C++ kernel" if fused_ce.load() is not None else "fused kernel NOT available: eager path"
    round_trip_ns(100)  # builds the round-trip helper (once) before anything is timed
    print(f"# bench_loss: forward+backward per call ({machine_note()}; malloc: {malloc}; ours: {kernel})\n")
    if not use_lightly:
        print(f"{lightly_note}\n" if LIGHTLY else f"lightly: {lightly_note}\n")
    check_rows, time_rows, memory_rows, held_rows = [], [], [], []
    for case in cases:
        check = check_values(case)
        for name in check.loss_diff:
            check_rows.append([case.label, f"ours vs {name}", f"{check.loss_diff[name]:.2e}",
                               f"{check.grad_diff[name]:.2e}", f"{check.grad_diff[name] / check.grad_scale:.1e}",
                               "ok" if check.ok[name] else "MISMATCH"])

        calls = calls_for(case.contenders["ours"], args.target_ms / 1e3)
        trips: list[float] = []  # the cores' cache-line round trip before each round

        def sample_round_trip(trips: list[float] = trips) -> None:
            value = round_trip_ns()
            if value is not None:
                trips.append(value)

        samples = interleaved(case.contenders, rounds=args.rounds, calls=calls, before_round=sample_round_trip)
        ms = {name: median(values) * 1e3 for name, values in samples.items()}
        # nt_xent: the backward's other bare forms; the floor is the fastest form
        other_forms = [ms.pop(name) for name in ("floor-wide", "floor-2") if name in ms]
        floor_ms = min([ms["floor"], *other_forms])
        lightly_ms, kernel_ms = ms.get("lightly"), ms.get("kernel")
        time_rows.append([
            case.label, f"{ms['ours']:.3f}", f"{ms['eager']:.3f}", f"{ms['reference']:.3f}",
            f"{lightly_ms:.3f}" if lightly_ms is not None else NOT_INSTALLED,
            " / ".join(f"{value:.3f}" for value in [ms["floor"], *other_forms]),
            f"{ms['floor+exp']:.3f}", _ratio(ms["ours"], ms["reference"]), _ratio(ms["ours"], lightly_ms),
            _ratio(ms["ours"], floor_ms), _ratio(ms["eager"], floor_ms), _ratio(ms["floor+exp"], floor_ms),
            _ratio(kernel_ms, floor_ms), _ratio(ms["autograd call"], floor_ms),
            spread(samples["ours"]), f"{args.rounds}x{calls}",
            f"{median(trips):.0f} ({min(trips):.0f}-{max(trips):.0f})" if trips else "n/a",
        ])
        logits_bytes = math.prod(case.logits_shape) * 4
        peaks = {name: peak_bytes(fn) for name, fn in case.contenders.items() if name in case.forwards}
        memory_rows.append([
            case.label, "x".join(map(str, case.logits_shape)), f"{logits_bytes / 2**20:.1f}",
            _mib(peaks["ours"]), _mib(peaks["eager"]), _mib(peaks["reference"]),
            _mib(peaks["lightly"]) if "lightly" in peaks else NOT_INSTALLED,
            _ratio(peaks["ours"], logits_bytes) if peaks["ours"] is not None else "n/a",
        ])
        held = {name: held_bytes(fn) for name, fn in case.forwards.items()}
        held_rows.append([
            case.label, _mib(held["ours"]), _mib(held["eager"]), _mib(held["reference"]),
            _mib(held["lightly"]) if "lightly" in held else NOT_INSTALLED,
            _ratio(held["ours"], logits_bytes) if held["ours"] is not None else "n/a",
        ])
        print(f"done: {case.label}", file=sys.stderr, flush=True)

    print("## Values (fp32, same inputs)\n")
    print(markdown_table(["case", "pair", "max abs diff loss", "max abs diff grad", "grad diff / max abs grad",
                          f"loss rtol {RTOL:g}"],
                         check_rows))
    print("\n## Time: median ms per forward+backward call (interleaved)\n")
    print("floor (matmuls): for nt_xent, backward as one product (G + G^T) A / as one product with [A | W A] / as"
          " two products (G A, G^T A); ratios use the fastest. kernel: ours' kernel call without autograd (loss and"
          " gradients, no graph, no backward; — where the kernel is not built); autograd call: a trivial"
          " forward+backward, (x * 1.0).sum().backward(). round trip: the cores' cache-line round trip before each"
          " round (benchmarks/round_trip.py), median (range).\n")
    print(markdown_table(["case", "ours", "ours eager", "reference", "lightly", "floor (matmuls)",
                          "floor + exp/sum pass", "ours/ref", "ours/lightly", "ours/floor", "eager/floor",
                          "(floor + exp/sum)/floor", "kernel/floor", "autograd call/floor", "ours spread",
                          "rounds x calls", "round trip ns"], time_rows))
    print("\n## Peak memory of one forward+backward (torch.profiler, CPU allocations, MiB)\n")
    print(markdown_table(["case", "logits", "one logits matrix", "ours", "ours eager", "reference", "lightly",
                          "ours in logits matrices"], memory_rows))
    print("\n## Held from the forward to the backward (CPU allocations the forward leaves, MiB)\n")
    print("What the loss keeps for its backward while the rest of a model runs its own.\n")
    print(markdown_table(["case", "ours", "ours eager", "reference", "lightly", "ours in logits matrices"],
                         held_rows))
    print(f"\nFinished with {machine_note().split('; ')[-1]}.")


if __name__ == "__main__":
    main()
