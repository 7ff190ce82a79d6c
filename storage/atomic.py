"""Atomic writes: readers of a destination see either nothing or the complete file.

A local file is written to `<name>.tmp-<random>` in the same directory and renamed into place
(`os.replace`); an object-store file is written to a local temporary file and uploaded with
one PUT (object stores never expose a half-written object).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from storage.fs import get_fs, is_local, strip_file

TMP_MARK = ".tmp-"


def atomic_write(url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(fileobj)` and publish the result at `url` atomically."""
    if is_local(url):
        path = strip_file(url)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    fs, path = get_fs(url)
    fd, tmp = tempfile.mkstemp(suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        fs.put_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_bytes(url: str, data: bytes) -> None:
    atomic_write(url, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary local path beside `path`; renamed onto `path` only if the block
    succeeds (for writers that want a file name, such as PIL or pandas)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
