"""Security: no code execution from data files, nothing written outside the study folder, a local dashboard.

The static check reads the product source (study/, trainers/, search_spaces/) with ``ast``; the others feed real
malicious files to the real loaders and check that the payload did not run (its marker file does not exist).
"""

from __future__ import annotations

import ast
import pickle
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search_spaces import SpaceError, load_space
from study.config import StudyConfig, read_config_file
from trainers.config import TrainConfig
from trainers.loop import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint
from trainers.pretrain import default_run_dir

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("study", "trainers", "search_spaces")

# module.attribute calls that turn bytes into code or objects (pickle, marshal, unsafe YAML) or run a shell
FORBIDDEN_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"), ("yaml", "load"),
    ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"), ("yaml", "unsafe_load_all"),
    ("os", "system"), ("os", "popen"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
}
FORBIDDEN_NAMES = {"eval", "exec"}
FORBIDDEN_ATTRIBUTES = {("yaml", "Loader"), ("yaml", "UnsafeLoader"), ("yaml", "FullLoader")}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def violations(source: str, filename: str) -> list[str]:
    """Unsafe deserialisation or code execution in ``source``, one line per finding."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            target = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_NAMES:
                found.append(f"{where}: {node.func.id}()")
            elif target in FORBIDDEN_CALLS:
                found.append(f"{where}: {'.'.join(target)}()")
            elif target == ("torch", "load") and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif target is not None and target[1] == "load" and _keyword_is(node, "allow_pickle", True):
                found.append(f"{where}: {'.'.join(target)}(allow_pickle=True)")
            elif any(k.arg == "shell" and not _keyword_is(node, "shell", False) for k in node.keywords):
                found.append(f"{where}: a call with shell=True")
        elif isinstance(node, ast.Attribute) and _dotted(node) in FORBIDDEN_ATTRIBUTES:
            found.append(f"{where}: {'.'.join(_dotted(node) or ())}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "marshal", "yaml", "torch"):
            names = {alias.name for alias in node.names}
            risky = names & {"load", "loads", "unsafe_load", "full_load", "Loader", "UnsafeLoader", "FullLoader"}
            if risky:
                found.append(f"{where}: from {node.module} import {sorted(risky)}")
        elif isinstance(node, ast.Constant) and node.value == "0.0.0.0":  # binding to every interface
            found.append(f"{where}: the literal '0.0.0.0'")
    return found


def test_the_static_check_finds_what_it_looks_for() -> None:
    planted = """
import pickle, yaml, torch, os, subprocess, numpy as np
eval("1")
exec("x = 1")
pickle.loads(b"")
yaml.load("a", Loader=yaml.Loader)
yaml.unsafe_load("a")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
subprocess.run("ls", shell=True)
os.system("ls")
from pickle import loads
host = "0.0.0.0"
"""
    found = violations(planted, "planted.py")
    assert len(found) == 13, found
    safe = 'import yaml, torch\nyaml.safe_load("a")\ntorch.load("x.pt", map_location="cpu", weights_only=True)\n'
    assert violations(safe, "safe.py") == []


def test_product_source_has_no_code_execution_or_unsafe_deserialisation() -> None:
    files = sorted(path for package in PRODUCT for path in (ROOT / package).rglob("*.py"))
    assert len(files) >= 15  # the walk found the source
    found = [line for path in files for line in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


class WritesAFile:
    """A pickled object whose unpickling calls ``open(marker, "w")``: the file exists if the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def _checkpoint(epoch: int) -> dict:
    return {key: {} for key in CHECKPOINT_KEYS} | {"epoch": epoch}


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    # The payload is real: plain unpickling runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(WritesAFile(proof))).close()  # noqa: S301 - shows the payload works
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_checkpoint(1), path, keep_previous=True)
    save_checkpoint(_checkpoint(2), path, keep_previous=True)
    torch.save(_checkpoint(2) | {"model": {"w": WritesAFile(marker)}}, path)  # someone swapped the newest file
    refused = r"checkpoint\.pt is not a readable checkpoint \(UnpicklingError: Unsupported global: GLOBAL io\.open"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(path)
    state, source = load_latest_checkpoint(path)  # resuming skips it for the previous, trusted one
    assert state["epoch"] == 1 and source.name == "checkpoint.prev.pt"
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"name: {payload}\nepochs: 2\n")
    with pytest.raises(ValueError, match=r"is not valid YAML: could not determine a constructor for the tag"):
        read_config_file(str(study_file))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(f"name: x\nparams:\n  temperature: {{choice: [{payload}]}}\n")
    with pytest.raises(SpaceError, match="could not determine a constructor"):
        load_space(str(space_file))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "..", ".", "a/../../b", "/etc", "a/b", "..\\escape", "x\\y", "",
                                  ".hidden", "a\x00b", "line\nbreak", "x" * 256])
def test_a_study_name_cannot_leave_the_storage_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name must be a plain folder name"):
        StudyConfig(name=name, storage_path=str(tmp_path))


def test_the_study_folder_is_one_level_below_the_storage_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_path must be a folder or URI"):
        StudyConfig(storage_path="")  # would be "/<name>", at the filesystem root
    for storage in (str(tmp_path), f"{tmp_path}/", "studies", "s3://bucket/prefix"):
        study = StudyConfig(name="s..t", storage_path=storage)  # dots inside a name are fine
        assert posixpath.dirname(posixpath.normpath(study.study_dir)) == posixpath.normpath(storage)


def test_a_run_folder_depends_on_no_path_from_the_config() -> None:
    config = TrainConfig(dataset="imagefolder", data_root="../../../etc")
    assert default_run_dir(config).parent == Path("runs")
    assert ".." not in default_run_dir(config).parts
    with pytest.raises(SpaceError, match="space must be one of"):
        load_space("../../../etc/passwd")  # a name without suffix is only ever a shipped space


# ray.init replaced by an exit: if the launcher got as far as starting Ray, the test sees exit status 99.
LAUNCH_WITHOUT_RAY = """
import sys, ray
ray.init = lambda *args, **kwargs: sys.exit(99)
from study.launch import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_dashboard_is_local_unless_exposure_is_confirmed(tmp_path: Path) -> None:
    assert StudyConfig().dashboard_host == "127.0.0.1"
    result = subprocess.run([sys.executable, "-c", LAUNCH_WITHOUT_RAY, "--dashboard-host", "0.0.0.0",
                             "--storage-path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "exposes the Ray dashboard" in result.stderr and "--expose-dashboard" in result.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written
