"""SRC -> the sorted, de-duplicated list of input video URLs.

SRC is one of (local path or fsspec URL):
- a directory: searched recursively, files whose extension is in `IngestConfig.extensions`
  (the count of other files is logged, never silently dropped);
- a glob (`/data/**/*.mp4`, `s3://bucket/videos/*.mp4`): every match (a path that exists
  is taken literally, even with `[`, `*` or `?` in its name);
- a list file: `.txt` (one path per line, `#` comments; UTF-8, a byte-order mark is ignored,
  other bytes are kept as the file names they are), `.csv` or `.parquet` with a `path`
  column. Relative entries are resolved against the list file's directory. Entries are taken
  as given: a missing file is reported by the worker as a failed video, not dropped here.
Local paths come out absolute and normalised, so a video is the same video whatever the
working directory of the run (its path is its identity: sample keys, shard assignment).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath

import storage

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv", ".parquet")


class InputError(ValueError):
    """SRC cannot be read; the message names it and says what is accepted."""


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _resolve(entry: str, base: str) -> str:
    entry = entry.strip()
    if "://" in entry and not entry.startswith("file://"):
        return entry
    if storage.is_local(base) or entry.startswith(("/", "file://")):
        return os.path.abspath(os.path.join(base, storage.strip_file(entry)))
    return storage.join(base, entry)


def _read_list(src: str) -> list[str]:
    data = storage.read_bytes(src)
    base = posixpath.dirname(storage.strip_file(src)) or "."
    suffix = os.path.splitext(src)[1].lower()
    if suffix == ".txt":
        # Not UTF-8: the bytes become the same surrogates os.fsdecode gives file names.
        lines = data.decode("utf-8-sig", "surrogateescape").splitlines()
        entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        import pandas as pd

        if suffix == ".csv":  # bytes that are not UTF-8 kept as the file names they are
            frame = pd.read_csv(io.BytesIO(data), encoding_errors="surrogateescape", dtype=object)
        else:
            frame = pd.read_parquet(io.BytesIO(data))
        if "path" not in frame.columns:
            raise InputError(
                f"{src} has columns {list(frame.columns)}; a .csv/.parquet list needs a "
                "'path' column with one video path or URL per row"
            )
        entries = [str(p) for p in frame["path"].dropna().tolist()]
    return [_resolve(e, base) for e in entries]


def list_videos(src: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted unique video URLs named by SRC (see module docstring)."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    fs, path = storage.get_fs(src)
    if _is_glob(path) and not fs.exists(path):
        found = [storage.to_url(fs, p) for p in fs.glob(path) if fs.isfile(p)]
    elif src.lower().endswith(LIST_SUFFIXES) and fs.isfile(path):
        found = _read_list(src)
    elif fs.isdir(path):
        every = [storage.to_url(fs, p) for p in fs.find(path)]
        found = [p for p in every if os.path.splitext(p)[1].lower() in exts]
        ignored = len(every) - len(found)
        if ignored:
            log.info(
                "ignored %d files under %s without a video extension %s", ignored, src, sorted(exts)
            )
    elif fs.isfile(path):
        found = [storage.to_url(fs, path)]
    else:
        raise InputError(
            f"input {src!r} does not exist; pass a directory, a glob, a single video or a "
            ".txt/.csv/.parquet list of paths"
        )
    videos = sorted(set(found))
    if not videos:
        raise InputError(f"input {src!r} names no videos (extensions {sorted(exts)})")
    return videos
