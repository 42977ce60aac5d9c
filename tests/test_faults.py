"""Faults injected for real: a killed process, a truncated checkpoint, a full disk, a read-only folder.

Nothing here is mocked. Processes die with ``os._exit`` or SIGKILL; files are truncated on disk; a full disk is
the kernel's file-size limit (``RLIMIT_FSIZE``: writes beyond it fail with EFBIG, as they fail with ENOSPC on a
full disk) and a read-only folder is ``chmod 0o555`` enforced by the kernel, for root too: the child process
running as root first drops the capabilities that let root ignore permissions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from study import results, storage
from trainers.config import TrainConfig
from trainers.loop import (
    CHECKPOINT_KEYS,
    CheckpointError,
    Trainer,
    checkpoint_files,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from trainers.pretrain import CHECKPOINT, DAMAGED_CHECKPOINT, main

ROOT = Path(__file__).resolve().parents[1]
HAS_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()

# Small enough for a few seconds per run on a busy 2-core machine: 4 steps per epoch, no monitor, no probes.
TINY = {"method": "simclr", "pretrain_subset": 128, "batch_size": 32, "val_size": 100, "probe_train_subset": 100,
        "test_subset": 100, "monitor_bank_size": 0, "probe": False, "baselines": False, "epochs": 3,
        "device": "cpu"}

# Applies a fault to a fresh Python process, then replaces it with one running the test's code (argv[3]).
FAULT_PRELUDE = """
import ctypes, os, resource, signal, sys
fault, limit, code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if fault == "disk_full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error (EFBIG) instead of death, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
elif fault == "read_only" and os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: root's permission bypass
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone for good after the exec below
            sys.exit(77)
os.execv(sys.executable, [sys.executable, "-c", code, *sys.argv[4:]])
"""


def _run_python(code: str, *args: str, fault: str = "none", limit: int = 0,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", FAULT_PRELUDE, fault, str(limit), code, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode == 77:
        pytest.skip("cannot drop root's permission override here (no CAP_SETPCAP)")
    return result


@pytest.fixture
def one_thread() -> Iterator[None]:
    # One thread: on a shared 2-core machine two threads contend and an epoch takes 10x longer; the same thread
    # count everywhere also keeps float results bit-identical between the processes compared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(epoch: int, size: int = 10_000) -> dict:
    """A checkpoint with the keys of Trainer.state_dict; its tensor is filled with the epoch, to tell files apart."""
    return {key: {} for key in CHECKPOINT_KEYS} | {"epoch": epoch, "model": {"w": torch.full((size,), float(epoch))}}


def _cli_args(run_dir: Path) -> list[str]:
    args = ["--run-dir", str(run_dir), "--threads", "1"]
    for name, value in TINY.items():
        flag = "--" + name.replace("_", "-")
        args += [flag if value else "--no-" + name] if isinstance(value, bool) else [flag, str(value)]
    return args


# The child dies (no cleanup, no exception handlers) right after epoch 2's checkpoint is on disk.
DIE_AFTER_EPOCH_2 = """
import os, sys
from trainers import pretrain
save = pretrain.save_checkpoint
def save_then_die(state, path, **kwargs):
    save(state, path, **kwargs)
    if state["epoch"] == 2:
        os._exit(137)
pretrain.save_checkpoint = save_then_die
pretrain.main(sys.argv[1:])
"""


@pytest.mark.skipif(not HAS_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_truncated_newest_checkpoint_resumes_from_the_previous_one_exactly(
        tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    child = _run_python(DIE_AFTER_EPOCH_2, *_cli_args(run_dir))
    assert child.returncode == 137, child.stderr[-2000:]
    newest, previous = checkpoint_files(run_dir / CHECKPOINT)
    assert load_checkpoint(newest)["epoch"] == 2 and load_checkpoint(previous)["epoch"] == 1
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # e.g. a copy to another disk that was cut off

    assert main([*_cli_args(run_dir), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"skipped: {newest} is not a readable checkpoint" in captured.err
    assert f"resumed from {previous} after epoch 1" in captured.out
    damaged = run_dir / DAMAGED_CHECKPOINT  # set aside, so that rotation never moves it over a good checkpoint
    assert damaged.read_bytes() == data[: len(data) // 2]

    reference = Trainer(TrainConfig(**TINY))
    reference.fit()
    final = load_checkpoint(newest)
    assert final["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2
    for name, value in reference.method.state_dict().items():
        assert torch.equal(final["model"][name], value), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]  # epoch 2 was trained twice but is listed once
    assert [m["loss"] for m in lines] == [m["loss"] for m in reference.history]


def test_missing_or_damaged_checkpoints_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / CHECKPOINT
    assert load_latest_checkpoint(path) is None  # nothing to resume: a fresh run
    for epoch in (1, 2, 3):
        save_checkpoint(_state(epoch), path, keep_previous=True)
    newest, previous = checkpoint_files(path)
    assert load_checkpoint(newest)["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]

    newest.unlink()  # a crash between the two renames of a rotation
    state, source = load_latest_checkpoint(path)
    assert (state["epoch"], source) == (2, previous)
    assert f"skipped: {newest} is missing; resuming from the older checkpoint {previous}" in capsys.readouterr().err

    newest.write_bytes(b"")  # an empty file, as left by some crashes of non-atomic copies
    previous.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
        load_latest_checkpoint(path)
    assert str(newest) in str(error.value) and str(previous) in str(error.value)

    torch.save(torch.zeros(3), newest)  # a valid torch file that is not a run's checkpoint
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is not a checkpoint of a run \(missing"):
        load_latest_checkpoint(path)


# Writes checkpoints (epoch 1, 2, ...) as fast as it can and says when each is complete.
WRITE_FOREVER = """
import sys, torch
from pathlib import Path
from trainers.loop import save_checkpoint
path = Path(sys.argv[1])
for epoch in range(1, 10_000):
    print("writing", epoch, flush=True)
    save_checkpoint({"epoch": epoch, "model": {"w": torch.full((4_000_000,), float(epoch))}}, path,
                    keep_previous=True)
    print("done", epoch, flush=True)
"""


def test_sigkill_while_writing_checkpoints_leaves_a_complete_one(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT
    child = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    done = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("done"):
                done = int(line.split()[1])
            if line.startswith("writing") and int(line.split()[1]) == 4:
                time.sleep(0.05)  # into the write of epoch 4 (16 MB, fsynced)
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL and done == 3
    newest, previous = checkpoint_files(path)
    # Whatever the moment of death, the newest complete checkpoint is found, and its contents are all one epoch.
    for candidate in (newest, previous):
        if candidate.exists():
            state = load_checkpoint(candidate)
            assert torch.all(state["model"]["w"] == state["epoch"])
    found = torch.load(newest if newest.exists() else previous, weights_only=True)["epoch"]
    assert found >= done


# Tries each store once under the fault and reports what it raised.
WRITE_EACH_STORE = """
import json, sys, torch
from pathlib import Path
from study import results, storage
from trainers.loop import CHECKPOINT_KEYS, save_checkpoint
folder = Path(sys.argv[1])
rows = json.loads(sys.argv[2])
outcome = {}
attempts = {
    "checkpoint": lambda: save_checkpoint(
        {key: {} for key in CHECKPOINT_KEYS} | {"epoch": 3, "model": {"w": torch.full((10_000,), 3.0)}},
        folder / "checkpoint.pt", keep_previous=True),
    "results": lambda: results.record(str(folder), rows, []),
    "json": lambda: storage.write_json(str(folder / "study_config.json"), {"name": "s", "epochs": list(range(3000))}),
}
for name, attempt in attempts.items():
    try:
        attempt()
        outcome[name] = None
    except Exception as error:
        outcome[name] = [type(error).__name__, str(error)]
print(json.dumps(outcome))
"""


def _trial_row(trial_id: str) -> dict:
    config = TrainConfig(method="moco", batch_size=64, queue_length=256)
    return config.to_dict() | {"study_name": "s", "trial_id": trial_id, "status": "completed", "objective": 0.8}


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_failed_writes_name_the_file_keep_the_previous_one_and_work_once_fixed(tmp_path: Path, fault: str) -> None:
    folder = tmp_path / "study"
    path = folder / CHECKPOINT
    save_checkpoint(_state(1), path, keep_previous=True)
    save_checkpoint(_state(2), path, keep_previous=True)
    results.record(str(folder), [_trial_row("a")], [])
    storage.write_json(str(folder / "study_config.json"), {"name": "s", "epochs": 3})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    if fault == "read_only":
        folder.chmod(0o555)
    try:
        child = _run_python(WRITE_EACH_STORE, str(folder), json.dumps([_trial_row("b")]), fault=fault, limit=1024)
    finally:
        folder.chmod(0o755)
    assert child.returncode == 0, child.stderr[-2000:]
    outcome = json.loads(child.stdout)
    expected = {"checkpoint": ("CheckpointError", path), "results": ("ResultsError", folder / results.TRIALS_FILE),
                "json": ("StorageError", folder / "study_config.json")}
    for name, (error_type, target) in expected.items():
        assert outcome[name] is not None, f"{name}: the write succeeded despite the fault"
        assert outcome[name][0] == error_type and str(target) in outcome[name][1], outcome[name]
        assert "intact" in outcome[name][1]
    errno_text = "File too large" if fault == "disk_full" else "Permission denied"
    assert all(errno_text in message for _, message in outcome.values()), outcome
    # Nothing changed, nothing left behind.
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # The cause fixed (limit lifted, folder writable again), the same writes succeed.
    save_checkpoint(_state(3), path, keep_previous=True)
    results.record(str(folder), [_trial_row("b")], [])
    storage.write_json(str(folder / "study_config.json"), {"name": "s", "epochs": 4})
    assert [load_checkpoint(p)["epoch"] for p in checkpoint_files(path)] == [3, 2]
    assert sorted(results.load(str(folder))[0]["trial_id"]) == ["a", "b"]
    assert storage.read_json(str(folder / "study_config.json"))["epochs"] == 4
    assert not list(folder.glob("*.tmp"))
