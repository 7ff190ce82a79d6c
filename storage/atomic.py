"""Atomic, durable writes: readers of a destination see either nothing or the complete file,
also after a power loss or a kill -9 at any point.

A local file is written to `<name>.tmp-<random>` in the same directory (with a tag,
`<name>.tmp-<tag>-<random>`: a run names its temp files, so that it can tell them from another
run's), fsynced, renamed into place (`os.replace`) and its directory fsynced (the rename itself
is then on disk); an object-store file is written to a local temporary file and uploaded with
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


def atomic_write(url: str, write: Callable[[IO[bytes]], None], tag: str = "") -> None:
    """Call `write(fileobj)` and publish the result at `url` atomically; a local temp file's
    name carries `tag` (e.g. a run id; `tmp_tag` reads it back)."""
    if "/" in tag or "-" in tag or TMP_MARK in tag:
        raise ValueError(f"temp file tag {tag!r} must not contain '/' or '-'")
    if is_local(url):
        path = strip_file(url)
        tmp = f"{path}{TMP_MARK}{tag + '-' if tag else ''}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
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


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in `directory` durable (a no-op where directories cannot
    be opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. certain network mounts) refuse a directory fsync
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(url: str, data: bytes, tag: str = "") -> None:
    atomic_write(url, lambda f: f.write(data), tag)


def tmp_tag(name: str) -> str | None:
    """The tag in the name of a temp file `atomic_write` made ("" for an untagged one), or
    None when `name` is not such a temp file."""
    if TMP_MARK not in name:
        return None
    rest = name.rsplit(TMP_MARK, 1)[1]
    return rest.rsplit("-", 1)[0] if "-" in rest else ""


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
        with open(tmp, "rb+") as f:  # what the writer left, on disk before it is published
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
