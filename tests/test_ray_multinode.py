"""A real two-node Ray cluster on this machine (head + worker node on loopback): one Train worker per node."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray_cluster import two_nodes

from trainers.config import TrainConfig
from trainers.distributed import make_torch_trainer, run_worker

pytestmark = [
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                       reason="needs the Debian package dataset-fashion-mnist (scripts/setup.sh installs it)"),
    pytest.mark.timeout(300),
]
@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """The cluster of ``ray_cluster.two_nodes``; workers import this module's loop by name, so it is on their path."""
    with two_nodes(extra_env={"PYTHONPATH": str(Path(__file__).resolve().parent)}) as cluster:
        yield cluster


def _node_logging_loop(loop_config: dict[str, Any]) -> None:
    out = Path(loop_config["out"])

    def after_epoch(trainer: Any) -> None:
        entry = {"rank": trainer.rank, "node": ray.get_runtime_context().get_node_id()}
        with (out / f"rank{trainer.rank}.json").open("w") as f:
            json.dump(entry, f)

    run_worker(loop_config, after_epoch=after_epoch)


def drive(address: str, out: str) -> None:
    """The driver, run as its own process (as a user's script would be) with the cluster's environment."""
    ray.init(address=address)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    config = TrainConfig(method="moco", pretrain_subset=256, batch_size=64, queue_length=256, epochs=1,
                         val_size=300, probe_train_subset=300, test_subset=300, monitor_bank_size=0,
                         baselines=False, device="cpu")
    # Both nodes see `out`: here "shared storage" is one disk; a real cluster needs NFS or s3://.
    result = make_torch_trainer(config, workers=2, storage_path=out, name="two-nodes",
                                placement_strategy="STRICT_SPREAD", loop=_node_logging_loop,
                                loop_extras={"out": out}).fit()
    summary = {"alive_nodes": len(nodes), "metrics": {k: v for k, v in result.metrics.items()
                                                       if isinstance(v, (int, float))}}
    (Path(out) / "summary.json").write_text(json.dumps(summary))


def test_two_workers_on_two_nodes_finish(two_node_cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = two_node_cluster
    code = f"import test_ray_multinode as t; t.drive({address!r}, {str(tmp_path)!r})"
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["alive_nodes"] == 2
    assert summary["metrics"]["epochs_done"] == 1 and 0 < summary["metrics"]["linear_val_accuracy"] <= 1
    nodes = {json.loads((tmp_path / f"rank{r}.json").read_text())["node"] for r in (0, 1)}
    assert len(nodes) == 2  # one worker per node
