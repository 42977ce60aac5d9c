"""Ray Train (V2) end to end on real Ray workers and real Fashion-MNIST: learning, equivalence, fault recovery."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import torch.distributed as dist

from trainers.config import TrainConfig
from trainers.distributed import CHECKPOINT_FILE, build_worker_trainer, make_torch_trainer, run_worker
from trainers.methods import training_step

pytestmark = [
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                       reason="needs the Debian package dataset-fashion-mnist (scripts/setup.sh installs it)"),
    pytest.mark.timeout(300),
]

TINY = {
    "pretrain_subset": 512,
    "batch_size": 128,
    "val_size": 500,
    "probe_train_subset": 1000,
    "test_subset": 500,
    "monitor_bank_size": 300,
    "monitor_query_size": 100,
    "baselines": False,
    "epochs": 2,
    "lr": 0.5,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Workers import this module's loop functions by name, so they need the tests folder on their path.
    tests_folder = str(Path(__file__).resolve().parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_folder}})
    yield
    ray.shutdown()


def test_two_workers_train_and_report_probe_accuracies(local_ray: None, tmp_path: Path) -> None:
    config = TrainConfig(method="simclr", **TINY)
    result = make_torch_trainer(config, workers=2, storage_path=str(tmp_path), name="learn").fit()
    final = result.metrics
    assert final["is_final"] and final["epochs_done"] == 2
    assert 0.3 < final["linear_val_accuracy"] <= 1 and 0.3 < final["knn_test_accuracy"] <= 1
    history = _history(result)
    assert [epoch["epoch"] for epoch in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert {"knn_monitor_accuracy", "alignment", "uniformity", "images_per_second", "epoch_time_s"} <= set(history[0])


def _history(result: Any) -> list[dict[str, float]]:
    """The per-epoch metrics stored in the run's final checkpoint."""
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)["history"]


def _one_step_loop(loop_config: dict[str, Any]) -> None:
    """One optimizer step of the real distributed Trainer on a fixed global batch, split across the ranks; once per
    method of ``loop_config["methods"]``, each with a fresh Trainer (one worker group serves both methods)."""
    for method in loop_config["methods"]:
        trainer = build_worker_trainer(TrainConfig.from_dict(loop_config["train"] | {"method": method}))
        images = trainer.splits.pretrain.images[: trainer.config.batch_size].float() / 255
        view1, view2 = images, images.flip(-1)
        rank, size = trainer.rank, trainer.world_size
        local = slice(rank * trainer.local_batch, (rank + 1) * trainer.local_batch)
        before = {name: value.clone() for name, value in trainer.method.state_dict().items()}
        loss = training_step(trainer.model, view1[local], view2[local], trainer.optimizer).loss.detach()
        if size > 1:
            dist.all_reduce(loss)
            loss /= size
        state = {"loss": loss, "model": trainer.method.state_dict(), "before": before}
        torch.save(state, Path(loop_config["out"]) / f"{method}-workers{size}-rank{rank}.pt")
        ray.train.report({"loss": float(loss)})


METHODS = ("simclr", "moco")


def test_two_workers_step_equals_one_worker_on_the_double_batch(local_ray: None, tmp_path: Path) -> None:
    # Global BN (bn_mode="sync") so normalisation statistics span the global batch, as in one process. Both methods
    # in each worker group (a fresh Trainer each): two worker-group start-ups instead of four.
    config = TrainConfig(method="simclr", bn_mode="sync", queue_length=256, **(TINY | {"batch_size": 64}))
    for workers in (1, 2):
        make_torch_trainer(config, workers=workers, storage_path=str(tmp_path), name=f"step{workers}",
                           loop=_one_step_loop, loop_extras={"out": str(tmp_path), "methods": METHODS}).fit()
    for method in METHODS:
        _assert_two_workers_equal_one(tmp_path, method)


def _assert_two_workers_equal_one(folder: Path, method: str) -> None:
    single = torch.load(folder / f"{method}-workers1-rank0.pt", weights_only=True)
    ranks = [torch.load(folder / f"{method}-workers2-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        torch.testing.assert_close(state["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        for name, value in single["model"].items():
            if not value.is_floating_point():
                assert torch.equal(state["model"][name], value), (method, name)
                continue
            # Float tolerance relative to the step: this loss amplifies float32 rounding (~0.1% of a gradient,
            # measured against float64 here), while a wrong gather or per-worker BN changes the step by >10%.
            step = value - single["before"][name]
            difference = (state["model"][name] - value).abs().max()
            assert difference <= 0.01 * step.abs().max() + 1e-6, (method, name, float(difference),
                                                                   float(step.abs().max()))
    if method == "moco":
        assert torch.equal(ranks[0]["model"]["queue"], ranks[1]["model"]["queue"])
        assert int(ranks[0]["model"]["queue_ptr"]) == 64


def _crash_once_loop(loop_config: dict[str, Any]) -> None:
    marker = Path(loop_config["marker"])
    log = Path(loop_config["log"])

    def after_epoch(trainer: Any) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"rank": trainer.rank, "epoch": trainer.epoch, "pid": os.getpid()}) + "\n")
        if trainer.rank == 1 and trainer.epoch == 2 and not marker.exists():
            marker.touch()
            os._exit(1)  # a worker dies for real, mid-run, before epoch 2 is reported

    run_worker(loop_config, after_epoch=after_epoch)


def test_dead_worker_is_restarted_from_the_last_checkpoint(local_ray: None, tmp_path: Path) -> None:
    config = TrainConfig(method="moco", queue_length=256, **(TINY | {"epochs": 3, "probe": False}))
    extras = {"marker": str(tmp_path / "crashed"), "log": str(tmp_path / "epochs.jsonl")}
    result = make_torch_trainer(config, workers=2, storage_path=str(tmp_path), name="crash", max_failures=1,
                                loop=_crash_once_loop, loop_extras=extras).fit()
    assert (tmp_path / "crashed").exists()
    assert result.metrics["epochs_done"] == 3 and result.metrics["is_final"]
    rank1 = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    rank1 = [entry for entry in rank1 if entry["rank"] == 1]
    # Epoch 2 died before its report, so the new worker group resumed after epoch 1 and redid epoch 2 only.
    assert [entry["epoch"] for entry in rank1] == [1, 2, 2, 3]
    assert len({entry["pid"] for entry in rank1}) == 2
    assert [epoch["epoch"] for epoch in _history(result)] == [1, 2, 3]  # no epoch lost or counted twice


def _nan_on_rank1_loop(loop_config: dict[str, Any]) -> None:
    def after_epoch(trainer: Any) -> None:
        if trainer.rank == 1 and trainer.epoch == 1:
            with torch.no_grad():  # rank 1 alone: its next loss is NaN, rank 0's is still finite
                next(trainer.method.backbone.parameters()).fill_(float("nan"))

    run_worker(loop_config, after_epoch=after_epoch)


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(local_ray: None, tmp_path: Path) -> None:
    config = TrainConfig(method="simclr", **(TINY | {"epochs": 3, "probe": False}))
    result = make_torch_trainer(config, workers=2, storage_path=str(tmp_path), name="nan",
                                loop=_nan_on_rank1_loop).fit()  # a rank left waiting would hang until the timeout
    assert result.metrics["status"] == "diverged" and result.metrics["is_final"]
    assert "non-finite" in result.metrics["failure_reason"] and "epoch 2" in result.metrics["failure_reason"]
    assert result.metrics["epochs_done"] == 1


def _crash_before_epoch3_report_loop(loop_config: dict[str, Any]) -> None:
    log = Path(loop_config["log"])

    def after_epoch(trainer: Any) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"epoch": trainer.epoch, "loss": trainer.history[-1]["loss"]}) + "\n")
        if trainer.epoch == 3 and loop_config.get("crash"):
            os._exit(1)

    run_worker(loop_config, after_epoch=after_epoch)


def test_truncated_newest_checkpoint_resumes_from_the_one_before(local_ray: None, tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(method="simclr", **(TINY | {"epochs": 3, "probe": False}))
    log = tmp_path / "epochs.jsonl"

    def fit(crash: bool) -> Any:
        return make_torch_trainer(config, workers=1, storage_path=str(tmp_path), name="truncated",
                                  loop=_crash_before_epoch3_report_loop,
                                  loop_extras={"log": str(log), "crash": crash}).fit()

    with pytest.raises(ray.train.TrainingFailedError):
        fit(crash=True)  # epochs 1 and 2 reported with checkpoints, then the worker dies for real
    checkpoints = sorted(p for p in (tmp_path / "truncated").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    newest = checkpoints[-1] / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as if the write had been cut short

    result = fit(crash=False)
    assert result.metrics["epochs_done"] == 3 and result.metrics["status"] == "completed"
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    # First run: 1, 2, 3 (died before reporting 3). Resumed from epoch 1's checkpoint, not the truncated one: 2, 3.
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 2, 3]
    assert epochs[3]["loss"] == epochs[1]["loss"] and epochs[4]["loss"] == epochs[2]["loss"]  # the same epochs again
    assert f"skipped checkpoint {checkpoints[-1]}" in capfd.readouterr().err
