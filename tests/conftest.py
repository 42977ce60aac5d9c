"""Session-wide test settings."""

from __future__ import annotations

import os
import sys

import pytest

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
