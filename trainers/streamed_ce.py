"""The contrastive cross-entropy of both losses, computed tile by tile with a hand-written backward.

For unit vectors ``a_r = q_r / |q_r|`` (queries) and ``b_c = y_c / |y_c|`` (candidates) and an inverse temperature
``beta``, the logits are ``S_rc = beta * a_r . b_c`` and

    loss = mean_r [ log( sum_{c not excluded for r} exp(S_rc) [+ exp(S_r+)] ) - S_r+ ]

where the positive logit ``S_r+`` is either one of the candidates (SimCLR: ``positives``, runs of rows paired with
the candidates at a fixed shift) or an extra key per row (MoCo: ``positive_keys``). This is what
``F.cross_entropy`` on the full logits computes; doing it by hand makes it cost little more than the matrix products
it needs (benchmarks/bench_loss.py measures both):

* Forward: the logits are produced in tiles small enough to stay in a core's cache, and each tile is turned into
  ``exp(S - m)`` in place right after its matrix product (``m = 0`` unless the temperature is tiny, see
  ``_exp_logits``). The logits are written
  to memory once, already exponentiated; no separate softmax, mask or log-probability matrix is made.
* The stored tiles are the softmax up to one scale per (row, column block), so the backward is two matrix
  products with them (``dA = P @ B``, ``dB = P^T @ A``), rows scaled on the small (n, D) side. On one process's
  SimCLR the exponentiated logits are symmetric and both are one product, ``E @ [A | w A]`` (the fused kernel,
  :mod:`trainers.fused_ce`, scales E in place instead and makes ``(W E + E W) @ A``, half the flops). The "minus one at
  the positive" of the cross-entropy gradient is a slice-wise update on that side too (positives and exclusions
  are runs of rows at a fixed column shift, so no index tensor is gathered or scattered), and so is the L2
  normalisation.
* Without a gradient nothing is stored: one scratch tile is reused.

Peak memory is one float32 logits matrix (the stored tiles) plus (n, D)-sized vectors, against about three for
``cross_entropy`` on materialised logits. Every sum is in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # Linux: one index* folder per cache level and kind
_MIB = 1 << 20


def last_level_cache_bytes(caches: Path = CPU_CACHES) -> int | None:
    """Size of the CPU's largest cache, read from Linux's sysfs; ``None`` where it cannot be read."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
        if number.isdigit():
            sizes.append(int(number) * unit)
    return max(sizes, default=None)


def tile_bytes_per_thread(cache_bytes: int | None, threads: int) -> int:
    """Logits per thread made and exponentiated in one go: half the last-level cache shared among the threads,
    within [2, 16] MiB (2 MiB where the cache size is unknown).

    The tile must stay in cache between its matrix product and its exp pass, or that pass streams through main
    memory; within that, more rows per product run faster. Measured at 2 threads with 480 MiB of L3
    (benchmarks/bench_tiles.py, 2-128 MiB per thread): 16 MiB per thread (whole 2048-row blocks at N = 1024) ran
    nt_xent 3-7 % faster than 2 MiB at N = 1024 and 4096 (two runs); 32 and 128 MiB were no faster, and info_nce
    and nt_xent at N = 256 did not change beyond the noise.
    """
    if cache_bytes is None:
        return 2 * _MIB
    return min(16 * _MIB, max(2 * _MIB, cache_bytes // (2 * max(1, threads))))


TILE_BYTES_PER_THREAD = tile_bytes_per_thread(last_level_cache_bytes(), torch.get_num_threads())


def cpu_tile_rows(columns: int, element_size: int, *, one_thread: bool = False) -> int:
    """Rows of logits made and exponentiated in one go on the CPU: the threads' tile budget
    (``TILE_BYTES_PER_THREAD``, read at call time, times the threads) over the bytes of one row, at least 1. With
    ``one_thread``, one thread's budget: the fused kernel's threads each make their own tiles."""
    budget = TILE_BYTES_PER_THREAD * (1 if one_thread else torch.get_num_threads())
    return max(1, budget // (columns * element_size))


# Columns per stored block (and per tile of the fused MoCo kernel, trainers/fused_ce.py): wide enough that the
# matrix products run at full speed, and a block of all rows leaves a tile many rows even against a long queue.
BLOCK_COLUMNS = 4096


def cpu_block_tiles(columns: int, element_size: int, *, one_thread: bool = False) -> tuple[int, int]:
    """``(tile_rows, width)``: logits made on the CPU in column blocks of ``width`` (``BLOCK_COLUMNS`` at most),
    each in tiles of as many rows as the budget of :func:`cpu_tile_rows` holds. The eager path and the fused MoCo
    kernel (``one_thread``) share it."""
    width = min(columns, BLOCK_COLUMNS)
    return cpu_tile_rows(width, element_size, one_thread=one_thread), width


NORM_EPS = 1e-12  # as F.normalize

_LOWEST = {dtype: torch.finfo(dtype).min for dtype in (torch.float32, torch.float64)}
# Largest beta for which exp(-beta) and exp(beta) x (a billion columns) are normal floats: exp of the unshifted
# logits then loses no precision and cannot overflow.
_SAFE_UNSHIFTED = {torch.float32: 40.0, torch.float64: 300.0}
# Runs of rows paired with one column each: (row_start, row_stop, column - row). Used for the excluded logits (an
# anchor is not its own negative) and for SimCLR's positives; slices of a run cost no index tensor.
Runs = tuple[tuple[int, int, int], ...]


def _unit(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x / max(|x|, eps), 1 / max(|x|, eps))`` row-wise, like ``F.normalize`` (into ``out`` if given)."""
    inv_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(NORM_EPS).reciprocal_()
    return torch.mul(x, inv_norm, out=out) if out is not None else x * inv_norm, inv_norm


def _unit_rows(columns: Tensor, columns_inv: Tensor | None, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``columns`` as unit vectors (``columns_inv=None``: they are unit vectors already)."""
    rows = columns[start:stop]
    return rows if columns_inv is None else rows * columns_inv[start:stop]


def check_runs(runs: Runs, num_rows: int, num_columns: int, name: str, *, cover: bool) -> None:
    """Raise ``ValueError`` unless every run pairs rows inside ``[0, num_rows)`` with columns inside
    ``[0, num_columns)``; with ``cover``, every row must lie in exactly one run."""
    for run in runs:
        start, stop, shift = run
        if not (0 <= start < stop <= num_rows and 0 <= start + shift and stop + shift <= num_columns):
            raise ValueError(f"{name}: run {run} (rows start:stop paired with columns row + shift) must lie inside "
                             f"{num_rows} rows and {num_columns} columns")
    if cover:
        covered = sorted((start, stop) for start, stop, _ in runs)
        bounds = [0] + [b for pair in covered for b in pair] + [num_rows]
        if any(bounds[i] != bounds[i + 1] for i in range(0, len(bounds), 2)):
            raise ValueError(f"{name}: the runs must give each of the {num_rows} rows exactly one column, got {runs}")


def _unit_backward(unit: Tensor, inv_norm: Tensor, grad: Tensor) -> Tensor:
    """Gradient through ``x / max(|x|, eps)``: ``(g - u (u . g)) / |x|`` (no projection where the clamp was active)."""
    along = (unit * grad).sum(dim=1, keepdim=True).masked_fill_(inv_norm >= 1 / NORM_EPS, 0.0)
    return torch.addcmul(grad, unit, along, value=-1.0).mul_(inv_norm)


def _mask_runs(tile: Tensor, rows: tuple[int, int], columns: tuple[int, int], excluded: Runs) -> None:
    """Set the excluded logits inside a tile to the lowest finite value (exp gives 0, and a row made only of
    excluded logits still has a finite maximum, so nothing becomes NaN)."""
    (r0, r1), (c0, c1) = rows, columns
    for start, stop, shift in excluded:
        low, high = max(r0, start, c0 - shift), min(r1, stop, c1 - shift)
        if low < high:
            torch.diagonal(tile[low - r0 : high - r0, low + shift - c0 :]).fill_(_LOWEST[tile.dtype])


def _exp_logits(
    rows: Tensor, columns: Tensor, columns_inv_norm: Tensor | None, excluded: Runs, keep: bool, beta: float
) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """Tile-wise ``E = exp(rows @ unit(columns).T - m)``, ``m`` per row and column block (0 or the block's maximum).

    ``columns`` are normalised one block at a time, while the block is in cache, and their inverse norms written
    to ``columns_inv_norm`` (``None``: the columns are unit vectors already). Returns the column blocks of ``E``
    (``(R, width)`` each; none when ``keep`` is false), the per-block row maxima (``None`` when unshifted) and the
    per-block row sums, ``(blocks, R)``.

    Unit vectors bound every logit to ``[-beta, beta]``. While ``exp(-beta)`` and ``exp(beta)`` times the number
    of columns are normal floats (beta <= 40 in float32, tau >= 0.025), ``m = 0`` is as good as the true maximum
    (every term keeps full relative precision, none overflows, the sums cannot overflow) and the tile needs no
    pass but ``exp``; beyond that the true tile maxima are subtracted first.
    """
    num_rows, num_columns = rows.shape[0], columns.shape[0]
    tile_rows, width = cpu_block_tiles(num_columns, rows.element_size())
    starts = range(0, num_columns, width)
    if rows.device.type != "cpu":
        tile_rows = num_rows  # accelerators: fewer, larger kernels beat cache-sized tiles
    unshifted = beta <= _SAFE_UNSHIFTED[rows.dtype]
    maxima = None if unshifted else rows.new_empty(len(starts), num_rows)
    sums = rows.new_empty(len(starts), num_rows)
    blocks: list[Tensor] = []
    scratch = None if keep else rows.new_empty(min(tile_rows, num_rows) * width)
    for j, c0 in enumerate(starts):
        c1 = min(c0 + width, num_columns)
        block_columns = columns[c0:c1]
        if columns_inv_norm is not None:
            block_columns, columns_inv_norm[c0:c1] = _unit(block_columns)
        block = rows.new_empty(num_rows, c1 - c0) if keep else None
        for r0 in range(0, num_rows, tile_rows):
            r1 = min(r0 + tile_rows, num_rows)
            tile = block[r0:r1] if block is not None else scratch[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(rows[r0:r1], block_columns.T, out=tile)
            _mask_runs(tile, (r0, r1), (c0, c1), excluded)
            if maxima is None:
                tile.exp_()
            else:
                row_max = torch.amax(tile, dim=1, out=maxima[j, r0:r1])
                tile.sub_(row_max[:, None]).exp_()
            torch.sum(tile, dim=1, out=sums[j, r0:r1])
        if block is not None:
            blocks.append(block)
    return blocks, maxima, sums


def _sum_of_products(blocks: list[Tensor], right: Tensor) -> Tensor:
    """``sum_j blocks[j] @ right[columns of block j]``: the stored column blocks of E times ``right`` (C, W)."""
    out, start = None, 0
    for block in blocks:
        stop = start + block.shape[1]
        out = torch.mm(block, right[start:stop]) if out is None else out.addmm_(block, right[start:stop])
        start = stop
    return out


def _rows_and_columns_gradients(
    blocks: list[Tensor],
    weights: Tensor | None,
    scaled: Tensor,
    row_weight: Tensor | None,
    unit_columns: Tensor | None,
    columns: Tensor,
    columns_inv: Tensor | None,
    need_columns: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(P @ B, P^T @ rows)`` from the stored blocks, ``P`` the softmax with its row weights (one per row when
    ``weights`` is None, one per (block, row) otherwise); the second is ``None`` unless ``need_columns``."""
    grad_rows = torch.zeros_like(scaled)
    grad_columns = torch.empty_like(columns) if need_columns else None
    weighted_rows = scaled * row_weight if need_columns and weights is None else None
    start = 0
    for j, block in enumerate(blocks):
        stop = start + block.shape[1]
        block_columns = unit_columns[start:stop] if unit_columns is not None else (
            columns[start:stop] * columns_inv[start:stop])
        if weights is None:
            grad_rows.addmm_(block, block_columns)
        else:
            grad_rows.addcmul_(block @ block_columns, weights[j])
        if grad_columns is not None:
            torch.mm(block.T, weighted_rows if weights is None else scaled * weights[j], out=grad_columns[start:stop])
        start = stop
    if weights is None:
        grad_rows.mul_(row_weight)
    return grad_rows, grad_columns


def _symmetric_gradient(
    blocks: list[Tensor], both: Tensor, row_weight: Tensor, positives: Runs, scale: float, beta: float
) -> Tensor:
    """Gradient of the loss with respect to the unit rows ``a`` when the candidates are the rows themselves and
    the stored ``E`` is symmetric (one process's SimCLR: the same vectors on both sides, only diagonal logits
    excluded, no shift). With ``P = w * E`` (``w = row_weight``) and ``p(r)`` row r's positive column, the row
    side is ``beta * (P @ a - scale * a[p(r)])`` and the column side is ``beta * (P^T @ a)`` minus
    ``scale * beta * a[r]`` at column ``p(r)``.

    ``E = E^T`` turns the column side's ``E^T (w * a)`` into ``E (w * a)``, so both sides are one product of the
    stored blocks with ``both = [a | w * a]`` (R, 2D) instead of two (and the transposed one is the slower). The
    forward wrote ``a`` into the left half of ``both``; the right half is filled here.
    """
    width = both.shape[1] // 2
    a = both[:, :width]
    row_factor = row_weight * beta
    torch.mul(a, row_factor, out=both[:, width:])
    products = _sum_of_products(blocks, both)
    grad = torch.addcmul(products[:, width:], products[:, :width], row_factor)
    for start, stop, shift in positives:  # minus one at the positive, for the row and for the column
        grad[start:stop].sub_(a[start + shift : stop + shift], alpha=scale * beta)
        grad[start + shift : stop + shift].sub_(a[start:stop], alpha=scale * beta)
    return grad


class _ContrastiveCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        queries: Tensor,
        candidates: Tensor | None,
        positive_keys: Tensor | None,
        positives: Runs,
        beta: float,
        excluded: Runs,
        unit_candidates: bool,
    ) -> Tensor:
        dtype = torch.promote_types(queries.dtype, torch.float32)
        keep = any(ctx.needs_input_grad)
        # One process's SimCLR with unshifted logits: E is symmetric and the backward makes one product with
        # [a | w a] (R, 2D), so a is written straight into that buffer's left half.
        symmetric = (keep and candidates is None and positive_keys is None and beta <= _SAFE_UNSHIFTED[dtype]
                     and all(shift == 0 for _, _, shift in excluded))
        x = queries.to(dtype)
        both = x.new_empty(x.shape[0], 2 * x.shape[1]) if symmetric else None
        a, a_inv = _unit(x, out=None if both is None else both[:, : x.shape[1]])
        scaled = a * beta  # scaling the (R, D) side, not the (R, C) logits
        if candidates is None:
            columns, columns_inv = a, None
        else:  # the candidates may be a long queue: normalised block by block inside _exp_logits
            columns = candidates.to(dtype)
            columns_inv = None if unit_candidates else columns.new_empty(columns.shape[0], 1)
        blocks, maxima, sums = _exp_logits(scaled, columns, columns_inv, excluded, keep, beta)
        k = k_inv = None
        if positive_keys is not None:
            k, k_inv = _unit(positive_keys.to(dtype))
            positive = (scaled * k).sum(dim=1)
        else:
            positive = scaled.new_empty(scaled.shape[0])
            for start, stop, shift in positives:
                column_rows = _unit_rows(columns, columns_inv, start + shift, stop + shift)
                torch.sum(scaled[start:stop] * column_rows, dim=1, out=positive[start:stop])
        if maxima is None:  # unshifted: the partition sum itself is a normal float (see _exp_logits)
            partition = sums[0] if sums.shape[0] == 1 else sums.sum(dim=0)
            if positive_keys is not None:
                partition = partition + positive.exp()
            log_partition = partition.log()
        else:
            log_terms = maxima + sums.log()  # (blocks, R): log of each block's share of the partition sum
            if positive_keys is not None:
                log_terms = torch.cat([log_terms, positive[None]])
            log_partition = torch.logsumexp(log_terms, dim=0)
        loss = (log_partition - positive).mean()
        if keep:
            if symmetric:  # the backward fills both's right half, which autograd's version check on a saved
                # tensor (or a view of one: a, scaled's source, columns) would refuse; both is kept on ctx
                ctx.both, a, scaled, columns = both, None, None, None
            ctx.save_for_backward(a, a_inv, scaled, columns, columns_inv, k, k_inv, positive, maxima, log_partition,
                                  *blocks)
            ctx.beta = beta
            ctx.shared = candidates is None
            ctx.symmetric = symmetric
            ctx.positives = positives
            ctx.dtypes = (queries.dtype, None if candidates is None else candidates.dtype,
                          None if positive_keys is None else positive_keys.dtype)
        return loss

    @staticmethod
    @once_differentiable  # the backward is written by hand: no graph of it for a second derivative
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        a, a_inv, scaled, columns, columns_inv, k, k_inv, positive, maxima, log_partition, *blocks = ctx.saved_tensors
        need_queries, need_candidates, need_keys = ctx.needs_input_grad[:3]
        shared = ctx.shared  # SimCLR on one process: the candidates are the queries
        scale = float(grad_loss) / a_inv.shape[0]
        # P = E * exp(m - log Z) per (row, block): the softmax, with the loss gradient's 1/R folded in. Unshifted
        # (m = 0) every block of a row has the same weight: it is applied once, after the sum over blocks.
        if maxima is None:
            row_weight, weights = (-log_partition).exp_().mul_(scale)[:, None], None  # (R, 1)
        else:
            row_weight, weights = None, (maxima - log_partition).exp_().mul_(scale)[:, :, None]  # (blocks, R, 1)
        if ctx.symmetric:  # one process's SimCLR, unshifted: only the queries have a gradient
            grad_a = _symmetric_gradient(blocks, ctx.both, row_weight, ctx.positives, scale, ctx.beta)
            a = ctx.both[:, : grad_a.shape[1]]
            return _unit_backward(a, a_inv, grad_a).to(ctx.dtypes[0]), None, None, None, None, None, None
        need_b = need_candidates or shared
        unit_columns = columns if columns_inv is None else (columns * columns_inv if need_b else None)
        grad_scaled, grad_b = _rows_and_columns_gradients(blocks, weights, scaled, row_weight, unit_columns, columns,
                                                          columns_inv, need_b)
        grad_k = None
        if k is not None:  # MoCo's extra positive column: its softmax weight minus one
            coefficient = (positive - log_partition).exp_().sub_(1).mul_(scale)[:, None]
            grad_scaled.addcmul_(k, coefficient)
            if need_keys:
                grad_k = _unit_backward(k, k_inv, scaled * coefficient).to(ctx.dtypes[2])
        else:  # minus one at the positive candidate, for the row and for the column
            for start, stop, shift in ctx.positives:
                column_rows = _unit_rows(columns, columns_inv, start + shift, stop + shift)
                grad_scaled[start:stop].sub_(column_rows, alpha=scale)
                if grad_b is not None:
                    grad_b[start + shift : stop + shift].sub_(scaled[start:stop], alpha=scale)
        grad_a = grad_scaled.mul_(ctx.beta)
        if shared:
            grad_a += grad_b
        grad_queries = _unit_backward(a, a_inv, grad_a).to(ctx.dtypes[0]) if need_queries else None
        grad_candidates = None
        if need_candidates and not shared:
            grad_candidates = grad_b if columns_inv is None else _unit_backward(unit_columns, columns_inv, grad_b)
            grad_candidates = grad_candidates.to(ctx.dtypes[1])
        return grad_queries, grad_candidates, grad_k, None, None, None, None


def contrastive_cross_entropy(
    queries: Tensor,
    candidates: Tensor | None,
    *,
    beta: float,
    positive_keys: Tensor | None = None,
    positives: Runs | None = None,
    excluded: Runs = (),
    unit_candidates: bool = False,
) -> Tensor:
    """Mean InfoNCE of ``queries`` (R, D) against ``candidates`` (C, D) at inverse temperature ``beta``.

    Every vector is L2-normalised first. ``candidates=None`` means the queries themselves (SimCLR on one process).
    Each row's positive is either ``positive_keys[r]`` (R, D), an extra logit (MoCo), or a candidate (SimCLR):
    ``positives`` is runs ``(start, stop, shift)``, rows ``start:stop`` paired with candidates ``row + shift``,
    covering every row once; give exactly one of the two. ``excluded`` lists runs of rows whose logit at column
    ``row + shift`` leaves the sum (an anchor is not its own negative). ``unit_candidates=True`` promises that the
    candidates are unit vectors already (MoCo's queue) and skips normalising them. Returns a float32 (float64) scalar.

    Example (two views of two images, rows 0, 1 paired with 2, 3 and back):
        >>> q = torch.randn(4, 8)
        >>> loss = contrastive_cross_entropy(q, None, beta=5.0, positives=((0, 2, 2), (2, 4, -2)),
        ...                                  excluded=((0, 4, 0),))
    """
    if (positive_keys is None) == (positives is None):
        raise ValueError("give exactly one of positive_keys and positives")
    num_rows = queries.shape[0]
    num_columns = num_rows if candidates is None else candidates.shape[0]
    check_runs(excluded, num_rows, num_columns, "excluded", cover=False)
    if positives is not None:
        check_runs(positives, num_rows, num_columns, "positives", cover=True)
    return _ContrastiveCrossEntropy.apply(queries, candidates, positive_keys, positives or (), beta, excluded,
                                           unit_candidates)
