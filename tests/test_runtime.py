"""keep_freed_memory, measured in fresh processes: page faults of a repeated large allocation, and the opt-out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource
import torch
from trainers.runtime import keep_freed_memory, release_freed_memory
applied = keep_freed_memory()
def faults_per_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # a step: four 40 MiB tensors (above glibc's largest mmap threshold), used, then freed
        blocks = [torch.ones(40 * 2**20 // 4) for _ in range(4)]
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
for _ in range(3):  # the first steps fault their pages in whatever the setting (and the heap settles)
    faults_per_step()
faults = faults_per_step()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
kept = rss_mib()
release_freed_memory()
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults, "kept_mib": kept,
                  "released_mib": rss_mib()}))
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")


def _run(env_value: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "CONTRASTIVE_STUDY_MALLOC"}
    if env_value is not None:
        env["CONTRASTIVE_STUDY_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    tuned = _run(None)
    assert tuned["applied"] is True and tuned["again"] is True
    assert tuned["faults"] < 100  # the freed blocks are reused from the heap
    # ... and kept until released: a reused trial process gives them back before its next trial.
    assert tuned["kept_mib"] - tuned["released_mib"] > 150


def test_system_setting_leaves_glibc_alone_and_faults_every_time() -> None:
    system = _run("system")
    assert system["applied"] is False and system["again"] is False
    assert system["faults"] > 4 * 10_000  # 4 x 10,240 pages of 4 KiB mapped and zero-filled again every step
