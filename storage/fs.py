"""Local paths and fsspec URLs (s3://, gs://, ...) behind one small API.

A local path is taken literally (made absolute); anything with `://` goes through fsspec. Writes
that must be atomic go through `storage.atomic`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import make_path_posix


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def strip_file(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL. A local path is taken
    literally, absolute: fsspec's URL parsing would cut a file name at "::" (chained URLs)."""
    if is_local(url):
        return fsspec.filesystem("file"), make_path_posix(os.path.abspath(strip_file(url)))
    return fsspec.core.url_to_fs(url)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by fs.find/glob back to a URL that `get_fs` understands."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    fs.invalidate_cache(path)  # other processes (Ray tasks) write here: no stale listings
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    if is_local(url):
        os.makedirs(path, exist_ok=True)
    else:
        with contextlib.suppress(Exception):  # object stores have no directories
            fs.makedirs(path, exist_ok=True)


def not_a_directory(url: str) -> str:
    """Why `url` cannot be used as a directory (created when missing): "" when it can, else
    "is a file" or, for local paths, "is under P, a file"."""
    fs, path = get_fs(url)
    if fs.isfile(path):
        return "is a file"
    if is_local(url):
        parent = os.path.dirname(path)
        while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        if os.path.isfile(parent):
            return f"is under {parent}, a file"
    return ""


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local file path holding the content of `url` (downloaded for remote URLs)."""
    if is_local(url):
        yield strip_file(url)
        return
    fs, path = get_fs(url)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def list_names(url: str) -> list[str]:
    """Names of the files directly under a directory URL ([] when it does not exist)."""
    return sorted(list_sizes(url))


def list_sizes(url: str) -> dict[str, int]:
    """{name: size in bytes} of the files directly under a directory URL ({} when it does
    not exist)."""
    fs, path = get_fs(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries}


def remove(url: str) -> None:
    fs, path = get_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
