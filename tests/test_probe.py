"""Tests for trainers.probe: kNN vs a loop reference, linear probe vs scikit-learn, extraction, fine-tune."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from trainers.probe import (
    Features,
    evaluate_frozen,
    extract_features,
    fine_tune,
    knn_accuracy,
    knn_predict,
    linear_probe,
    raw_pixel_baseline,
)

# --------------------------------------------------------------------------------------------------
# helpers


def _random_features(n: int, d: int, num_classes: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(n, d, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def _blobs(n: int, centers: Tensor, noise: float, seed: int) -> Features:
    """Gaussian blobs: x = centers[y] + noise · ε, y uniform over the classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, centers.shape[0], (n,), generator=g)
    return Features(centers[y] + noise * torch.randn(n, centers.shape[1], generator=g), y)


def _knn_reference(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
) -> np.ndarray:
    """The weighted-kNN formula written as a plain per-query loop in float64."""
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    preds = []
    for q in query_x:
        q = q / np.linalg.norm(q)
        sims = np.array([float(np.dot(q, t)) for t in train_n])
        order = np.argsort(-sims, kind="stable")[: min(k, len(sims))]
        votes = np.zeros(num_classes)
        for j in order:
            votes[train_y[j]] += math.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def _halves_images(n: int, seed: int) -> TensorDataset:
    """1×8×8 images; class 0 has the bright left half, class 1 the bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.7 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :, :4] += 1.0
    x[y == 1, :, :, 4:] += 1.0
    return TensorDataset(x, y)


def _tiny_convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
    )  # (B, 1, 8, 8) -> (B, 128)


# --------------------------------------------------------------------------------------------------
# kNN


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (7, 0.1), (20, 0.5), (50, 0.05)])
def test_knn_matches_loop_reference(k: int, temperature: float) -> None:
    train = _random_features(120, 8, 4, seed=1)
    query = _random_features(40, 8, 4, seed=2)
    train_x, train_y, query_x = train.x.double().numpy(), train.y.numpy(), query.x.double().numpy()
    expected = _knn_reference(train_x, train_y, query_x, 4, k, temperature)
    preds = knn_predict(train, query.x, num_classes=4, k=k, temperature=temperature)
    assert preds.dtype == torch.long
    assert preds.shape == (40,)
    np.testing.assert_array_equal(preds.numpy(), expected)
    acc = knn_accuracy(train, query, num_classes=4, k=k, temperature=temperature)
    assert acc == pytest.approx(float(np.mean(expected == query.y.numpy())))


def test_knn_uses_exponential_weights_not_majority() -> None:
    # Two class-0 neighbours at cosine 0.5 vs one class-1 neighbour at cosine 0.99: a majority vote says
    # 0, but exp(0.99 / 0.1) ≫ 2 · exp(0.5 / 0.1), so the weighted vote says 1.
    a, b = math.acos(0.5), math.acos(0.99)
    train_x = torch.tensor(
        [[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)], [math.cos(b), math.sin(b)]]
    )
    train = Features(train_x, torch.tensor([0, 0, 1]))
    query = torch.tensor([[3.0, 0.0]])  # not unit norm: cosine must normalise it
    assert knn_predict(train, query, num_classes=2, k=3, temperature=0.1).tolist() == [1]
    # With a huge temperature the weights are ≈ equal and the majority wins.
    assert knn_predict(train, query, num_classes=2, k=3, temperature=1e4).tolist() == [0]


def test_knn_k_is_clamped_to_train_size() -> None:
    train = _random_features(30, 6, 3, seed=3)
    query = _random_features(25, 6, 3, seed=4)
    clamped = knn_predict(train, query.x, num_classes=3, k=1000, temperature=0.2)
    exact = knn_predict(train, query.x, num_classes=3, k=30, temperature=0.2)
    torch.testing.assert_close(clamped, exact)
    expected = _knn_reference(train.x.double().numpy(), train.y.numpy(), query.x.double().numpy(), 3, 30, 0.2)
    np.testing.assert_array_equal(clamped.numpy(), expected)


def test_knn_chunk_size_does_not_change_predictions() -> None:
    train = _random_features(200, 16, 5, seed=5)
    query = _random_features(97, 16, 5, seed=6)
    results = [knn_predict(train, query.x, num_classes=5, k=15, chunk_size=c) for c in (1, 7, 32, 1024)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


def test_knn_small_temperature_does_not_overflow() -> None:
    train = _random_features(100, 8, 3, seed=7)
    query = _random_features(30, 8, 3, seed=8)
    # exp(1 / 1e-3) overflows float32 and float64; the max-shifted weights must still give 1-NN-like votes.
    preds = knn_predict(train, query.x, num_classes=3, k=10, temperature=1e-3)
    nearest = knn_predict(train, query.x, num_classes=3, k=1, temperature=0.1)
    torch.testing.assert_close(preds, nearest)


# --------------------------------------------------------------------------------------------------
# linear probe


def _blob_splits(num_classes: int = 10, dim: int = 32, noise: float = 2.2) -> tuple[Features, ...]:
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    return tuple(_blobs(n, centers, noise, seed) for n, seed in ((3000, 1), (1000, 2), (1000, 3)))


def test_linear_probe_high_accuracy_on_separable_blobs() -> None:
    train, val, test = _blob_splits(noise=0.5)
    result = linear_probe(train, val, test, num_classes=10)
    assert result.val_accuracy > 0.98
    assert result.test_accuracy is not None and result.test_accuracy > 0.98
    assert result.train_accuracy > 0.98
    assert result.weight_decay in (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_linear_probe_matches_sklearn(weight_decay: float) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, val, test = _blob_splits(noise=2.2)  # overlapping classes: accuracy well below 1
    result = linear_probe(train, val, test, num_classes=10, weight_decays=(weight_decay,), max_iter=500)
    scaler = StandardScaler().fit(train.x.numpy())
    # Our objective mean CE + λ/2 ||W||² equals sklearn's C · Σ CE + ½ ||W||² with C = 1 / (λ N).
    clf = LogisticRegression(C=1.0 / (weight_decay * len(train)), max_iter=2000, tol=1e-8)
    clf.fit(scaler.transform(train.x.numpy()), train.y.numpy())
    sk_val = clf.score(scaler.transform(val.x.numpy()), val.y.numpy())
    sk_test = clf.score(scaler.transform(test.x.numpy()), test.y.numpy())
    assert 0.5 < sk_val < 0.99  # the comparison is informative only away from chance and from 100 %
    assert abs(result.val_accuracy - sk_val) <= 0.015
    assert result.test_accuracy is not None
    assert abs(result.test_accuracy - sk_test) <= 0.015


def _val_test_disagree() -> tuple[Features, Features, Features]:
    """Train 70/30 on x ~ N(∓2, 1). "Majority" split: class-1-looking points (x ≈ +2) labelled 0, which
    only a model crushed to its bias (huge weight decay → always predict the majority class 0) gets right.
    "Natural" split: fresh draws from the train distribution, which the unregularised model gets right."""
    g = torch.Generator().manual_seed(0)

    def natural(n: int) -> Features:
        y = (torch.rand(n, generator=g) < 0.3).long()
        return Features((4.0 * y - 2.0 + torch.randn(n, generator=g)).unsqueeze(1), y)

    majority = Features(2.0 + 0.3 * torch.randn(200, 1, generator=g), torch.zeros(200, dtype=torch.long))
    return natural(1000), majority, natural(1000)


def test_weight_decay_is_chosen_on_validation_not_test() -> None:
    train, majority, natural = _val_test_disagree()
    decays = (0.0, 10.0)
    result = linear_probe(train, majority, natural, num_classes=2, weight_decays=decays)
    assert result.weight_decay == 10.0  # best on val (the "majority" split) ...
    assert result.val_accuracy == 1.0
    assert result.test_accuracy is not None and result.test_accuracy < 0.8  # ... although test prefers 0.0
    swapped = linear_probe(train, natural, majority, num_classes=2, weight_decays=decays)
    assert swapped.weight_decay == 0.0
    assert swapped.val_accuracy > 0.9
    assert swapped.test_accuracy is not None and swapped.test_accuracy < 0.1
    # The choice does not depend on the order the candidates come in.
    assert linear_probe(train, majority, natural, num_classes=2, weight_decays=decays[::-1]) == result


def test_validation_ties_go_to_the_largest_weight_decay() -> None:
    train, val, _ = _blob_splits(noise=0.05)  # every candidate gets 100 % on val
    result = linear_probe(train, val, num_classes=10, weight_decays=(0.0, 1e-4, 1e-3))
    assert result.val_accuracy == 1.0
    assert result.weight_decay == 1e-3


def test_weight_decay_path_stops_after_patience_declines_with_the_same_choice() -> None:
    """Few noisy training points: weak penalties overfit, so validation accuracy falls along the path."""
    centers = torch.randn(4, 60, generator=torch.Generator().manual_seed(0))
    train, val = _blobs(120, centers, 6.0, 1), _blobs(1000, centers, 6.0, 2)
    decays = (1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0)
    full = linear_probe(train, val, num_classes=4, weight_decays=decays, path_patience=None)
    assert full.weight_decays_fitted == decays  # strongest first, every one
    stopped = linear_probe(train, val, num_classes=4, weight_decays=decays, path_patience=2)
    # The best (0.1) is followed by two worse ones, then the path stops: same choice, same accuracies.
    assert full.weight_decay == stopped.weight_decay == 0.1
    assert stopped.weight_decays_fitted == decays[:4]
    assert (stopped.val_accuracy, stopped.train_accuracy) == (full.val_accuracy, full.train_accuracy)
    assert linear_probe(train, val, num_classes=4, weight_decays=decays, path_patience=1).weight_decays_fitted == (
        decays[:3])


def test_linear_probe_without_test_reports_none() -> None:
    train, val, _ = _blob_splits(noise=0.5)
    result = linear_probe(train, val, num_classes=10, weight_decays=(1e-3,))
    assert result.test_accuracy is None
    assert 0.0 <= result.val_accuracy <= 1.0


def test_linear_probe_standardises_with_train_statistics_only() -> None:
    # A constant train feature (std 0) must not blow up when val/test vary along it, and a shift of the
    # val features (not seen by train stats) must change the result: stats come from train only.
    train, val, _ = _blob_splits(num_classes=3, dim=4, noise=0.5)
    with_const = Features(torch.cat([train.x, torch.ones(len(train), 1)], 1), train.y)
    val_const = Features(torch.cat([val.x, torch.randn(len(val), 1)], 1), val.y)
    result = linear_probe(with_const, val_const, num_classes=3)
    assert result.val_accuracy > 0.95
    shifted = Features(val.x + 100.0, val.y)
    assert linear_probe(train, shifted, num_classes=3).val_accuracy < 0.7


# --------------------------------------------------------------------------------------------------
# feature extraction


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.seen = 0

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        return self.drop(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _image_set(n: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_extract_features_stop_gradient_shapes_and_modes() -> None:
    encoder = _Encoder()
    encoder.train()
    encoder.bn.eval()  # a deliberately frozen BatchNorm inside a training model must stay frozen
    dataset = _image_set(10)
    feats = extract_features(encoder, dataset, batch_size=3)
    assert feats.x.shape == (10, 4)
    assert feats.x.dtype == torch.float32 and feats.y.dtype == torch.long
    assert feats.x.device.type == "cpu"
    assert not feats.x.requires_grad
    torch.testing.assert_close(feats.y, dataset.tensors[1])
    assert encoder.training and encoder.conv.training and encoder.drop.training
    assert not encoder.bn.training
    encoder.eval()
    with torch.no_grad():
        expected = encoder(dataset.tensors[0])
    torch.testing.assert_close(feats.x, expected)  # eval mode: deterministic, running BN statistics


def test_extract_features_restores_modes_on_error_and_casts_to_float32() -> None:
    class Failing(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    failing = Failing().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(failing, _image_set(4))
    assert failing.training

    double = nn.Sequential(nn.Flatten(), nn.Linear(108, 5)).double()
    dataset = TensorDataset(torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.arange(4))
    feats = extract_features(double, dataset)
    assert feats.x.dtype == torch.float32 and feats.x.shape == (4, 5)


def test_extract_features_rejects_bad_encoder_output_and_empty_dataset() -> None:
    with pytest.raises(ValueError, match=re.escape("(4, 3, 6, 6)")):
        extract_features(nn.Identity(), _image_set(4))
    empty = TensorDataset(torch.empty(0, 3, 6, 6), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`dataset`.*empty"):
        extract_features(nn.Flatten(), empty)


# --------------------------------------------------------------------------------------------------
# frozen evaluation and raw-pixel baseline


def test_evaluate_frozen_extracts_each_split_once() -> None:
    encoder = _Encoder()
    train, val, test = _image_set(60, 1), _image_set(20, 2), _image_set(20, 3)
    out = evaluate_frozen(encoder, train, val, test, num_classes=3, knn_k=5, batch_size=16)
    assert encoder.seen == 100  # one forward pass per example: the linear probe and kNN share features
    assert set(out) == {
        "linear_val_accuracy", "linear_test_accuracy", "linear_weight_decay", "knn_val_accuracy",
        "knn_test_accuracy",
    }
    for key, value in out.items():
        assert isinstance(value, float)
        if key.endswith("accuracy"):
            assert 0.0 <= value <= 1.0
    no_test = evaluate_frozen(encoder, train, val, None, num_classes=3, knn_k=5)
    assert set(no_test) == {"linear_val_accuracy", "linear_weight_decay", "knn_val_accuracy"}


def test_raw_pixel_baseline_learns_easy_images() -> None:
    train, val, test = _halves_images(300, 1), _halves_images(100, 2), _halves_images(100, 3)
    out = raw_pixel_baseline(train, val, test, num_classes=2)
    assert set(out) == {
        "raw_pixel_linear_val_accuracy", "raw_pixel_linear_test_accuracy", "raw_pixel_linear_weight_decay",
    }
    assert out["raw_pixel_linear_val_accuracy"] > 0.95
    assert out["raw_pixel_linear_test_accuracy"] > 0.95


# --------------------------------------------------------------------------------------------------
# fine-tuning


def test_fine_tune_learns_and_leaves_caller_backbone_untouched() -> None:
    backbone = _tiny_convnet()
    backbone.train()
    before = {name: t.clone() for name, t in backbone.state_dict().items()}
    rng_before = torch.get_rng_state()
    train, val, test = _halves_images(256, 1), _halves_images(128, 2), _halves_images(128, 3)
    kwargs = {"num_classes": 2, "epochs": 3, "lr": 0.05, "batch_size": 32, "seed": 1}
    out = fine_tune(backbone, 128, train, val, test, **kwargs)
    assert set(out) == {"finetune_val_accuracy", "finetune_test_accuracy"}
    assert out["finetune_val_accuracy"] > 0.9 and out["finetune_test_accuracy"] > 0.9
    for name, tensor in backbone.state_dict().items():  # parameters and BN running statistics
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert backbone.training
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded in a forked RNG


def test_fine_tune_depends_on_seed_only() -> None:
    # Random val labels make the accuracy sensitive to every weight, unlike a saturated easy task.
    g = torch.Generator().manual_seed(0)
    val = TensorDataset(torch.randn(200, 1, 8, 8, generator=g), torch.randint(0, 2, (200,), generator=g))
    train = _halves_images(64, 1)

    def run(seed: int, global_seed: int) -> dict[str, float]:
        backbone = _tiny_convnet()  # identical initial weights every time (it seeds itself)
        torch.manual_seed(global_seed)
        return fine_tune(backbone, 128, train, val, None, num_classes=2, epochs=1, batch_size=16, seed=seed)

    first = run(seed=1, global_seed=0)
    assert run(seed=1, global_seed=12345) == first
    assert run(seed=2, global_seed=0) != first


# --------------------------------------------------------------------------------------------------
# validation errors


def _feats(n: int = 6, d: int = 3, num_classes: int = 3) -> Features:
    return _random_features(n, d, num_classes, seed=0)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, k=0), r"`k`.*>= 1.*got 0"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, temperature=0.0), r"`temperature`.*0\.0"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, temperature=-1.0), r"`temperature`.*-1\.0"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, temperature=math.nan), r"finite.*got nan"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, temperature=math.inf), r"finite.*got inf"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=3, chunk_size=0), r"`chunk_size`.*got 0"),
        (lambda: knn_accuracy(_feats(), _feats(), num_classes=1), r"`num_classes`.*>= 2.*got 1"),
        (lambda: linear_probe(_feats(), _feats(), num_classes=1), r"`num_classes`.*>= 2.*got 1"),
        (lambda: linear_probe(_feats(0), _feats(), num_classes=3), r"`train`.*empty.*N=0"),
        (lambda: knn_accuracy(_feats(), _feats(0), num_classes=3), r"`query`.*empty.*N=0"),
        (
            lambda: linear_probe(
                _feats(num_classes=2), Features(torch.randn(2, 3), torch.tensor([0, 2])), num_classes=2
            ),
            r"`val.y`.*\[0, num_classes=2\).*got label 2",
        ),
        (
            lambda: linear_probe(
                Features(torch.randn(3, 2), torch.tensor([0, -1, 1])), _feats(d=2), num_classes=3
            ),
            r"`train.y`.*got label -1",
        ),
        (lambda: linear_probe(_feats(d=3), _feats(d=4), num_classes=3), r"`val`.*D=3.*got D=4"),
        (lambda: linear_probe(_feats(), _feats(), num_classes=3, weight_decays=()), r"`weight_decays`.*\(\)"),
        (lambda: linear_probe(_feats(), _feats(), num_classes=3, weight_decays=(-1e-3,)), r"got -0\.001"),
        (lambda: linear_probe(_feats(), _feats(), num_classes=3, max_iter=0), r"`max_iter`.*got 0"),
        (lambda: linear_probe(_feats(), _feats(), num_classes=3, path_patience=0), r"`path_patience`.*got 0"),
        (
            lambda: linear_probe(Features(torch.full((3, 2), math.nan), torch.zeros(3, dtype=torch.long)),
                                 _feats(d=2), num_classes=3),
            r"`train.x`.*finite.*6 NaN",
        ),
        (lambda: Features(torch.randn(4, 2), torch.zeros(5, dtype=torch.long)), r"same number.*4 and 5"),
        (lambda: Features(torch.randn(4), torch.zeros(4, dtype=torch.long)), r"`Features.x`.*2-D.*\(4,\)"),
        (lambda: Features(torch.randn(4, 2), torch.zeros(4)), r"`Features.y`.*integer.*float32"),
        (lambda: extract_features(nn.Flatten(), _image_set(2), batch_size=0), r"`batch_size`.*got 0"),
        (
            lambda: evaluate_frozen(nn.Flatten(), _image_set(4), _image_set(4), None, num_classes=3, knn_k=0),
            r"`knn_k`.*got 0",
        ),
        (
            lambda: fine_tune(_tiny_convnet(), 128, _halves_images(4, 0), _halves_images(4, 1), None,
                              num_classes=2, lr=0.0),
            r"`lr`.*got 0\.0",
        ),
        (
            lambda: fine_tune(_tiny_convnet(), 128, _halves_images(4, 0), _halves_images(4, 1), None,
                              num_classes=2, epochs=0),
            r"`epochs`.*got 0",
        ),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()
