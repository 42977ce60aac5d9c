"""SimCLR and MoCo modules: momentum update, queue, persistent state, diagnostics, the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainers.losses import info_nce, nt_xent
from trainers.methods import METHODS, MoCo, SimCLR, training_step
from trainers.optim import LARS, warmup_cosine


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU())


def _moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    options = {"queue_length": 32, "momentum": 0.9, "temperature": 0.2} | kwargs
    return MoCo(_backbone(), 12, projection_dim=8, **options)


def _views(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)


def test_registry() -> None:
    assert METHODS == {"simclr": SimCLR, "moco": MoCo}


def test_simclr_forward_is_nt_xent_of_the_head_outputs() -> None:
    torch.manual_seed(0)
    model = SimCLR(_backbone(), 12, temperature=0.3, projection_dim=8)
    v1, v2 = _views()
    output = model(v1, v2)
    expected = nt_xent(model.embed(v1), model.embed(v2), temperature=0.3)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(output.metrics) >= {"positive_cosine", "negative_cosine", "alignment", "uniformity", "embedding_std"}


@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 1.0])
def test_momentum_update_follows_the_formula(m: float) -> None:
    model = _moco(momentum=m)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    key_before = [p.detach().clone() for p in model.key_parameters()]
    training_step(model, *_views(), optimizer)
    online_after = [p.detach() for p in model.online_parameters()]
    for before, after, theta in zip(key_before, model.key_parameters(), online_after):
        torch.testing.assert_close(after, m * before + (1 - m) * theta, rtol=0, atol=1e-7)
    if m == 0.0:  # a copy of the online encoder
        assert all(torch.equal(k, q) for k, q in zip(model.key_parameters(), online_after))
    if m == 1.0:  # frozen
        assert all(torch.equal(k, b) for k, b in zip(model.key_parameters(), key_before))
    assert all(not p.requires_grad for p in model.key_parameters())
    assert int(model.step) == 1


def test_queue_is_fifo_and_persistent() -> None:
    model = _moco(queue_length=24)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keys_seen = []
    for seed in range(4):  # 4 steps of 8 keys in a queue of 24: wraps around once
        v1, v2 = _views(seed=seed)
        keys_seen.append(model.encode_keys(v2))
        training_step(model, v1, v2, optimizer)
    assert int(model.queue_ptr) == (4 * 8) % 24
    torch.testing.assert_close(model.queue[:8], keys_seen[3])  # the 4th batch overwrote the oldest slots
    torch.testing.assert_close(model.queue[8:16], keys_seen[1])
    assert model.queue_step.tolist() == [3] * 8 + [1] * 8 + [2] * 8
    state = model.state_dict()
    for name in ("queue", "queue_ptr", "queue_step", "step"):
        assert name in state
    restored = _moco(queue_length=24)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue, model.queue) and int(restored.queue_ptr) == 8


def test_loss_uses_the_queue_before_this_steps_keys() -> None:
    for symmetric in (False, True):
        model = _moco(symmetric=symmetric)
        v1, v2 = _views()
        old_queue = model.queue.clone()
        q1, q2 = model.embed(v1), model.embed(v2)
        k1, k2 = model.encode_keys(v1), model.encode_keys(v2)
        output = model(v1, v2)
        expected = info_nce(q1, k2, old_queue, temperature=0.2)
        if symmetric:  # both halves against the *old* queue (lightly #564 reused just-enqueued keys)
            expected = 0.5 * (expected + info_nce(q2, k1, old_queue, temperature=0.2))
        assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert int(model.queue_ptr) == (16 if symmetric else 8)


def test_eval_mode_does_not_touch_the_queue() -> None:
    model = _moco().eval()
    before = model.queue.clone()
    model(*_views())
    assert torch.equal(model.queue, before) and int(model.queue_ptr) == 0


def test_queue_length_must_be_a_multiple_of_keys_per_step() -> None:
    model = _moco(queue_length=20)
    with pytest.raises(RuntimeError, match=r"queue_length \(20\) must be a multiple of the keys enqueued per step \(8"):
        model(*_views())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"momentum": 1.5}, "momentum must satisfy 0 <= m <= 1, got 1.5"),
    ({"momentum": -0.1}, "momentum must satisfy"),
    ({"queue_length": 0}, "queue_length must be an integer >= 1, got 0"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
])
def test_invalid_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _moco(**kwargs)


def test_staleness_diagnostics_separate_momentum_values() -> None:
    """With m = 0 the key encoder changes every step, so old queue keys disagree with re-encoded ones."""
    results = {}
    for m in (0.0, 0.999):
        model = _moco(momentum=m, queue_length=64, staleness_sample_size=32)
        optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
        for seed in range(12):
            training_step(model, *_views(seed=seed), optimizer)
        results[m] = model.epoch_diagnostics()
    for diagnostics in results.values():
        assert diagnostics["queue_fill"] == 1.0
        assert diagnostics["queue_key_age"] == pytest.approx(4.5)  # 8 steps of 8 keys: ages 1..8
    assert results[0.999]["queue_key_consistency"] > 0.99
    assert results[0.0]["queue_key_consistency"] < results[0.999]["queue_key_consistency"] - 0.01


def test_simclr_training_reduces_the_loss() -> None:
    # (MoCo's learning is tested on real images in test_loop: on one repeated batch its queue fills with
    # near-copies of the positives, so its loss must rise there.)
    torch.manual_seed(0)
    model = SimCLR(_backbone(), 12, projection_dim=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    v1, v2 = _views(16)
    first = training_step(model, v1, v2, optimizer).loss.item()
    for _ in range(30):
        last = training_step(model, v1 + 0.01 * torch.randn_like(v1), v2, optimizer).loss.item()
    assert last < first - 0.1


def test_lars_and_schedule() -> None:
    f = warmup_cosine(2, 10)
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    reference = copy.deepcopy(layer)
    optimizer = LARS(layer.parameters(), lr=1.0, momentum=0.0, weight_decay=0.1, trust_coefficient=0.01)
    layer(torch.randn(5, 4)).sum().backward()
    grad_w, grad_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    optimizer.step()
    update = grad_w + 0.1 * reference.weight
    trust = 0.01 * reference.weight.norm() / update.norm()
    torch.testing.assert_close(layer.weight, reference.weight - trust * update)
    torch.testing.assert_close(layer.bias, reference.bias - grad_b)  # biases: no decay, no adaptation
