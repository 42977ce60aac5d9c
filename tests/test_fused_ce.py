"""The fused C++ loss kernel (trainers/csrc/fused_ce.cpp) against the formulas on materialised logits, written here.

The references are plain float64 autograd: normalise, one full logits matrix, the excluded entries set to -inf,
``logsumexp - positive``. The kernel is called through the losses (as the trainers call it) and directly; where
the fused path does not apply, the losses must fall back to the eager path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from trainers import fused_ce, streamed_ce
from trainers.losses import info_nce, nt_xent

pytestmark = pytest.mark.skipif(
    os.environ.get(fused_ce.ENV_VAR, "1") == "0", reason=f"{fused_ce.ENV_VAR}=0 switches the fused kernel off")


def reference_simclr(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows [z1; z2]; row r's positive is the other view of its image; an anchor is not its own negative."""
    n = z1.shape[0]
    a = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    logits = a @ a.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(2 * n), positive]).mean()


def reference_moco(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits [q.k, q.queue] / tau with the positive first; the queue holds unit vectors as stored."""
    a, key = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    logits = torch.cat([(a * key).sum(dim=1, keepdim=True), a @ queue.double().T], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, terms: float) -> None:
    """Elementwise within rtol of the larger of the largest gradient and ``terms``, the size of the terms that
    cancel in it (beta / rows: with n = 1 the loss is 0 whatever the inputs, its gradient 0 up to rounding)."""
    scale = max(want.abs().max().item(), terms)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * scale)


def test_the_kernel_builds_and_loads_here() -> None:
    module = fused_ce.load()
    assert module is not None, "the fused kernel did not build: see the warning"
    assert hasattr(module, "simclr_loss") and hasattr(module, "keyed_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "dim", "tau"), [(1, 3, 0.5), (5, 16, 0.07), (64, 32, 0.2), (200, 128, 1.0)])
def test_simclr_matches_the_formula(n: int, dim: int, tau: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * dim)
    z1 = torch.randn(n, dim, generator=gen, dtype=dtype, requires_grad=True)
    z2 = torch.randn(n, dim, generator=gen, dtype=dtype, requires_grad=True)
    loss = nt_xent(z1, z2, temperature=tau)
    assert loss.grad_fn.name() == "SimclrLossBackward", "the fused path was not taken"
    expected = reference_simclr(z1, z2, tau)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.dtype == dtype
    # abs: at n = 1 the loss is log(exp(x)) - x = 0, and the logit from the matrix product and the positive from
    # the row loop may differ in the last bit (they did on an AMD EPYC's BLAS: 6e-8 in float32).
    assert loss.item() == pytest.approx(expected.item(), rel=rtol, abs=rtol)
    for got, want in zip(_grads(loss, [z1, z2]), _grads(expected, [z1, z2]), strict=True):
        assert got.dtype == dtype
        _assert_close(got, want, rtol, 1 / (2 * n * tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keys_need_grad", [False, True])
@pytest.mark.parametrize(("n", "queue_length", "tau"), [(1, 1, 0.2), (7, 50, 0.07), (64, 1000, 0.5)])
def test_moco_matches_the_formula(n: int, queue_length: int, tau: float, keys_need_grad: bool,
                                  dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + queue_length)
    q = torch.randn(n, 24, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(n, 24, generator=gen, dtype=dtype, requires_grad=keys_need_grad)
    queue = F.normalize(torch.randn(queue_length, 24, generator=gen, dtype=dtype), dim=1)
    loss = info_nce(q, k, queue, temperature=tau, unit_negatives=True)
    assert loss.grad_fn.name() == "KeyedLossBackward", "the fused path was not taken"
    expected = reference_moco(q, k, queue, tau)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(expected.item(), rel=rtol, abs=rtol)  # abs: as for SimCLR above
    leaves = [q, k] if keys_need_grad else [q]
    for got, want in zip(_grads(loss, leaves), _grads(expected, leaves), strict=True):
        _assert_close(got, want, rtol, 1 / (n * tau))


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True), torch.randn(3, 5, dtype=torch.float64,
                                                                                     requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused_ce.simclr_loss(a, b, 1 / 0.3), (z1, z2))
    q = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda a, b: fused_ce.keyed_loss(a, b, queue, 1 / 0.2), (q, k))


def test_many_tiles_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of a few rows per tile: the zeroed diagonal crosses every tile border, including a last short one."""
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(11, 8, generator=gen, requires_grad=True), torch.randn(11, 8, generator=gen,
                                                                               requires_grad=True)
    q, k = torch.randn(11, 8, generator=gen, requires_grad=True), torch.randn(11, 8, generator=gen)
    queue = F.normalize(torch.randn(13, 8, generator=gen), dim=1)
    whole_simclr = fused_ce.simclr_loss(z1, z2, 4.0)
    whole_moco = fused_ce.keyed_loss(q, k, queue, 4.0)
    monkeypatch.setattr(streamed_ce, "TILE_BYTES_PER_THREAD", 3 * 22 * 4)
    # per thread: with 2 threads, 11 rows each, in tiles of 3, 3, 3, 2
    assert streamed_ce.cpu_tile_rows(22, 4, one_thread=True) == 3
    tiled_simclr = fused_ce.simclr_loss(z1, z2, 4.0)
    tiled_moco = fused_ce.keyed_loss(q, k, queue, 4.0)
    assert tiled_simclr.item() == pytest.approx(whole_simclr.item(), rel=1e-6)
    assert tiled_moco.item() == pytest.approx(whole_moco.item(), rel=1e-6)
    assert tiled_simclr.item() == pytest.approx(reference_simclr(z1, z2, 0.25).item(), rel=1e-5)
    for got, want in zip(_grads(tiled_simclr, [z1, z2]), _grads(whole_simclr, [z1, z2]), strict=True):
        torch.testing.assert_close(got, want)


def test_column_blocks_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """MoCo's logits in tiles of 3 rows x 4 queue columns (13 columns: a last block of one), against whole rows."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(11, 8, generator=gen, requires_grad=True), torch.randn(11, 8, generator=gen,
                                                                             requires_grad=True)
    queue = F.normalize(torch.randn(13, 8, generator=gen), dim=1)
    whole = fused_ce.keyed_loss(q, k, queue, 4.0)
    whole_grads = _grads(whole, [q, k])
    monkeypatch.setattr(streamed_ce, "BLOCK_COLUMNS", 4)
    monkeypatch.setattr(streamed_ce, "TILE_BYTES_PER_THREAD", 3 * 4 * 4)
    assert streamed_ce.cpu_tile_rows(4, 4, one_thread=True) == 3
    blocked = fused_ce.keyed_loss(q, k, queue, 4.0)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert blocked.item() == pytest.approx(reference_moco(q, k, queue, 0.25).item(), rel=1e-5)
    for got, want in zip(_grads(blocked, [q, k]), whole_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_fused_and_eager_paths_agree() -> None:
    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(32, 16, generator=gen, requires_grad=True), torch.randn(32, 16, generator=gen,
                                                                                 requires_grad=True)
    fused = nt_xent(z1, z2, temperature=0.1)
    with fused_ce.eager_only():
        eager = nt_xent(z1, z2, temperature=0.1)
    assert fused.grad_fn.name() == "SimclrLossBackward"
    assert eager.grad_fn.name() == "_ContrastiveCrossEntropyBackward"
    assert fused.item() == pytest.approx(eager.item(), rel=1e-6)
    for got, want in zip(_grads(fused, [z1, z2]), _grads(eager, [z1, z2]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_zero_rows_are_clamped_as_normalize_does() -> None:
    z1 = torch.randn(4, 6, dtype=torch.float64)
    z1[2] = 0.0
    z1.requires_grad_()
    z2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z1, z2, temperature=0.5)
    expected = reference_simclr(z1, z2, 0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for got, want in zip(_grads(loss, [z1, z2]), _grads(expected, [z1, z2]), strict=True):
        torch.testing.assert_close(got, want)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    z2 = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    loss = nt_xent(z1, z2, temperature=0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_simclr(z1.float(), z2.float(), 0.2).item(), rel=1e-5)
    loss.backward()
    assert z1.grad is not None and z1.grad.dtype == torch.bfloat16 and torch.isfinite(z1.grad.float()).all()


def test_strided_and_mixed_dtype_inputs() -> None:
    """Non-contiguous views and keys of another dtype: the kernel converts them as the eager path does."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(10, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    z1, z2 = base[:, ::2], base[:, 1::2]  # (10, 6) views with stride 2
    loss = nt_xent(z1, z2, temperature=0.4)
    assert loss.grad_fn.name() == "SimclrLossBackward"
    expected = reference_simclr(z1, z2, 0.4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(_grads(loss, [base])[0], _grads(expected, [base])[0])
    q = torch.randn(5, 6, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(5, 6, generator=gen, requires_grad=True)
    queue = F.normalize(torch.randn(9, 6, generator=gen, dtype=torch.float64), dim=1)
    loss = info_nce(q, k, queue, temperature=0.2, unit_negatives=True)
    assert loss.grad_fn.name() == "KeyedLossBackward" and loss.dtype == torch.float32
    expected = reference_moco(q.float(), k, queue.float(), 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad_q, grad_k = _grads(loss, [q, k])
    assert grad_q.dtype == torch.bfloat16 and grad_k.dtype == torch.float32
    torch.testing.assert_close(grad_k, _grads(expected, [k])[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tile_rows", [None, 5])
def test_a_second_backward_gives_the_same_gradient(tile_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward makes the gradients and the backward hands them out; a retained graph's second backward
    recomputes them (tile by tile where there are several) and must give the same result."""
    if tile_rows is not None:
        monkeypatch.setattr(streamed_ce, "TILE_BYTES_PER_THREAD", tile_rows * 12 * 4)
        assert streamed_ce.cpu_tile_rows(12, 4, one_thread=True) == tile_rows
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    queue = F.normalize(torch.randn(12, 4), dim=1)
    cases = [(nt_xent(z1, z2, temperature=0.3), reference_simclr(z1, z2, 0.3)),
             (info_nce(z1, z2, queue, temperature=0.3, unit_negatives=True), reference_moco(z1, z2, queue, 0.3))]
    for loss, reference in cases:
        first = torch.autograd.grad(loss, [z1, z2], retain_graph=True)
        second = torch.autograd.grad(loss, [z1, z2])
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        for got, want in zip(first, _grads(reference, [z1, z2]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_second_backward_without_a_retained_graph_is_refused() -> None:
    """As autograd refuses it for any graph: the first backward frees what the node kept."""
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    queue = F.normalize(torch.randn(12, 4), dim=1)
    for loss in (nt_xent(z1, z2, temperature=0.3), info_nce(z1, z2, queue, temperature=0.3, unit_negatives=True)):
        assert loss.grad_fn.name() in {"SimclrLossBackward", "KeyedLossBackward"}
        loss.backward()
        with pytest.raises(RuntimeError, match="a second time"):
            loss.backward()


def test_the_upstream_gradient_scales_the_forwards_gradients() -> None:
    """The forward makes the gradients for an upstream gradient of 1; a scaled loss, a loss used twice and a
    loss in a sum with another term must get theirs scaled."""
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(9, 16, generator=gen, requires_grad=True)
    z2 = torch.randn(9, 16, generator=gen, requires_grad=True)
    queue = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    pairs = [(lambda: nt_xent(z1, z2, temperature=0.2), lambda: reference_simclr(z1, z2, 0.2)),
             (lambda: info_nce(z1, z2, queue, temperature=0.2, unit_negatives=True),
              lambda: reference_moco(z1, z2, queue, 0.2))]
    for fused, reference in pairs:
        for combine in (lambda x: 0.37 * x, lambda x: x + x, lambda x: -x + 5 * x.detach(),
                        lambda x: x * z1.sum()):
            got = _grads(combine(fused()), [z1, z2])
            want = _grads(combine(reference()), [z1, z2])
            for g, w in zip(got, want, strict=True):
                _assert_close(g, w, 1e-5, 0.0)


def test_a_second_derivative_is_refused_not_silently_wrong() -> None:
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = nt_xent(z1, z2, temperature=0.3)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, [z1], create_graph=True)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    loss = info_nce(q, k, F.normalize(torch.randn(6, 8), dim=1), temperature=0.2, unit_negatives=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, [q], create_graph=True)


def test_a_queue_changed_before_the_backward_is_refused() -> None:
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    queue = F.normalize(torch.randn(10, 8), dim=1)
    loss = info_nce(q, k, queue, temperature=0.2, unit_negatives=True)
    queue[0] = 0.0  # MoCo enqueues after its step; changing the saved queue first would give a wrong gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_fused_path_is_skipped_where_it_does_not_apply() -> None:
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    queue = F.normalize(torch.randn(6, 8), dim=1)
    with torch.no_grad():  # no gradient: the eager path stores nothing
        assert fused_ce.simclr_loss(z1, z2, 2.0) is None
    assert fused_ce.simclr_loss(z1.detach(), z2.detach(), 2.0) is None
    assert fused_ce.simclr_loss(z1, z2, 100.0) is None  # tau = 0.01: shifted logits, eager path
    assert fused_ce.keyed_loss(q, k, queue.requires_grad_(), 2.0) is None  # a queue with a gradient
    with pytest.raises(RuntimeError, match="candidates get no gradient"):  # and the kernel itself refuses one
        fused_ce.load().keyed_loss(q, k, queue, 2.0, 4, 6)
    with fused_ce.eager_only():
        assert fused_ce.simclr_loss(z1, z2, 2.0) is None
    assert fused_ce.simclr_loss(z1, z2, 2.0) is not None
    # and the losses give the formula's value there all the same
    assert nt_xent(z1, z2, temperature=0.01).item() == pytest.approx(reference_simclr(z1, z2, 0.01).item(),
                                                                     rel=1e-5)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_thread_counts_agree(threads: int) -> None:
    """Each thread makes and back-propagates its own run of rows; 1 thread, 3 (uneven runs) and 5 agree with the
    default. Up to 4 threads each SimCLR thread normalises all rows into its own copy, beyond that each its share of
    one copy: 5 takes the other path."""
    gen = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(100, 32, generator=gen, requires_grad=True), torch.randn(100, 32, generator=gen,
                                                                                  requires_grad=True)
    q, k = torch.randn(50, 32, generator=gen, requires_grad=True), torch.randn(50, 32, generator=gen)
    queue = F.normalize(torch.randn(300, 32, generator=gen), dim=1)

    def losses() -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        simclr = nt_xent(z1, z2, temperature=0.2)
        moco = info_nce(q, k, queue, temperature=0.2, unit_negatives=True)
        return [(simclr.detach(), _grads(simclr, [z1, z2])), (moco.detach(), _grads(moco, [q]))]

    default = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        other = losses()
    finally:
        torch.set_num_threads(default)
    for (loss, grads), (other_loss, other_grads) in zip(losses(), other, strict=True):
        assert loss.item() == pytest.approx(other_loss.item(), rel=1e-6)
        for a, b in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="the kernels split rows between threads only with two or more")
def test_rows_split_by_the_threads_speeds_give_bitwise_equal_values() -> None:
    """The kernels split their rows in proportion to the threads' measured speeds (a core running slower gets fewer).
    Forced uneven splits, to the clamp (a thread gets between half and one and a half times the even share), give
    bitwise the values of the even split; and a call on two threads keeps both threads' speeds for the next."""
    module = fused_ce.load()
    gen = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(200, 64, generator=gen, requires_grad=True), torch.randn(200, 64, generator=gen,
                                                                                  requires_grad=True)
    q, k = torch.randn(100, 64, generator=gen, requires_grad=True), torch.randn(100, 64, generator=gen,
                                                                                requires_grad=True)
    queue = F.normalize(torch.randn(700, 64, generator=gen), dim=1)

    def values(rates: list[float]) -> list[torch.Tensor]:
        module.keep_thread_rates(rates)  # what the next call's first phase splits by
        simclr = nt_xent(z1, z2, temperature=0.2)
        module.keep_thread_rates(rates)
        moco = info_nce(q, k, queue, temperature=0.2, unit_negatives=True)
        return [simclr.detach(), *_grads(simclr, [z1, z2]), moco.detach(), *_grads(moco, [q, k])]

    previous = module.keep_thread_rates([])
    try:
        even = values([0.0, 0.0])  # not measured: the even split
        measured = module.keep_thread_rates([])
        assert measured[0] > 0 and measured[1] > 0
        for rates in ([1.0, 1.4], [1.4, 1.0], [1.0, 10.0], [10.0, 1.0]):
            for got, want in zip(values(rates), even, strict=True):
                assert torch.equal(got, want), rates
    finally:
        module.keep_thread_rates(previous)


def _row_kernels() -> list[str]:
    module = fused_ce.load()
    return [] if module is None else module.row_kernel_names()


@pytest.fixture(params=_row_kernels())
def row_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each set of row kernels this CPU supports, in turn (the losses use the first)."""
    module = fused_ce.load()
    previous = module.use_row_kernels(request.param)
    try:
        yield request.param
    finally:
        module.use_row_kernels(previous)


def test_the_best_row_kernels_come_first() -> None:
    names = _row_kernels()
    assert names[-1] == "baseline" and len(set(names)) == len(names)
    assert set(names) <= {"avx512", "avx2", "baseline"}


def test_row_kernel_exp_and_sums_against_float64(row_kernels: str) -> None:
    """exp within 2 ulp over its whole range and the row sums within 1e-6, for row lengths around the 16 lanes."""
    module = fused_ce.load()
    grid = torch.linspace(-87.0, 88.0, 100_003).reshape(1, -1)
    got = grid.clone()
    module.exp_sum_rows(got, 1.0)
    want = grid.double().exp()
    assert ((got.double() - want) / want).abs().max().item() < 2 * 2**-23
    gen = torch.Generator().manual_seed(6)
    for columns in (1, 15, 16, 17, 100, 4099):
        cosines = torch.rand(7, columns, generator=gen) * 2 - 1
        exps = cosines.clone()
        sums = module.exp_sum_rows(exps, 12.5)  # beta = 1 / tau = 12.5, as at tau = 0.08
        want = (cosines * 12.5).double().exp()  # the logit beta * x rounded to float32, as the kernel does
        torch.testing.assert_close(exps.double(), want, rtol=2 * 2**-23, atol=0.0)
        torch.testing.assert_close(sums.double(), want.sum(dim=1), rtol=1e-6, atol=0.0)
    nan_row = torch.tensor([[0.5, float("nan"), -0.5]])
    assert torch.isnan(module.exp_sum_rows(nan_row, 2.0)).all() and torch.isnan(nan_row[0, 1])


def test_row_kernel_symmetric_scaling(row_kernels: str) -> None:
    gen = torch.Generator().manual_seed(7)
    e, f = torch.rand(37, 37, generator=gen), torch.rand(37, generator=gen)
    scaled = e.clone()
    fused_ce.load().scale_symmetric_rows(scaled, f)
    torch.testing.assert_close(scaled, e * (f[:, None] + f[None, :]))


@pytest.mark.parametrize("dim", [3, 16, 40, 128])
def test_each_row_kernel_gives_the_formulas_losses(row_kernels: str, dim: int) -> None:
    """Both losses, value and gradients (keys' too), with each kernel set: the normalisation, exp, scaling and
    gradient loops of every build variant, at embedding sizes below, at and past the 16 lanes."""
    gen = torch.Generator().manual_seed(dim)
    z1, z2 = torch.randn(33, dim, generator=gen, requires_grad=True), torch.randn(33, dim, generator=gen,
                                                                                  requires_grad=True)
    loss = nt_xent(z1, z2, temperature=0.1)
    expected = reference_simclr(z1, z2, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(_grads(loss, [z1, z2]), _grads(expected, [z1, z2]), strict=True):
        _assert_close(got, want, 1e-5, 1 / (66 * 0.1))
    q, k = torch.randn(9, dim, generator=gen, requires_grad=True), torch.randn(9, dim, generator=gen,
                                                                               requires_grad=True)
    queue = F.normalize(torch.randn(70, dim, generator=gen), dim=1)
    loss = info_nce(q, k, queue, temperature=0.2, unit_negatives=True)
    expected = reference_moco(q, k, queue, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(_grads(loss, [q, k]), _grads(expected, [q, k]), strict=True):
        _assert_close(got, want, 1e-5, 1 / (9 * 0.2))
