"""Real 2-process gloo runs: 2 ranks x batch B must equal 1 rank x batch 2B (loss, gradients, MoCo queue).

The negative control shows the test can fail: gathering negatives *without* gradient (lightly #1528) gives
different gradients from the single-process run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainers.losses import gather_no_grad, gather_with_grad, nt_xent, world
from trainers.methods import MoCo, training_step

WORLD = 2
B = 6  # per-rank batch


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(WORLD * B, 10, generator=g), torch.randn(WORLD * B, 10, generator=g)


def _projector() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))


def _simclr_loss(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, gather: str) -> torch.Tensor:
    z1, z2 = model(x1), model(x2)
    rank, _ = world()
    if gather == "with_grad":
        candidates = (gather_with_grad(z1), gather_with_grad(z2))
    else:  # the bug: other ranks' embeddings enter as constants
        candidates = (gather_no_grad(z1), gather_no_grad(z2))
        candidates[0][rank * B : (rank + 1) * B] = z1
        candidates[1][rank * B : (rank + 1) * B] = z2
    return nt_xent(z1, z2, temperature=0.2, candidates=candidates, offset=rank * B)


def _simclr_worker(rank: int, store: str, out_dir: str, gather: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_projector())
        x1, x2 = _inputs()
        local = slice(rank * B, (rank + 1) * B)
        loss = _simclr_loss(model, x1[local], x2[local], gather)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        torch.save({"loss": mean_loss, "grads": [p.grad for p in model.parameters()]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _moco(queue_length: int) -> MoCo:
    torch.manual_seed(11)
    backbone = nn.Sequential(nn.Linear(10, 12), nn.ReLU())  # no BN: keys do not depend on the batch split
    return MoCo(backbone, 12, queue_length=queue_length, momentum=0.9, temperature=0.2, shuffle_bn=True)


def _moco_step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return training_step(model, x1, x2, optimizer).loss.detach()


def _moco_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        method = _moco(queue_length=4 * WORLD * B)
        model = DistributedDataParallel(method, broadcast_buffers=False)
        x1, x2 = _inputs()
        local = slice(rank * B, (rank + 1) * B)
        loss = _moco_step(model, x1[local], x2[local])
        dist.all_reduce(loss)
        torch.save({"loss": loss / WORLD, "state": method.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path: Path, *args: str) -> list[dict]:
    mp.spawn(fn, args=(str(tmp_path / "store"), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process_simclr() -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = _projector()
    x1, x2 = _inputs()
    loss = nt_xent(model(x1), model(x2), temperature=0.2)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.timeout(180)
def test_simclr_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path) -> None:
    ranks = _spawn(_simclr_worker, tmp_path, "with_grad")
    loss, grads = _single_process_simclr()
    for result in ranks:
        torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
        for ours, reference in zip(result["grads"], grads):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(180)
def test_gather_without_gradient_gives_wrong_gradients(tmp_path: Path) -> None:
    ranks = _spawn(_simclr_worker, tmp_path, "no_grad")
    loss, grads = _single_process_simclr()
    torch.testing.assert_close(ranks[0]["loss"], loss, rtol=1e-5, atol=1e-6)  # forward is still right...
    worst = max(float((ours - ref).abs().max()) for ours, ref in zip(ranks[0]["grads"], grads))
    assert worst > 1e-3  # ...but the gradients are not


@pytest.mark.timeout(180)
def test_moco_queue_is_global_and_identical_on_every_rank(tmp_path: Path) -> None:
    ranks = _spawn(_moco_worker, tmp_path)
    single = _moco(queue_length=4 * WORLD * B)
    x1, x2 = _inputs()
    loss = _moco_step(single, x1, x2)
    expected = single.state_dict()
    for result in ranks:
        torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
        state = result["state"]
        assert int(state["queue_ptr"]) == WORLD * B
        torch.testing.assert_close(state["queue"], expected["queue"], rtol=1e-5, atol=1e-6)
        for name, value in expected.items():  # online and momentum encoders after the step, too
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(ranks[0]["state"]["queue"], ranks[1]["state"]["queue"], rtol=0, atol=0)


def _bn_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _bn_inputs() -> torch.Tensor:
    return torch.randn(WORLD * B, 2, 6, 6, generator=torch.Generator().manual_seed(5))


def _global_bn_worker(rank: int, store: str, out_dir: str) -> None:
    from trainers.global_bn import convert_to_global_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(convert_to_global_batchnorm(_bn_model()), broadcast_buffers=False)
        x = _bn_inputs()[rank * B : (rank + 1) * B]
        out = model(x)
        out.pow(2).mean().backward()
        torch.save({"out": out.detach(), "grads": [p.grad for p in model.parameters()],
                    "running": [model.module[1].running_mean, model.module[1].running_var]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    ranks = _spawn(_global_bn_worker, tmp_path)
    model = _bn_model()
    out = model(_bn_inputs())
    out.pow(2).mean().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-4, atol=1e-5)
    for result in ranks:
        for ours, reference in zip(result["grads"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["running"][0], model[1].running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["running"][1], model[1].running_var, rtol=1e-4, atol=1e-6)


def test_conversion_keeps_frozen_parameters_frozen() -> None:
    """MoCo's key encoder stays frozen: a trainable copy would make DDP wait for gradients that never come."""
    from trainers.global_bn import GlobalBatchNorm, convert_to_global_batchnorm

    model = _moco(queue_length=4)
    model.backbone = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12))
    model.key_backbone = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12)).requires_grad_(False)
    model = convert_to_global_batchnorm(model)
    assert isinstance(model.backbone[1], GlobalBatchNorm) and isinstance(model.key_backbone[1], GlobalBatchNorm)
    assert model.backbone[1].weight.requires_grad and not model.key_backbone[1].weight.requires_grad
