"""Security defaults of the clusters the launcher starts, checked on a real local cluster in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

# Starts Ray the way the launcher does, then reports what is listening where and how the dashboard answers.
PROBE = r"""
import json, sys, urllib.error, urllib.request
import ray
from study.config import StudyConfig
from study.launch import start_ray

start_ray(StudyConfig(storage_path=sys.argv[1]), expose_dashboard=False)
context = ray._private.worker.global_worker.node
dashboard = context.address_info["webui_url"]
try:
    status = urllib.request.urlopen(f"http://{dashboard}/api/version", timeout=10).status
except urllib.error.HTTPError as error:
    status = error.code
host, port = dashboard.rsplit(":", 1)
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            address, port_hex = local.rsplit(":", 1)
            listening.append([address, int(port_hex, 16)])
print(json.dumps({"dashboard": dashboard, "status": status, "listening": listening, "port": int(port)}))
ray.shutdown()
"""


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | env
    return subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], env=environment, capture_output=True,
                          text=True, timeout=240)


def test_local_cluster_has_a_loopback_dashboard_and_token_auth(tmp_path: Path) -> None:
    probe = _probe(tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["dashboard"].startswith("127.0.0.1:")
    assert found["status"] == 401  # token authentication is on: no token, no dashboard (nor its job API)
    # The dashboard's socket listens on loopback only (0100007F is 127.0.0.1 in /proc/net/tcp's byte order).
    dashboard_sockets = [address for address, port in found["listening"] if port == found["port"]]
    assert dashboard_sockets == ["0100007F"]


def test_an_unauthenticated_local_cluster_is_refused(tmp_path: Path) -> None:
    probe = _probe(tmp_path, RAY_AUTH_MODE="disabled")
    assert probe.returncode != 0
    assert "RAY_AUTH_MODE='disabled'" in probe.stderr and "token authentication" in probe.stderr
    assert "Started a local Ray instance" not in probe.stderr
