"""Contrastive losses as pure functions of embeddings, plus the gathers that make them global.

Both losses are InfoNCE with cosine similarity scaled by an inverse temperature ``beta = 1 / tau``:

    l(x, y) = -beta * sim(h_x, h_y) + log sum_n exp(beta * sim(h_x, h_n))

where the sum runs over the positive and every negative. ``temperature`` (tau) and the inverse temperature
(beta) are the same knob: a small tau (large beta) sharpens the softmax so the hardest negatives dominate.
Everything is computed in float32 after L2 normalisation, as a log-sum-exp with per-row maxima, so tau = 0.01
on bf16/fp16 embeddings neither overflows nor loses the positive logit to rounding. The arithmetic lives in
:mod:`trainers.streamed_ce` (tiled, with a hand-written backward; about the cost of the matrix products); one
process's SimCLR and MoCo against its unit queue take the same computation compiled in C++ where it could be
built (:mod:`trainers.fused_ce`), which saves most of the eager path's per-op cost at small sizes.

The losses never look at ``torch.distributed``: the caller gathers candidates with :func:`gather_with_grad`
(SimCLR) or :func:`gather_no_grad` (MoCo keys) and passes them in, with the offset of its own rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor

from trainers import fused_ce
from trainers.streamed_ce import contrastive_cross_entropy


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite positive number."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float,
    candidates: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> Tensor:
    """SimCLR's normalized-temperature cross-entropy, symmetric over both views.

    For ``n`` local images there are ``2n`` anchors (both views). Anchor ``z1[i]`` has positive ``z2[i]``;
    its negatives are all other ``2N - 2`` candidate embeddings (itself excluded), and likewise for ``z2[i]``:

        loss = mean_a [ -log exp(s(a, a+) / tau) / sum_{c != a} exp(s(a, c) / tau) ],  s = cosine similarity

    Args:
        z1, z2: ``(n, D)`` embeddings of the two views of the local images (any float dtype).
        temperature: tau > 0 (beta = 1 / tau).
        candidates: ``(N, D)`` embeddings of view 1 and view 2 of the *global* batch, gathered with gradient;
            ``None`` means the local batch (``N = n``).
        offset: row of ``z1[0]`` inside ``candidates`` (``rank * n`` for an all-gather).

    Returns:
        Scalar float32 loss, the mean over the ``2n`` local anchors.

    Example:
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
    """
    check_temperature(temperature)
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both have shape (n, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    c1, c2 = candidates if candidates is not None else (z1, z2)
    big_n = c1.shape[0]
    if not 0 <= offset <= big_n - n:
        raise ValueError(f"offset must lie in [0, {big_n - n}] for {n} local rows of {big_n}, got {offset}")

    if candidates is None:  # one process: the fused kernel where it is built and applies (same values)
        fused = fused_ce.simclr_loss(z1, z2, 1.0 / temperature)
        if fused is not None:
            return fused
    # Rows are [z1; z2] (2n), columns [c1; c2] (2N); z1[i] sits at column offset + i and z2[i] at N + offset + i.
    # Each anchor's positive is its other view; it is not its own negative. Both are runs of rows at one shift.
    positives = ((0, n, offset + big_n), (n, 2 * n, offset - n))
    excluded = ((0, n, offset), (n, 2 * n, offset + big_n - n))
    return contrastive_cross_entropy(
        torch.cat([z1, z2]),
        None if candidates is None else torch.cat([c1, c2]),
        beta=1.0 / temperature,
        positives=positives,
        excluded=excluded,
    )


def info_nce(
    query: Tensor, positive_key: Tensor, negatives: Tensor, *, temperature: float, unit_negatives: bool = False
) -> Tensor:
    """MoCo's InfoNCE: each query against its positive key and a shared set of negatives (the queue).

        logits_i = [q_i . k_i+, q_i . n_1, ..., q_i . n_K] / tau,   loss = mean_i CE(logits_i, 0)

    with all vectors L2-normalised (cosine similarity) and the positive at index 0.

    Args:
        query: ``(n, D)`` query embeddings (online encoder; carries the gradient).
        positive_key: ``(n, D)`` keys of the other view (momentum encoder; normally no gradient).
        negatives: ``(K, D)`` negatives shared by all queries (the queue; normally no gradient).
        temperature: tau > 0 (beta = 1 / tau).
        unit_negatives: the negatives are L2-normalised already (MoCo's queue stores unit keys, as in MoCo's
            code); skips re-normalising all K of them on every call. Leave False for arbitrary negatives.

    Returns:
        Scalar float32 loss.

    Example:
        >>> q, k, queue = torch.randn(8, 128), torch.randn(8, 128), torch.randn(4096, 128)
        >>> loss = info_nce(q, k, queue, temperature=0.2)
    """
    check_temperature(temperature)
    if query.shape != positive_key.shape or query.ndim != 2:
        raise ValueError(
            f"query and positive_key must both have shape (n, D), got {tuple(query.shape)} and "
            f"{tuple(positive_key.shape)}"
        )
    if negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must have shape (K, {query.shape[1]}), got {tuple(negatives.shape)}")
    if unit_negatives:  # the fused kernel where it is built and applies (same values)
        fused = fused_ce.keyed_loss(query, positive_key, negatives, 1.0 / temperature)
        if fused is not None:
            return fused
    return contrastive_cross_entropy(
        query, negatives, beta=1.0 / temperature, positive_keys=positive_key, unit_candidates=unit_negatives
    )


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (n, ...) from every rank into (world * n, ...), rank-major, keeping the gradient.

    The backward pass sums the gradients that all ranks computed for a rank's rows and hands the sum to
    that rank (``torch.distributed.nn.functional.all_gather``), so with DDP's gradient averaging the step
    equals a single process on the global batch. A plain ``all_gather`` (or ``all_reduce``) has no backward:
    negatives from other ranks would then carry no gradient and N-GPU runs silently differ from 1-GPU runs.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather without gradient (MoCo keys before they enter the queue)."""
    _, world_size = world()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
