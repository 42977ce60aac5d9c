"""The tiled contrastive cross-entropy against the textbook formula on materialised logits, written here.

The reference is plain autograd: ``F.normalize``, one full logits matrix, excluded entries set to -inf, and
``logsumexp - positive``. Tiles and column blocks are made tiny so that every edge case of the tiling (an excluded
diagonal crossing tile and block borders, a last block one column wide, a row whose whole block is excluded) runs.
The losses are called on the eager path (the fused kernel of tests/test_fused_ce.py is switched off here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers import fused_ce, streamed_ce
from trainers.losses import info_nce, nt_xent
from trainers.streamed_ce import contrastive_cross_entropy


@pytest.fixture(autouse=True)
def eager_path() -> Iterator[None]:
    with fused_ce.eager_only():
        yield


def reference(
    queries: torch.Tensor,
    candidates: torch.Tensor | None,
    beta: float,
    *,
    positive_keys: torch.Tensor | None = None,
    positives: tuple[tuple[int, int, int], ...] = (),
    excluded: tuple[tuple[int, int, int], ...] = (),
    normalize_candidates: bool = True,
) -> torch.Tensor:
    a = F.normalize(queries.double(), dim=1)
    if candidates is None:
        b = a
    else:
        b = F.normalize(candidates.double(), dim=1) if normalize_candidates else candidates.double()
    logits = beta * a @ b.T
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for start, stop, shift in excluded:
        rows = torch.arange(start, stop)
        mask[rows, rows + shift] = True
    logits = logits.masked_fill(mask, float("-inf"))
    if positive_keys is not None:
        positive = beta * (a * F.normalize(positive_keys.double(), dim=1)).sum(1)
        logits = torch.cat([positive[:, None], logits], dim=1)
    else:
        positive_index = torch.full((a.shape[0],), -1)
        for start, stop, shift in positives:
            positive_index[start:stop] = torch.arange(start, stop) + shift
        assert (positive_index >= 0).all()
        positive = logits.gather(1, positive_index[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


@pytest.fixture
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 rows of a 5-column block per tile
    monkeypatch.setattr(streamed_ce, "TILE_BYTES_PER_THREAD", 3 * 5 * 4 // torch.get_num_threads())
    monkeypatch.setattr(streamed_ce, "BLOCK_COLUMNS", 5)


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("n, offset, big_n", [(8, 0, 8), (4, 4, 8), (3, 2, 8)])
def test_simclr_layout_with_candidates_matches_reference(tiny_tiles: None, n: int, offset: int, big_n: int) -> None:
    """Local anchors against gathered candidates (the data-parallel layout), gradients to both."""
    gen = torch.Generator().manual_seed(n + offset)
    anchors = torch.randn(2 * n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(2 * big_n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    positives = ((0, n, offset + big_n), (n, 2 * n, offset - n))
    excluded = ((0, n, offset), (n, 2 * n, offset + big_n - n))  # 2 * big_n = 16 columns: blocks 5, 5, 5, 1
    ours = contrastive_cross_entropy(anchors, candidates, beta=3.0, positives=positives, excluded=excluded)
    ref = reference(anchors, candidates, 3.0, positives=positives, excluded=excluded)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(_grads(ours, [anchors, candidates]), _grads(ref, [anchors, candidates])):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_shared_candidates_is_nt_xent_and_gradchecks(tiny_tiles: None) -> None:
    torch.manual_seed(0)
    z1 = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    n = 7
    ref = reference(torch.cat([z1, z2]), None, 1 / 0.3,
                    positives=((0, n, n), (n, 2 * n, -n)), excluded=((0, 2 * n, 0),))
    ours = nt_xent(z1, z2, temperature=0.3)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(_grads(ours, [z1, z2]), _grads(ref, [z1, z2])):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, temperature=0.3), (z1, z2))


@pytest.mark.parametrize("beta", [2.0, 299.0, 301.0])
def test_shared_gradients_on_both_sides_of_the_shift_switch(tiny_tiles: None, beta: float) -> None:
    """One process's SimCLR: unshifted (beta <= 300 in float64) the backward uses E = E^T and one product per block;
    with per-tile maxima the stored blocks are not symmetric and it takes the general two-product path. Both must
    give the reference's gradients, with a positive pairing that is not its own inverse."""
    torch.manual_seed(11)
    x = (0.2 * torch.randn(12, 5, dtype=torch.float64)).requires_grad_()
    positives = ((0, 5, 7), (5, 12, -5))  # r -> r - 5 mod 12: a cycle, not pairs
    excluded = ((0, 12, 0),)
    ours = contrastive_cross_entropy(x, None, beta=beta, positives=positives, excluded=excluded)
    ref = reference(x, None, beta, positives=positives, excluded=excluded)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(_grads(ours, [x])[0], _grads(ref, [x])[0], rtol=1e-9, atol=1e-12)


def test_shared_with_an_off_diagonal_exclusion_is_not_taken_as_symmetric(tiny_tiles: None) -> None:
    """Excluding logit (r, r + 1) makes E asymmetric: the one-product backward would be wrong here."""
    torch.manual_seed(12)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    positives = ((0, 6, 3), (6, 9, -6))
    excluded = ((0, 9, 0), (0, 8, 1))
    ours = contrastive_cross_entropy(x, None, beta=2.5, positives=positives, excluded=excluded)
    ref = reference(x, None, 2.5, positives=positives, excluded=excluded)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(_grads(ours, [x])[0], _grads(ref, [x])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unit", [False, True])
def test_moco_layout_every_input_with_gradient(tiny_tiles: None, unit: bool) -> None:
    """Queries, positive keys and negatives all carrying gradients (MoCo's keys and queue normally do not)."""
    torch.manual_seed(1)
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(11, 4, dtype=torch.float64)
    negatives = (F.normalize(raw, dim=1) if unit else raw).requires_grad_()
    ours = info_nce(q, k, negatives, temperature=0.25, unit_negatives=unit)
    ref = reference(q, negatives, 4.0, positive_keys=k, normalize_candidates=not unit)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(_grads(ours, [q, k, negatives]), _grads(ref, [q, k, negatives])):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b, c: info_nce(a, b, c, temperature=0.25, unit_negatives=unit), (q, k, negatives))


def test_unit_negatives_changes_nothing_for_unit_vectors() -> None:
    torch.manual_seed(2)
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    queue = F.normalize(torch.randn(300, 16), dim=1)
    assert info_nce(q, k, queue, temperature=0.1, unit_negatives=True).item() == pytest.approx(
        info_nce(q, k, queue, temperature=0.1).item(), rel=1e-6)


def test_without_gradient_nothing_is_stored_and_the_value_is_the_same(tiny_tiles: None) -> None:
    torch.manual_seed(3)
    z1, z2 = torch.randn(9, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    with_grad = nt_xent(z1, z2, temperature=0.2)
    with torch.no_grad():
        without = nt_xent(z1, z2, temperature=0.2)
    assert without.item() == with_grad.item()
    assert without.grad_fn is None and with_grad.grad_fn is not None


def test_fully_excluded_block_row_is_not_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-column blocks: the self-similarity is a whole block row for each anchor; it must weigh exactly 0."""
    monkeypatch.setattr(streamed_ce, "BLOCK_COLUMNS", 1)
    torch.manual_seed(4)
    z1 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z1, z2, temperature=0.5)
    ref = reference(torch.cat([z1, z2]), None, 2.0, positives=((0, 3, 3), (3, 6, -3)), excluded=((0, 6, 0),))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(_grads(ours, [z1, z2]), _grads(ref, [z1, z2])):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.005, 0.01, 0.024, 0.026, 100.0])
def test_extreme_temperatures_in_float32_match_float64(tiny_tiles: None, temperature: float) -> None:
    """Per-(row, block) maxima: far-apart logits neither overflow nor vanish; float32 equals float64 to 1e-5."""
    torch.manual_seed(5)
    z1, z2 = torch.randn(10, 8), torch.randn(10, 8)
    z2[:5] = -z1[:5]  # positives opposite their anchors: the positive logit is 2/tau below the largest one
    ours = nt_xent(z1, z2, temperature=temperature)
    ref = nt_xent(z1.double(), z2.double(), temperature=temperature)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [39.0, 40.0, 41.0, 200.0])
@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_every_logit_at_an_extreme_is_exact(beta: float, side: float) -> None:
    """All logits -beta (keys opposite the query) or all +beta (keys equal to it): the loss is log(K + 1) exactly,
    on both sides of the switch from unshifted logits (beta <= 40: the smallest must not underflow, the sum of the
    largest must not overflow) to per-tile maxima."""
    q = torch.tensor([[1.0, 0.0, 0.0]])
    keys = side * q
    negatives = keys.repeat(5000, 1)
    loss = info_nce(q, keys, negatives, temperature=1 / beta)
    assert loss.item() == pytest.approx(math.log(5001), rel=1e-5)


def test_zero_vector_gradient_follows_f_normalize() -> None:
    """A zero embedding hits F.normalize's eps clamp; the hand-written backward takes the same branch."""
    q = torch.randn(4, 3, dtype=torch.float64)
    q[1] = 0.0
    q.requires_grad_()
    k = torch.randn(4, 3, dtype=torch.float64)
    negatives = torch.randn(6, 3, dtype=torch.float64)
    ours = info_nce(q, k, negatives, temperature=0.5)
    ref = reference(q, negatives, 2.0, positive_keys=k)
    torch.testing.assert_close(_grads(ours, [q])[0], _grads(ref, [q])[0], rtol=1e-10, atol=1e-12)


def test_exactly_one_kind_of_positive() -> None:
    q = torch.randn(2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        contrastive_cross_entropy(q, q, beta=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        contrastive_cross_entropy(q, q, beta=1.0, positive_keys=q, positives=((0, 2, 0),))


@pytest.mark.parametrize(
    "positives, excluded, message",
    [
        (((0, 3, 1),), (), "positives: run \\(0, 3, 1\\)"),  # row 2 would pair with column 3 of 3
        (((0, 2, 0),), (), "exactly one column"),  # row 2 has no positive
        (((0, 2, 0), (1, 3, 0)), (), "exactly one column"),  # row 1 has two
        (((0, 3, 0),), ((0, 3, -1),), "excluded: run"),  # row 0 would exclude column -1
        (((0, 3, 0),), ((2, 2, 0),), "excluded: run"),  # an empty run is a mistake, not a no-op
    ],
)
def test_bad_runs_are_refused_before_any_work(positives: tuple, excluded: tuple, message: str) -> None:
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=message):
        contrastive_cross_entropy(q, None, beta=1.0, positives=positives, excluded=excluded)


def test_shared_candidates_with_positive_keys_take_the_general_path(tiny_tiles: None) -> None:
    """Queries as their own negatives with an extra positive key each: E is symmetric but the positive is not a
    candidate, so the one-product backward (which knows only candidate positives) must not be used."""
    torch.manual_seed(13)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    ours = contrastive_cross_entropy(x, None, beta=2.0, positive_keys=keys, excluded=((0, 7, 0),))
    ref = reference(x, None, 2.0, positive_keys=keys, excluded=((0, 7, 0),))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(_grads(ours, [x, keys]), _grads(ref, [x, keys])):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_last_level_cache_is_the_largest_readable_sysfs_size(tmp_path: Path) -> None:
    for name, size in {"index0": "48K", "index1": "64K", "index2": "2048K", "index3": "480M"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "index4").mkdir()  # a folder without a size file is skipped
    assert streamed_ce.last_level_cache_bytes(tmp_path) == 480 << 20
    assert streamed_ce.last_level_cache_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "cache_mib, threads, expected_mib",
    [(None, 2, 2), (480, 2, 16), (32, 8, 2), (32, 2, 8), (1, 1, 2), (64, 0, 16)],
)
def test_tile_bytes_per_thread_halves_the_shared_cache_within_bounds(
    cache_mib: int | None, threads: int, expected_mib: int
) -> None:
    cache = None if cache_mib is None else cache_mib << 20
    assert streamed_ce.tile_bytes_per_thread(cache, threads) == expected_mib << 20
