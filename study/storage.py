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


class StorageError(OSError):
    """A study file could not be written; the message names it. The previous version of the file is intact."""


def write_json(location: str, value: Any) -> None:
    """Write atomically: a temporary file, then a rename (a copy + delete on object stores).

    A failed write (disk full, read-only folder) raises StorageError naming ``location``; the previous file is
    intact and the temporary file is removed.
    """
    fs, path = filesystem(location)
    temporary = f"{path}.tmp"
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(temporary) as f:
            f.write(data)
        fs.move(temporary, path)
    except OSError as error:
        try:
            if fs.get_file_info(temporary).type != pafs.FileType.NotFound:
                fs.delete_file(temporary)
        except OSError:
            pass  # cleaning up must not hide the error that made it necessary
        raise StorageError(f"could not write {location}: {error}; the previous file is intact") from None
