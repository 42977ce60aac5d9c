"""MoCo v2 (He et al., 2020; Chen et al., 2020): a momentum key encoder and a FIFO queue of negatives."""

from __future__ import annotations

import copy
import math
from collections import deque

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.diagnostics import pair_diagnostics
from trainers.losses import gather_no_grad, info_nce, world
from trainers.methods.base import ContrastiveMethod, StepOutput


def check_momentum(momentum: float) -> None:
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must satisfy 0 <= m <= 1, got {momentum!r}")


class MoCo(ContrastiveMethod):
    """Query encoder (backbone + MLP head) trained with InfoNCE against a queue of momentum-encoded keys.

    State that must survive a resume lives in persistent buffers: the queue ``(K, D)``, its pointer, the
    optimizer step at which each slot was written (``-1``: still the random initialisation) and the step
    counter. The key encoder follows ``v <- m * v + (1 - m) * theta`` after every optimizer step, so m = 0
    makes it a copy of the online encoder (queue keys then come from many different encoders) and m = 1
    freezes it.
    """

    name = "moco"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        momentum: float = 0.99,
        queue_length: int = 4096,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        staleness_sample_size: int = 256,
    ) -> None:
        super().__init__(
            backbone,
            feature_dim,
            temperature=temperature,
            projection_dim=projection_dim,
            hidden_dim=hidden_dim,
            head_batch_norm=False,  # MoCo v2's head: Linear-ReLU-Linear
        )
        check_momentum(momentum)
        if not (isinstance(queue_length, int) and queue_length >= 1):
            raise ValueError(f"queue_length must be an integer >= 1, got {queue_length!r}")
        self.momentum = float(momentum)
        self.symmetric = symmetric
        self.shuffle_bn = shuffle_bn
        self.staleness_sample_size = staleness_sample_size

        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.projection_head)
        for p in self.key_parameters():
            p.requires_grad_(False)

        self.register_buffer("queue", F.normalize(torch.randn(queue_length, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_step", torch.full((queue_length,), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # A few key-view images with the queue slots they were written to, for the staleness diagnostic.
        # Deliberately not state: losing it on resume only delays one epoch's diagnostic.
        self._tracked: deque[tuple[Tensor, Tensor, int]] = deque()

    @property
    def queue_length(self) -> int:
        return self.queue.shape[0]

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projection_head.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    # --- the three MoCo primitives -----------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``v <- m * v + (1 - m) * theta`` for every key-encoder parameter (m = 1 leaves it frozen)."""
        if self.momentum == 1.0:
            return
        keys, online = self.key_parameters(), [p.detach() for p in self.online_parameters()]
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, online, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, x: Tensor) -> Tensor:
        """Normalised keys from the momentum encoder; shuffle-BN across workers so BN cannot leak the batch."""
        if self.shuffle_bn and world()[1] > 1:
            x, unshuffle = _batch_shuffle(x)
            return _batch_unshuffle(F.normalize(self.key_head(self.key_backbone(x)), dim=1), unshuffle)
        return F.normalize(self.key_head(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: Tensor, images: Tensor | None = None) -> None:
        """Replace the oldest slots by the keys of every rank (rank-major, so every rank's queue is equal)."""
        all_keys = gather_no_grad(keys)
        count = all_keys.shape[0]
        if self.queue_length % count != 0:
            raise RuntimeError(
                f"queue_length ({self.queue_length}) must be a multiple of the keys enqueued per step ({count}: "
                "global batch x views per step); a partial last batch would silently truncate the queue"
            )
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + count] = all_keys.to(self.queue.dtype)
        self.queue_step[ptr : ptr + count] = self.step
        if images is not None:
            self._track(ptr + world()[0] * keys.shape[0], images)
        self.queue_ptr.fill_((ptr + count) % self.queue_length)

    # --- training ----------------------------------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        q1 = self.embed(view1)
        k2 = self.encode_keys(view2)
        negatives = self.queue.clone()  # this step's keys must never be this step's negatives
        loss = info_nce(q1, k2, negatives, temperature=self.temperature, unit_negatives=True)
        keys, key_images = [k2], [view2]
        if self.symmetric:
            q2 = self.embed(view2)
            k1 = self.encode_keys(view1)
            loss = 0.5 * (loss + info_nce(q2, k1, negatives, temperature=self.temperature, unit_negatives=True))
            keys.append(k1)
            key_images.append(view1)
        metrics = pair_diagnostics(q1, k2)
        if self.training:
            self.dequeue_and_enqueue(torch.cat(keys), torch.cat(key_images))
        return StepOutput(loss, metrics)

    def after_optimizer_step(self) -> None:
        self.momentum_update()
        self.step += 1

    # --- staleness diagnostics ---------------------------------------------------------------------------

    def _track(self, first_slot: int, images: Tensor) -> None:
        if self.staleness_sample_size <= 0:
            return
        # Sample evenly over a whole queue cycle: K / n steps fill the queue, take n_sample * n / K per step.
        per_step = max(1, math.ceil(self.staleness_sample_size * images.shape[0] / self.queue_length))
        per_step = min(per_step, images.shape[0])
        slots = torch.arange(first_slot, first_slot + per_step, device=self.queue.device)
        self._tracked.append((slots, images[:per_step].detach().clone(), int(self.step)))
        while sum(len(s) for s, _, _ in self._tracked) > self.staleness_sample_size:
            self._tracked.popleft()

    @torch.no_grad()
    def epoch_diagnostics(self) -> dict[str, float]:
        """Queue staleness: how old the stored keys are and how far the key encoder has moved since.

        - ``queue_fill``: fraction of slots holding real keys (the rest is the random initialisation);
        - ``queue_key_age``: mean age of stored keys in optimizer steps;
        - ``queue_key_consistency``: mean cosine between a sample of stored keys and the same key-view images
          re-encoded now by (a copy of) the key encoder. 1 means the queue is as good as fresh keys; a low value
          means old negatives come from a different encoder (what m close to 1 is meant to prevent).
        """
        filled = self.queue_step >= 0
        out = {"queue_fill": float(filled.float().mean())}
        if bool(filled.any()):
            out["queue_key_age"] = float((self.step - self.queue_step[filled]).float().mean())
        valid = [(s, x) for s, x, step in self._tracked if bool((self.queue_step[s] == step).all())]
        if sum(len(s) for s, _ in valid) >= 2:  # train-mode BN needs more than one sample
            slots = torch.cat([s for s, _ in valid])
            images = torch.cat([x for _, x in valid])
            # A copy, so the diagnostic does not move the key encoder's BN running statistics.
            key_encoder = copy.deepcopy(nn.Sequential(self.key_backbone, self.key_head)).train()
            fresh = F.normalize(key_encoder(images), dim=1)
            out["queue_key_consistency"] = float((fresh * self.queue[slots].float()).sum(dim=1).mean())
        return out


@torch.no_grad()
def _batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle the global batch across ranks (MoCo's shuffle-BN); returns this rank's slice and the inverse."""
    rank, world_size = world()
    x_all = gather_no_grad(x)
    permutation = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(permutation, src=0)
    unshuffle = torch.argsort(permutation)
    return x_all[permutation.view(world_size, -1)[rank]], unshuffle


@torch.no_grad()
def _batch_unshuffle(x: Tensor, unshuffle: Tensor) -> Tensor:
    rank, world_size = world()
    x_all = gather_no_grad(x)
    return x_all[unshuffle.view(world_size, -1)[rank]]
