"""A place for run files, on the local disk or on an object store, behind the few
`pathlib.Path` methods a run directory uses.

`as_location(x)` is a `pathlib.Path` for a local path (or `file://` URL), taken as it is, and an
`ObjectPath` for any other fsspec URL (`s3://bucket/runs`, `gs://...`, `memory://...`). Code that
owns a run directory keeps calling `/`, `.name`, `.parent`, `.exists()`, `.is_dir()`,
`.read_bytes()`, `.glob()`, ... and works on both; what `Path` lacks (`remove_tree`,
`append_text`) is a function here that takes either.

An object store has no directories (a "directory" is the key prefix of the objects under it)
and no rename, but one PUT is atomic: readers see the whole object or none. So an
`ObjectPath`'s writes go through `storage.atomic` (a local temporary file, then one upload),
`mkdir` is a no-op, and a directory is written file by file, its marker last, exactly as on
a local disk. Listings bypass fsspec's listing cache: other processes write here.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec

from storage.atomic import atomic_write_bytes
from storage.fs import get_fs, is_local, join, strip_file


class ObjectPath:
    """A file or key prefix at an fsspec URL, with the subset of `pathlib.Path` run
    directories use (module docstring)."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, sep, rest = str(url).partition("://")
        if not sep or not rest.strip("/"):
            raise ValueError(f"{url!r} is not an object-store URL (scheme://bucket/...)")
        self.url = f"{scheme}://{rest.rstrip('/')}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(join(self.url, str(name)))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        head = self.url.rsplit("/", 1)[0]
        return self if head.endswith(":/") else ObjectPath(head)  # a bucket is its own parent

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path inside it), listings of this path uncached."""
        fs, path = get_fs(self.url)
        fs.invalidate_cache(path)
        return fs, path

    def exists(self) -> bool:
        fs, path = self.fs()
        return fs.exists(path)

    def is_file(self) -> bool:
        fs, path = self.fs()
        return fs.isfile(path)

    def is_dir(self) -> bool:
        """True when any object is under this prefix."""
        fs, path = self.fs()
        return fs.isdir(path)

    def read_bytes(self) -> bytes:
        fs, path = get_fs(self.url)
        return fs.cat_file(path)  # FileNotFoundError when there is no such object

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        atomic_write_bytes(self.url, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self.fs()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator[ObjectPath]:
        fs, path = self.fs()
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.rstrip("/") != path.rstrip("/"):  # some stores list a prefix's own object
                yield self / entry.rstrip("/").rsplit("/", 1)[-1]

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Entries directly under this prefix whose names match `pattern` (no `/`)."""
        fs, path = self.fs()
        for entry in fs.glob(f"{path.rstrip('/')}/{pattern}"):
            # Named as this path names its children: a listing may spell the URL otherwise.
            yield self / entry.rstrip("/").rsplit("/", 1)[-1]


Location = Path | ObjectPath


def as_location(place: str | Path | ObjectPath) -> Location:
    """A `Path` for a local path or file:// URL (relative stays relative), an `ObjectPath`
    for any other URL; a Location is returned as it is."""
    if isinstance(place, (Path, ObjectPath)):
        return place
    text = str(place)
    return Path(strip_file(text)) if is_local(text) else ObjectPath(text)


def remove_tree(place: Location) -> None:
    """Delete a directory (or prefix) and everything in it; nothing there is fine."""
    if isinstance(place, Path):
        shutil.rmtree(place, ignore_errors=True)
        return
    fs, path = place.fs()
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def append_text(place: Location, text: str) -> None:
    """Append `text` to a file (made when missing). On an object store the whole object is
    rewritten with one PUT: two writers at once may lose a line, never tear one (fit for
    best-effort logs, not for records that must not be lost)."""
    if isinstance(place, Path):
        with open(place, "a") as f:
            f.write(text)
        return
    try:
        before = place.read_bytes()
    except FileNotFoundError:
        before = b""
    place.write_bytes(before + text.encode("utf-8"))
