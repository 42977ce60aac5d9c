"""Session-wide test settings."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Ray Train's controller polls its worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so a
# worker group that finished, failed or lost a process is noticed up to 2 s late, a few times per TorchTrainer run.
# The tests poll every 0.25 s: the same real processes, deaths and detection, about 5 s less per run on this machine.
# Set here, before any Ray process starts: local clusters, `ray start` nodes and launcher subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Token authentication, Ray's default for a new local cluster, made explicit for every process of the tests: a test
# process whose first cluster is one it joins (``shared_cluster``) must send the token too, and Ray reads the mode
# once per process.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[str]:
    """One real single-node cluster for the studies of a test module (``StudyConfig(address=shared_cluster)``):
    each study still runs its own Tune experiment, trial processes and worker groups on it, without the local
    cluster start-up and shutdown each would pay alone (~7 s here). A test of the module that runs ``ray stop``
    would stop this cluster too."""
    from ray_cluster import one_node

    with one_node() as (address, _):
        yield address


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown once pytest has printed its summary.

    Seen here: after a session that ran Ray in-process (ray.init / ray.shutdown) next to torch, the interpreter
    sometimes crashed with SIGSEGV while tearing down native threads at exit, turning a green run (234 passed)
    into exit code 139. Nothing of the tests runs at that point; pytest's own exit status is kept.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
