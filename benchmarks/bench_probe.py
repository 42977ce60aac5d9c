"""Probes: our linear probe vs scikit-learn's LogisticRegression on the same features; kNN at full scale.

Features: real Fashion-MNIST images (the Debian package files) through a fixed random ReLU feature map,
``relu(x W / sqrt(784))`` with W Gaussian (784 x D, seed 0), D = 512 by default: real class structure, the width
of a ResNet-18, and no minutes of CNN feature extraction before the timing starts.

* Linear probe, interleaved rounds (ours, sklearn, ours, ...): both fit multinomial logistic regression for each
  weight decay of the same path and keep the one with the best validation accuracy; ours is
  :func:`trainers.probe.linear_probe` with its defaults (L-BFGS in torch on class-major logits, warm-started
  path that stops after two weight decays in a row score below the best; the fitted ones are printed), and again
  with ``path_patience=None`` (every weight decay, as sklearn: the speed of the kernels alone); sklearn's is
  ``LogisticRegression(C=1 / (wd N), solver="lbfgs", max_iter=200)`` on the same standardised features (the same
  objective: mean cross-entropy + wd/2 ||W||^2, bias unpenalised). Reported: time ratio and both accuracies.
* kNN: :func:`trainers.probe.knn_predict` (cosine, k=200, temperature 0.1) with the whole training split as the
  bank (60,000 x D) and the test split as queries; seconds and accuracy (a lone absolute time, printed for the
  "in seconds" claim only, next to the load average).

Run (about 3 minutes on 2 cores; ``--quick``: smaller probe sets, about 1 minute):

    .venv/bin/python benchmarks/bench_probe.py
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import _common
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from trainers.data import load_splits
from trainers.probe import DEFAULT_WEIGHT_DECAYS, Features, knn_predict, linear_probe


def random_features(images: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    flat = images.reshape(len(images), -1).float() / 255.0
    return torch.relu(flat @ projection)


def sklearn_probe(train: Features, val: Features, test: Features) -> tuple[float, float]:
    """Validation-chosen weight decay, then its test accuracy; same standardisation as ours."""
    mean, std = train.x.mean(0), train.x.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_val, x_test = ((f.x - mean) / std for f in (train, val, test))
    best = (-1.0, math.nan)
    for wd in sorted(DEFAULT_WEIGHT_DECAYS, reverse=True):
        c = 1.0 / (wd * len(train)) if wd > 0 else 1e12  # wd 0: practically unpenalised
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=200)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # same iteration cap as ours, on purpose
            model.fit(x_train.numpy(), train.y.numpy())
        val_acc = float((model.predict(x_val.numpy()) == val.y.numpy()).mean())
        if val_acc > best[0]:
            best = (val_acc, float((model.predict(x_test.numpy()) == test.y.numpy()).mean()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--probe-train", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.probe_train, args.rounds = 3000, 2

    splits = load_splits("fashion_mnist", val_size=5000, split_seed=0)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(28 * 28, args.dim, generator=generator) / math.sqrt(28 * 28)
    features = {}
    for split in ("train", "val", "test"):
        dataset = getattr(splits, split)  # TensorImageDataset: uint8 images (N, 1, 28, 28) in memory
        features[split] = Features(random_features(dataset.images, projection), dataset.labels)
    full_train = features["train"]
    train = Features(full_train.x[: args.probe_train], full_train.y[: args.probe_train])
    val, test = features["val"], features["test"]

    outcome: dict[str, tuple[float, float]] = {}
    outcome_fitted: dict[str, tuple[float, ...]] = {}

    def ours() -> None:
        result = linear_probe(train, val, test, num_classes=10)
        outcome["ours"] = (result.val_accuracy, result.test_accuracy)
        outcome_fitted["ours"] = result.weight_decays_fitted

    def ours_full_path() -> None:
        result = linear_probe(train, val, test, num_classes=10, path_patience=None)
        outcome["ours, every weight decay"] = (result.val_accuracy, result.test_accuracy)

    def sklearn() -> None:
        outcome["sklearn"] = sklearn_probe(train, val, test)

    contenders = {"ours": ours, "ours, every weight decay": ours_full_path, "sklearn": sklearn}
    samples = _common.interleaved(contenders, rounds=args.rounds, warmup_rounds=0)

    start = time.perf_counter()
    predictions = knn_predict(full_train, test.x, num_classes=10, k=200, temperature=0.1)
    knn_seconds = time.perf_counter() - start
    knn_accuracy = float((predictions == test.y).float().mean())

    print(f"\n{_common.machine_note()}")
    print(f"features: Fashion-MNIST through a random ReLU map to {args.dim} dims; probe train {len(train)}, "
          f"val {len(val)}, test {len(test)}; weight decays {DEFAULT_WEIGHT_DECAYS}; {args.rounds} interleaved "
          "rounds\n")
    rows = []
    for name in contenders:
        val_acc, test_acc = outcome[name]
        rows.append([name, f"{_common.median(samples[name]):.1f} s", _common.spread(samples[name]),
                     f"{val_acc:.4f}", f"{test_acc:.4f}"])
    print(_common.markdown_table(["linear probe", "median time", "spread", "val accuracy", "test accuracy"], rows))
    path = tuple(sorted(DEFAULT_WEIGHT_DECAYS, reverse=True))
    print(f"\nours fitted weight decays {outcome_fitted['ours']} of {path}; 'every weight decay' fits them all")
    for name in ("ours", "ours, every weight decay"):
        ratio = _common.median(samples["sklearn"]) / _common.median(samples[name])
        gap = abs(outcome[name][1] - outcome["sklearn"][1]) * 100
        print(f"{name}: {ratio:.1f}x faster than scikit-learn; test accuracies differ by {gap:.2f} points")
    print(f"kNN: bank {len(full_train)} x {args.dim}, {len(test)} queries, k=200: {knn_seconds:.1f} s, "
          f"test accuracy {knn_accuracy:.4f}")


if __name__ == "__main__":
    main()
