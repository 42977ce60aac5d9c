"""What SimCLR and MoCo share: a backbone, a projection head, a forward that returns the loss, a step."""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trainers.losses import check_temperature


class StepOutput(NamedTuple):
    """What a method's forward returns: the loss to backpropagate and detached scalar metrics.

    A NamedTuple (not a dataclass) so DistributedDataParallel can walk the output like any tuple.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, *, batch_norm: bool) -> nn.Sequential:
    """The 2-layer MLP head of SimCLR (with BN, as in SimCLR v2/solo-learn) and MoCo v2 (without)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


class ContrastiveMethod(nn.Module, abc.ABC):
    """A backbone (the encoder that probes evaluate) followed by a projection head.

    ``forward(view1, view2)`` computes the training loss for one batch of two augmented views (so that
    DDP's gradient hooks see it); ``after_optimizer_step`` is called once after every optimizer step.
    """

    name: str = ""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        head_batch_norm: bool,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
        self.temperature = float(temperature)
        self.backbone = backbone
        self.projection_head = projection_head(
            feature_dim, hidden_dim or feature_dim, projection_dim, batch_norm=head_batch_norm
        )

    def embed(self, x: Tensor) -> Tensor:
        """Projection-head output ``z`` for images ``x`` (the space the loss lives in)."""
        return self.projection_head(self.backbone(x))

    @abc.abstractmethod
    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        """Loss and detached metrics for a batch of two augmented views of the same images."""

    def after_optimizer_step(self) -> None:
        """Hook run after each optimizer step (MoCo's momentum update); nothing to do by default."""

    def epoch_diagnostics(self) -> dict[str, float]:
        """Diagnostics that are too costly for every step (MoCo's queue staleness); none by default."""
        return {}


def unwrap(model: nn.Module) -> ContrastiveMethod:
    """The method inside a DDP (or any ``.module``) wrapper."""
    while not isinstance(model, ContrastiveMethod) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, ContrastiveMethod):
        raise TypeError(f"expected a ContrastiveMethod (possibly wrapped), got {type(model).__name__}")
    return model


def training_step(
    model: nn.Module,
    view1: Tensor,
    view2: Tensor,
    optimizer: torch.optim.Optimizer,
) -> StepOutput:
    """One optimisation step: forward (through the DDP wrapper, if any), backward, step, method hook."""
    optimizer.zero_grad(set_to_none=True)
    output: StepOutput = model(view1, view2)
    output.loss.backward()
    optimizer.step()
    unwrap(model).after_optimizer_step()
    return output
