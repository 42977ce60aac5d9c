"""Batch normalisation whose batch statistics span every data-parallel worker.

``torch.nn.SyncBatchNorm`` only runs on GPUs. This module does the same on any device and backend (gloo on CPU
included): per-channel sums, sums of squares and counts are all-reduced *with gradient*, so a step on W workers
x B images normalises, and back-propagates, exactly like one worker on W*B images. SimCLR uses global BN; for
MoCo it is the alternative to shuffle-BN (``bn_mode="sync"``).
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from trainers.losses import world


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``BatchNorm1d/2d/3d``: identical when not distributed or in eval mode."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        channels = x.shape[1]
        reduce_dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(reduce_dims), xf.pow(2).sum(reduce_dims), count])
        stats = dist_nn.all_reduce(stats)  # sum over ranks; its backward sums the gradients too
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean.pow(2)).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (recursively) by a :class:`GlobalBatchNorm` with its state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        # Keep frozen parameters frozen (MoCo's key encoder): DDP would otherwise wait for their gradients.
        for new, old in zip(converted.parameters(), module.parameters()):
            new.requires_grad_(old.requires_grad)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_batchnorm(child))
    return module
