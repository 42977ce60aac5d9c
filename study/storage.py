"""Small files of a study folder on a local path or a pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI."""
    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(location: str) -> Any:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(location: str, value: Any) -> None:
    """Write atomically: a temporary file, then a rename (a copy + delete on object stores)."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
    fs.move(f"{path}.tmp", path)
