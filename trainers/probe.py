"""Evaluation protocols for a self-supervised encoder: linear probe, weighted kNN, fine-tuning.

Frozen protocols (linear probe, kNN) run on features extracted once under ``torch.no_grad()`` (the
stop gradient): :func:`extract_features` returns a :class:`Features` that both probes reuse, so the
encoder runs once per split (the "cache"). Fine-tuning (:func:`fine_tune`) trains a deep copy of the
backbone plus a linear head end to end.

Model selection is on VALIDATION accuracy only. The linear probe picks its weight decay by validation
accuracy and reports the test accuracy of that single choice; test numbers are never used for any
choice (tuning probes on test inflates SSL results, cf. solo-learn).

Accuracies are fractions in [0, 1]. Invalid arguments raise ``ValueError`` naming the parameter, the
rule and the offending value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "Features",
    "LinearProbeResult",
    "evaluate_frozen",
    "extract_features",
    "fine_tune",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "raw_pixel_baseline",
]

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
_PROBE_DTYPE = torch.float32  # float64 reaches the same optimum to ~7 digits at twice the memory traffic
_STD_EPS = 1e-6  # standardisation clamp: constant train features become 0, never divide by ~0
_PROB_FLUSH = 1e-30  # softmax probabilities at or below this are zeroed before the gradient matmul


@dataclass(frozen=True)
class Features:
    """Extracted features and labels of one split.

    ``x``: float (N, D), normally float32 on CPU (as :func:`extract_features` returns it);
    ``y``: integer (N,) class labels. Only the shapes are checked here; value checks (non-empty,
    finite, labels in range) happen where ``num_classes`` is known.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise ValueError(f"`Features.x` must be 2-D (N, D), but got shape {tuple(self.x.shape)}.")
        if self.y.ndim != 1:
            raise ValueError(f"`Features.y` must be 1-D (N,), but got shape {tuple(self.y.shape)}.")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                "`Features.x` and `Features.y` must have the same number of rows N, "
                f"but got {self.x.shape[0]} and {self.y.shape[0]}."
            )
        if not self.x.is_floating_point():
            raise ValueError(f"`Features.x` must be a floating point tensor, but got dtype {self.x.dtype}.")
        if self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool:
            raise ValueError(f"`Features.y` must be an integer tensor, but got dtype {self.y.dtype}.")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.x.shape[1])


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe` for the weight decay chosen on validation accuracy."""

    val_accuracy: float
    test_accuracy: float | None
    weight_decay: float
    train_accuracy: float
    weight_decays_fitted: tuple[float, ...] = ()  # in the order fitted (strongest first); see path_patience


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, but got {value!r}.")


def _check_positive_finite(name: str, value: float) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be > 0 and finite, but got {value!r}.")


def _check_features(name: str, feats: Features, num_classes: int, dim: int | None = None) -> None:
    """Non-empty, finite, labels in [0, num_classes), and (optionally) feature dimension ``dim``."""
    if len(feats) == 0:
        raise ValueError(f"`{name}` must contain at least one example, but got empty features (N=0).")
    if dim is not None and feats.dim != dim:
        raise ValueError(f"`{name}` must have feature dimension D={dim} (as `train`), but got D={feats.dim}.")
    if not bool(torch.isfinite(feats.x).all()):
        bad = int((~torch.isfinite(feats.x)).sum())
        raise ValueError(f"`{name}.x` must be finite, but got {bad} NaN/inf values.")
    lo, hi = int(feats.y.min()), int(feats.y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"`{name}.y` labels must be in [0, num_classes={num_classes}), but got label {bad}."
        )


# --------------------------------------------------------------------------------------------------
# feature extraction


def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Features:
    """Run ``encoder`` (float (B, C, H, W) -> (B, D)) over ``dataset`` with a stop gradient.

    The encoder runs in eval mode (BatchNorm uses running stats, dropout is off) under
    ``torch.no_grad()``; afterwards every submodule gets back its own previous train/eval flag (so a
    deliberately frozen BatchNorm inside a training model stays frozen). The encoder is moved to
    ``device`` in place (``nn.Module.to`` semantics). ``dataset`` yields ``(image, int_label)``; it is
    read in order (no shuffling), without touching the global RNG.
    Returns ``Features(x float32 (N, D) CPU, y long (N,) CPU)``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    dev = torch.device(device)
    loader = DataLoader(  # own generator: iterating must not draw from (and shift) the global RNG
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(0),
    )
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.to(dev)
    encoder.eval()
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    try:
        with torch.no_grad():
            for images, labels in loader:
                out = encoder(images.to(dev, non_blocking=True))
                if out.ndim != 2:
                    raise ValueError(
                        f"`encoder` must map (B, C, H, W) to (B, D), but got output shape {tuple(out.shape)}."
                    )
                xs.append(out.detach().to("cpu", torch.float32))
                ys.append(torch.as_tensor(labels).to("cpu", torch.long).reshape(-1))
    finally:
        for module, mode in modes:
            module.training = mode
    if not xs:
        raise ValueError("`dataset` must contain at least one example, but got an empty dataset.")
    return Features(x=torch.cat(xs), y=torch.cat(ys))


# --------------------------------------------------------------------------------------------------
# linear probe


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).double().mean())


def _penalised_cross_entropy(
    z: Tensor, z_t: Tensor, y: Tensor, weight_t: Tensor, bias: Tensor, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and analytic gradients of ``mean_i CE(W z_i + b, y_i) + λ/2 ||W||²``, class-major.

    ``W`` is kept as ``weight_t`` (C, D) and the logits as ``Lᵀ = W zᵀ + b`` (C, N): with few classes, the
    softmax over the class axis then runs over contiguous rows of N values instead of N rows of C values (about
    20x faster on CPU for C = 10), and both matrix products have the long N axis contiguous. ``z`` (N, D) and its
    contiguous transpose ``z_t`` (D, N) are both kept, one for each product. With ``P = softmax(Lᵀ)`` and
    ``G = P - onehot(y)`` (C, N): ``∂L/∂W = G z / N + λ W`` (C, D), ``∂L/∂b = Σ_i G_i / N`` (C,).

    Written by hand instead of autograd: one pass, no graph, and probabilities <= 1e-30 are set to exactly 0
    before the matmul. Once the data is nearly separable most of P is tiny, and products of tiny P with features
    are subnormal floats, which make CPU matmuls tens of times slower; the gradient error this adds is
    < 1e-30 · max|z| per entry.
    """
    logits_t = torch.mm(weight_t, z_t).add_(bias[:, None])
    logp = logits_t.log_softmax(dim=0)
    targets = y.unsqueeze(0)
    loss = -logp.gather(0, targets).mean() + 0.5 * weight_decay * weight_t.square().sum()
    grad_logits = F.threshold(logp.exp_(), _PROB_FLUSH, 0.0)  # P, with P <= 1e-30 set to exactly 0
    grad_logits.scatter_add_(0, targets, torch.full_like(targets, -1, dtype=grad_logits.dtype))
    inv_n = 1.0 / z.shape[0]  # applied after the matmul: P / N itself would be subnormal again
    grad_weight = torch.addmm(weight_t, grad_logits, z, beta=weight_decay, alpha=inv_n)
    return loss, grad_weight, grad_logits.sum(dim=1).mul_(inv_n)


def linear_probe(
    train: Features,
    val: Features,
    test: Features | None = None,
    *,
    num_classes: int,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 200,
    path_patience: int | None = 2,
    device: str | torch.device = "cpu",
) -> LinearProbeResult:
    """Multinomial logistic regression on frozen features; weight decay chosen on VALIDATION accuracy.

    Features are standardised with train statistics only: ``z = (x - mean_train) / max(std_train, eps)``
    (val/test never leak into the statistics). For each weight decay ``λ`` the full-batch objective

        L(W, b) = mean_i CE(W z_i + b, y_i) + λ/2 · ||W||²      (W: (C, D), b: (C,) unpenalised)

    is minimised with L-BFGS (strong-Wolfe line search, at most ``max_iter`` iterations) in float32.
    This equals scikit-learn's ``LogisticRegression(C=1 / (λ N))``. The λ path is walked from the
    strongest to the weakest penalty, warm-starting each fit from the previous solution (cheaper, and
    the order is fixed whatever order ``weight_decays`` comes in). The λ with the best validation
    accuracy wins (ties go to the larger λ, the simpler model); only its test accuracy is reported.

    Early-stopped path: once ``path_patience`` consecutive weight decays have scored strictly below the best
    validation accuracy so far, the weaker ones are not fitted (validation accuracy along a path of weakening
    penalties rises to a peak and then falls as the probe overfits; ``None`` fits every λ). The fitted λ are
    listed in the result.
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("max_iter", max_iter, 1)
    if path_patience is not None:
        _check_int("path_patience", path_patience, 1)
    _check_features("train", train, num_classes)
    _check_features("val", val, num_classes, dim=train.dim)
    if test is not None:
        _check_features("test", test, num_classes, dim=train.dim)
    decays = [float(wd) for wd in weight_decays]
    if not decays:
        raise ValueError(f"`weight_decays` must be non-empty, but got {weight_decays!r}.")
    for wd in decays:
        if not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"`weight_decays` entries must be >= 0 and finite, but got {wd!r}.")

    dev = torch.device(device)
    x_train = train.x.to(dev, _PROBE_DTYPE)
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(_STD_EPS)

    def standardise(feats: Features) -> tuple[Tensor, Tensor]:
        return (feats.x.to(dev, _PROBE_DTYPE) - mean) / std, feats.y.to(dev, torch.long)

    z_train, y_train = standardise(train)
    z_train_t = z_train.T.contiguous()
    z_val, y_val = standardise(val)
    weight_t = torch.zeros(num_classes, train.dim, device=dev, dtype=_PROBE_DTYPE)
    bias = torch.zeros(num_classes, device=dev, dtype=_PROBE_DTYPE)

    best: tuple[float, float, Tensor, Tensor] | None = None  # (val_acc, wd, Wᵀ, b)
    fitted: list[float] = []
    worse_in_a_row = 0
    for wd in sorted(set(decays), reverse=True):
        optimizer = torch.optim.LBFGS(
            [weight_t, bias], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
        )

        def closure(wd: float = wd) -> Tensor:
            loss, weight_t.grad, bias.grad = _penalised_cross_entropy(z_train, z_train_t, y_train, weight_t, bias, wd)
            return loss

        optimizer.step(closure)
        fitted.append(wd)
        with torch.no_grad():
            val_acc = _accuracy(z_val @ weight_t.T + bias, y_val)
            if best is None or val_acc > best[0]:  # strict: ties keep the larger (earlier) wd
                best = (val_acc, wd, weight_t.detach().clone(), bias.detach().clone())
            worse_in_a_row = worse_in_a_row + 1 if val_acc < best[0] else 0
        if path_patience is not None and worse_in_a_row >= path_patience:
            break
    assert best is not None  # decays is non-empty
    val_acc, chosen_wd, w_best, b_best = best
    with torch.no_grad():
        train_acc = _accuracy(z_train @ w_best.T + b_best, y_train)
        test_acc = None
        if test is not None:
            z_test, y_test = standardise(test)
            test_acc = _accuracy(z_test @ w_best.T + b_best, y_test)
    return LinearProbeResult(
        val_accuracy=val_acc, test_accuracy=test_acc, weight_decay=chosen_wd, train_accuracy=train_acc,
        weight_decays_fitted=tuple(fitted),
    )


# --------------------------------------------------------------------------------------------------
# weighted kNN


def knn_predict(
    train: Features,
    query_x: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Weighted kNN predictions (InstDisc, Wu et al. 2018; the usual SSL kNN monitor), long (M,) on CPU.

    With L2-normalised features, ``s_ij = <q_i, t_j>`` is the cosine similarity. For each query the
    ``k' = min(k, N_train)`` most similar train points vote for their class with weight
    ``exp(s_ij / T)``; the prediction is ``argmax_c Σ_{j ∈ topk'(i), y_j = c} exp(s_ij / T)``
    (ties go to the lowest class index). The weights are computed as ``exp((s_ij - max_j s_ij) / T)``,
    a per-query constant factor that leaves the argmax unchanged but cannot overflow for small T.
    Queries are processed ``chunk_size`` at a time, so peak memory is one (chunk_size, N_train)
    similarity block rather than (M, N_train).
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("k", k, 1)
    _check_positive_finite("temperature", temperature)
    _check_int("chunk_size", chunk_size, 1)
    _check_features("train", train, num_classes)
    if query_x.ndim != 2 or query_x.shape[1] != train.dim:
        raise ValueError(
            f"`query_x` must have shape (M, D={train.dim}), but got shape {tuple(query_x.shape)}."
        )
    dev = torch.device(device)
    bank = F.normalize(train.x.to(dev, torch.float32), dim=1)
    bank_labels = train.y.to(dev, torch.long)
    k_eff = min(k, len(train))
    preds: list[Tensor] = []
    for start in range(0, query_x.shape[0], chunk_size):
        q = F.normalize(query_x[start : start + chunk_size].to(dev, torch.float32), dim=1)
        sims, idx = (q @ bank.T).topk(k_eff, dim=1)  # (B, k'), sorted descending
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=dev, dtype=torch.float32)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1).cpu())
    if not preds:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(preds)


def knn_accuracy(
    train: Features,
    query: Features,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> float:
    """Accuracy of :func:`knn_predict` on the labelled ``query`` split, a fraction in [0, 1]."""
    _check_int("num_classes", num_classes, 2)
    _check_features("query", query, num_classes, dim=train.dim)
    preds = knn_predict(
        train, query.x, num_classes=num_classes, k=k, temperature=temperature, chunk_size=chunk_size,
        device=device,
    )
    return float((preds == query.y.to(torch.long)).double().mean())


# --------------------------------------------------------------------------------------------------
# frozen-encoder evaluation


def _evaluate_encoder(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None,
    *,
    num_classes: int,
    knn: tuple[int, float] | None,
    weight_decays: Sequence[float],
    max_iter: int,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """One code path for :func:`evaluate_frozen` and :func:`raw_pixel_baseline` (``knn=(k, T)`` or None)."""
    if knn is not None:  # fail before the (possibly long) extraction
        _check_int("knn_k", knn[0], 1)
        _check_positive_finite("knn_temperature", knn[1])
    def extract(dataset: Dataset) -> Features:
        return extract_features(encoder, dataset, batch_size=batch_size, device=device)

    train, val = extract(train_set), extract(val_set)
    test = None if test_set is None else extract(test_set)
    probe = linear_probe(
        train, val, test, num_classes=num_classes, weight_decays=weight_decays, max_iter=max_iter,
        device=device,
    )
    out = {"linear_val_accuracy": probe.val_accuracy, "linear_weight_decay": probe.weight_decay}
    if probe.test_accuracy is not None:
        out["linear_test_accuracy"] = probe.test_accuracy
    if knn is not None:
        k, temperature = knn
        splits = {"val": val} if test is None else {"val": val, "test": test}
        for split, feats in splits.items():
            out[f"knn_{split}_accuracy"] = knn_accuracy(
                train, feats, num_classes=num_classes, k=k, temperature=temperature, device=device
            )
    return out


def evaluate_frozen(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None,
    *,
    num_classes: int,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 200,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Frozen-encoder protocol: features extracted once per split, reused by the linear probe and kNN.

    Returns ``linear_val_accuracy`` (the study objective), ``linear_weight_decay`` (chosen on val),
    ``knn_val_accuracy`` and, when ``test_set`` is given, ``linear_test_accuracy`` and
    ``knn_test_accuracy`` (reported only, never used for a choice).
    """
    return _evaluate_encoder(
        encoder, train_set, val_set, test_set, num_classes=num_classes, knn=(knn_k, knn_temperature),
        weight_decays=weight_decays, max_iter=max_iter, batch_size=batch_size, device=device,
    )


def raw_pixel_baseline(
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None,
    *,
    num_classes: int,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 200,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """The same linear probe on flattened input pixels (``nn.Flatten()`` as the encoder), no kNN.

    The floor any pretrained encoder must beat. Keys: ``raw_pixel_linear_val_accuracy``,
    ``raw_pixel_linear_weight_decay`` and, with a test set, ``raw_pixel_linear_test_accuracy``.
    """
    results = _evaluate_encoder(
        nn.Flatten(), train_set, val_set, test_set, num_classes=num_classes, knn=None,
        weight_decays=weight_decays, max_iter=max_iter, batch_size=batch_size, device=device,
    )
    return {f"raw_pixel_{key}": value for key, value in results.items()}


# --------------------------------------------------------------------------------------------------
# fine-tuning


def fine_tune(
    backbone: nn.Module,
    feature_dim: int,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None,
    *,
    num_classes: int,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 256,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, float]:
    """Fine-tuning protocol: train a deep copy of ``backbone`` plus a linear head end to end.

    Model: ``Linear(feature_dim, num_classes) ∘ copy(backbone)``; the caller's backbone (parameters
    and buffers) is never touched. Cross-entropy, SGD (momentum 0.9, ``weight_decay`` on all
    parameters), learning rate ``lr · (1 + cos(π t / T)) / 2`` per step t over ``T = epochs ·
    steps_per_epoch``. The last incomplete batch is dropped when the train set spans several batches
    (a batch of one would break BatchNorm). All randomness (head init, shuffling, dataset transforms
    with ``num_workers=0``) comes from ``seed`` inside a forked RNG, so the caller's global RNG state is
    left as it was. Returns ``finetune_val_accuracy`` and, with a test set, ``finetune_test_accuracy``.
    """
    _check_int("feature_dim", feature_dim, 1)
    _check_int("num_classes", num_classes, 2)
    _check_int("epochs", epochs, 1)
    _check_positive_finite("lr", lr)
    _check_int("batch_size", batch_size, 1)
    if isinstance(weight_decay, bool) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"`weight_decay` must be >= 0 and finite, but got {weight_decay!r}.")
    dev = torch.device(device)
    fork_kwargs: dict = {"devices": []} if dev.type == "cpu" else {"device_type": dev.type}
    with torch.random.fork_rng(**fork_kwargs):
        torch.manual_seed(seed)
        model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(feature_dim, num_classes)).to(dev)
        generator = torch.Generator().manual_seed(seed)
        drop_last = len(train_set) > batch_size  # type: ignore[arg-type]
        loader = DataLoader(
            train_set, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator,
            num_workers=num_workers, pin_memory=dev.type == "cuda",
        )
        if len(loader) == 0:
            raise ValueError("`train_set` must contain at least one example, but got an empty dataset.")
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
        model.train()
        for _ in range(epochs):
            for images, labels in loader:
                logits = model(images.to(dev, non_blocking=True))
                loss = F.cross_entropy(logits, torch.as_tensor(labels).to(dev, torch.long))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    # The "features" of the fine-tuned model are its logits: accuracy = mean(argmax == y).
    results: dict[str, float] = {}
    splits = {"val": val_set} if test_set is None else {"val": val_set, "test": test_set}
    for split, dataset in splits.items():
        logits = extract_features(model, dataset, batch_size=batch_size, device=dev, num_workers=num_workers)
        results[f"finetune_{split}_accuracy"] = _accuracy(logits.x, logits.y)
    return results
