"""SimCLR (Chen et al., 2020): two views through one encoder, negatives from the whole global batch."""

from __future__ import annotations

from torch import Tensor, nn

from trainers.diagnostics import pair_diagnostics
from trainers.losses import gather_with_grad, nt_xent, world
from trainers.methods.base import ContrastiveMethod, StepOutput


class SimCLR(ContrastiveMethod):
    """Backbone + 2-layer MLP head (with BN) trained with NT-Xent over the global batch.

    With several data-parallel workers the embeddings of every rank are all-gathered *with gradient*, so each
    anchor has ``2 * global_batch - 2`` negatives and the step equals one process on the global batch.
    """

    name = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.5,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__(
            backbone,
            feature_dim,
            temperature=temperature,
            projection_dim=projection_dim,
            hidden_dim=hidden_dim,
            head_batch_norm=True,
        )

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        z1, z2 = self.embed(view1), self.embed(view2)
        rank, world_size = world()
        # One process: no candidates, so that the loss may take its one-process path (the fused kernel, or the
        # eager kernel's symmetric backward): the same values as candidates (z1, z2) at offset 0.
        candidates = None if world_size == 1 else (gather_with_grad(z1), gather_with_grad(z2))
        loss = nt_xent(z1, z2, temperature=self.temperature, candidates=candidates, offset=rank * z1.shape[0])
        return StepOutput(loss, pair_diagnostics(z1, z2))
