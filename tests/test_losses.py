"""The losses against loop-based NumPy references written here from the formulas, plus closed forms.

Every test runs twice: on the path the losses take by default (the fused C++ kernel for one process's SimCLR and
for MoCo's unit queue, where it is built) and on the eager path alone (:func:`trainers.fused_ce.eager_only`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from trainers import fused_ce
from trainers.losses import gather_with_grad, info_nce, nt_xent


@pytest.fixture(autouse=True, params=["default", "eager"])
def loss_path(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "eager":
        with fused_ce.eager_only():
            yield request.param
    else:
        yield request.param


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """For each of the 2N views: -log exp(s(a, pos)/tau) / sum_{c != a} exp(s(a, c)/tau), averaged."""
    views = _unit(np.concatenate([z1, z2]).astype(np.float64))
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        positive = a + n if a < n else a - n
        denominator = 0.0
        for c in range(2 * n):
            if c != a:
                denominator += math.exp(float(views[a] @ views[c]) / tau)
        total += -(float(views[a] @ views[positive]) / tau) + math.log(denominator)
    return total / (2 * n)


def reference_info_nce(q: np.ndarray, k: np.ndarray, negatives: np.ndarray, tau: float) -> float:
    q, k, negatives = _unit(q.astype(np.float64)), _unit(k.astype(np.float64)), _unit(negatives.astype(np.float64))
    total = 0.0
    for i in range(len(q)):
        positive = float(q[i] @ k[i]) / tau
        terms = [positive] + [float(q[i] @ neg) / tau for neg in negatives]
        total += -positive + math.log(sum(math.exp(t) for t in terms))
    return total / len(q)


@pytest.mark.parametrize("tau", [0.07, 0.2, 0.5, 1.0])
def test_nt_xent_matches_reference(tau: float) -> None:
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    ours = nt_xent(torch.from_numpy(z1).float(), torch.from_numpy(z2).float(), temperature=tau)
    assert ours.item() == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(tau: float) -> None:
    rng = np.random.default_rng(1)
    q, k, neg = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    ours = info_nce(*(torch.from_numpy(a).float() for a in (q, k, neg)), temperature=tau)
    assert ours.item() == pytest.approx(reference_info_nce(q, k, neg, tau), rel=1e-5, abs=1e-5)


def test_closed_forms() -> None:
    n, d, tau = 4, 8, 0.3
    same = torch.ones(n, d)
    # All 2N views identical: every logit is 1/tau, so the loss is log(2N - 1).
    assert nt_xent(same, same, temperature=tau).item() == pytest.approx(math.log(2 * n - 1), abs=1e-5)
    # InfoNCE with everything identical: log(K + 1).
    assert info_nce(same, same, torch.ones(10, d), temperature=tau).item() == pytest.approx(math.log(11), abs=1e-5)
    # Positive equal to the query, K negatives orthogonal to it: log(1 + K exp(-1/tau)).
    q = torch.eye(d)[:1]
    negatives = torch.eye(d)[1:]
    expected = math.log(1 + (d - 1) * math.exp(-1 / tau))
    assert info_nce(q, q, negatives, temperature=tau).item() == pytest.approx(expected, rel=1e-6)


def test_scale_invariance_and_view_symmetry() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    base = nt_xent(z1, z2, temperature=0.5)
    # Cosine similarity: rescaling embeddings changes nothing; swapping the views changes nothing.
    assert nt_xent(3 * z1, 0.5 * z2, temperature=0.5).item() == pytest.approx(base.item(), rel=1e-6)
    assert nt_xent(z2, z1, temperature=0.5).item() == pytest.approx(base.item(), rel=1e-6)
    # Permuting the images (both views alike) changes nothing either.
    perm = torch.randperm(8)
    assert nt_xent(z1[perm], z2[perm], temperature=0.5).item() == pytest.approx(base.item(), rel=1e-6)


def test_temperature_is_inverse_beta_and_monotone() -> None:
    # Positive more similar than every negative: the loss falls monotonically as tau falls (beta rises).
    q = torch.tensor([[1.0, 0.0, 0.0]])
    k = torch.tensor([[0.9, 0.1, 0.0]])
    negatives = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.0, 1.0], [-1.0, 0.2, 0.0]])
    losses = [info_nce(q, k, negatives, temperature=t).item() for t in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(losses))
    beta = 4.0
    logits = beta * torch.cat([torch.nn.functional.cosine_similarity(q, k), (
        torch.nn.functional.normalize(q) @ torch.nn.functional.normalize(negatives).T)[0]])
    by_beta = -logits[0] + torch.logsumexp(logits, 0)
    assert info_nce(q, k, negatives, temperature=1 / beta).item() == pytest.approx(by_beta.item(), rel=1e-5)


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, temperature=0.3), (z1, z2))
    neg = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: info_nce(a, b, c, temperature=0.3), (z1, z2, neg))


def test_candidates_with_offset_split_the_global_loss() -> None:
    """Chunks of anchors against the global candidates average to the loss of the whole batch."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    full = nt_xent(z1, z2, temperature=0.2)
    parts = [
        nt_xent(z1[i : i + 4], z2[i : i + 4], temperature=0.2, candidates=(z1, z2), offset=i) for i in (0, 4)
    ]
    assert torch.stack(parts).mean().item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="offset"):
        nt_xent(z1[:4], z2[:4], temperature=0.2, candidates=(z1, z2), offset=6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_temperature_low_precision_is_finite_and_exact(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 32).to(dtype), torch.randn(16, 32).to(dtype)
    loss = nt_xent(z1, z2, temperature=0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(nt_xent(z1.float(), z2.float(), temperature=0.01).item(), rel=1e-5)
    queue = torch.randn(64, 32).to(dtype)
    assert torch.isfinite(info_nce(z1, z2, queue, temperature=0.01))


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperature_is_refused(bad: float) -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        nt_xent(z, z, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z, z, temperature=bad)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="z1 and z2"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3), temperature=0.1)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 2), temperature=0.1)


def test_gather_is_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
