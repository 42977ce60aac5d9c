"""A real two-node Ray cluster on this machine (head + second node on loopback, token auth on), for the tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a new cluster and its drivers: token authentication with a fresh token."""
    return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)} | (extra_env or {})


@contextmanager
def one_node(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node cluster (``ray start --head``, token auth on) that the studies of a test module join with
    ``address=``, instead of each starting and stopping its own local cluster; yields its address and the
    environment a driver needs. Its token is the user's default one (``~/.ray/auth_token``, as for the launcher's
    local clusters), not a fresh one: a process keeps the first token it loaded, and the test process has
    usually started local clusters before."""
    port = _free_port()
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    head = [RAY, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus),
            "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@contextmanager
def two_nodes(blind_to: Path | None = None, *, extra_env: dict[str, str] | None = None
              ) -> Iterator[tuple[str, dict[str, str]]]:
    """A head and a second node with one CPU each (custom resources ``node_a`` / ``node_b``); yields the head's
    address and the environment a driver needs (the cluster's fresh token, ``extra_env``). With ``blind_to``, the
    second node runs in its own mount namespace where an empty tmpfs hides that folder (as a node without the
    shared disk would be)."""
    port = _free_port()
    env = _cluster_env(extra_env)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
            "--resources", '{"node_a": 1}', *common]
    second = [RAY, "start", "--address", f"127.0.0.1:{port}", "--resources", '{"node_b": 1}',
              "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
              *common]
    if blind_to is not None:
        blind_to.mkdir(parents=True, exist_ok=True)
        shell = f"mount -t tmpfs none {blind_to} && exec {' '.join(a if a[0] != '{' else repr(a) for a in second)}"
        second = ["unshare", "--mount", "sh", "-c", shell]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(second, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
