"""Representation diagnostics computed from a batch of paired embeddings (no gradient).

Alignment and uniformity follow Wang & Isola (2020), "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere", on L2-normalised embeddings f:

    alignment  = E_(x, y) positive pairs  ||f(x) - f(y)||^2          (lower: views agree)
    uniformity = log E_(x, x') all pairs   exp(-2 ||f(x) - f(x')||^2) (lower: more uniform on the sphere)

``embedding_std`` is the mean over dimensions of the per-dimension std of normalised embeddings: it tends to 0
when the representation collapses and is about 1/sqrt(D) for embeddings spread uniformly on the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def pair_diagnostics(z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """Diagnostics of ``(n, D)`` embeddings of two views of the same n images, as float32 scalars."""
    a, b = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
    n = a.shape[0]
    cosine = a @ b.T  # (n, n): diagonal = positive pairs, off-diagonal = negatives across views
    positive_cosine = cosine.diagonal().mean()
    negative_cosine = (cosine.sum() - cosine.diagonal().sum()) / max(n * (n - 1), 1)
    alignment = (a - b).pow(2).sum(dim=1).mean()
    both = torch.cat([a, b])
    uniformity = torch.pdist(both, p=2).pow(2).mul(-2).exp().mean().log()
    embedding_std = both.std(dim=0).mean()
    return {
        "positive_cosine": positive_cosine,
        "negative_cosine": negative_cosine,
        "alignment": alignment,
        "uniformity": uniformity,
        "embedding_std": embedding_std,
    }
