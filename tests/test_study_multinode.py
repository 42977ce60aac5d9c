"""Studies on a real two-node Ray cluster started on this machine (token auth on): trials on both nodes, a node
lost mid-trial, and storage that one node cannot see. The launcher runs as its own process, as a user's would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray_cluster import two_nodes

from study import results

pytestmark = [
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                       reason="needs the Debian package dataset-fashion-mnist"),
    pytest.mark.timeout(600),
]
# No baselines and no analysis report: they play no part in where trials run or in losing a node.
SMOKE = ["--space", "smoke", "--epochs", "3", "--pretrain-subset", "256", "--probe-train-subset", "300",
         "--val-size", "300", "--test-subset", "300", "--scheduler", "none", "--cpus-per-worker", "1",
         "--no-baselines", "--no-report"]


def _launch(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "study.launch", *flags], env=env, capture_output=True, text=True,
                          timeout=500)


def _second_node_raylet() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet" in cmdline.split(b"\0")[0] and b"node_b" in cmdline:
                return int(entry.name)
    return None


def test_trials_use_both_nodes_and_survive_losing_one(tmp_path: Path) -> None:
    with two_nodes() as (address, env):
        # Two training trials at a time, one CPU each: one runs on each node.
        spread = _launch(env, "--address", address, "--storage-path", str(tmp_path), "--name", "spread",
                         "--num-trials", "2", *SMOKE, "--epochs", "1")
        assert spread.returncode == 0, spread.stderr[-3000:]
        trials, _ = results.load(str(tmp_path / "spread"))
        assert list(trials["status"]) == ["completed", "completed"]
        assert trials["node_id"].nunique() == 2 and set(trials["nodes"]) == {2}

        # Two training trials, one per node; once both have a checkpoint, the second node dies (its raylet is
        # SIGKILLed, taking the node's workers with it). Tune retries the lost trial on the remaining node, from
        # its checkpoint on the shared folder.
        tune_dir = tmp_path / "lost-node" / "tune"
        killed: list[int] = []

        def kill_second_node() -> None:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                if len(list(tune_dir.glob("run_trial_*/checkpoint_000000"))) >= 2:
                    pid = _second_node_raylet()
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_second_node, daemon=True)
        killer.start()
        lost = _launch(env, "--address", address, "--storage-path", str(tmp_path), "--name", "lost-node",
                       "--num-trials", "2", "--max-failures", "2", *SMOKE)
        killer.join(timeout=5)
        assert killed, "the second node was never killed"
        assert lost.returncode == 0, lost.stderr[-3000:]
        trials, epochs = results.load(str(tmp_path / "lost-node"))
        assert list(trials["status"]) == ["completed", "completed"]
        assert trials["node_id"].nunique() == 1  # both finished on the head node: the lost trial moved there
        assert len(epochs) == 2 * 3 and not epochs.duplicated(["trial_id", "seed", "epoch"]).any()


def test_storage_that_a_node_cannot_see_is_refused(tmp_path: Path) -> None:
    storage_path = tmp_path / "studies"
    with two_nodes(blind_to=storage_path) as (address, env):
        refused = _launch(env, "--address", address, "--storage-path", str(storage_path), "--name", "blind",
                          "--trial-mode", "synthetic", "--num-trials", "2")
    assert refused.returncode == 2
    assert "is not visible from every node of the cluster" in refused.stderr
    assert " (node " in refused.stderr and "NFS, or a URI such as s3://" in refused.stderr
    assert not (storage_path / "blind" / "trials.parquet").exists()  # refused before any trial ran
