"""SRC -> the sorted, de-duplicated list of input video URLs.

An input video is a video file or a frame folder: a directory that directly holds numbered
images (`00000.jpg, 00001.jpg ...`, JPEG or PNG; pipeline/frame_folder.py), as YouTube-VOS
(`JPEGImages/<video_id>/`) and DAVIS (`JPEGImages/480p/<sequence>/`) ship their videos.
SRC is one of (local path or fsspec URL):
- a directory: searched recursively, files whose extension is in `IngestConfig.extensions`
  and folders holding numbered images (the count of other files is logged, never silently
  dropped; folders named `Annotations`, where both datasets keep their masks as numbered
  PNGs, are not searched: pass `JPEGImages`, or name mask folders in a list if wanted);
- a glob (`/data/**/*.mp4`, `s3://bucket/videos/*.mp4`, `/ytvos/JPEGImages/*`): every
  matching file, and every matching directory as a frame folder (a path that exists is
  taken literally, even with `[`, `*` or `?` in its name);
- a list file: `.txt` (one path per line, `#` comments; UTF-8, a byte-order mark is ignored,
  other bytes are kept as the file names they are), `.csv` or `.parquet` with a `path`
  column, naming video files or frame folders. Relative entries are resolved against the list
  file's directory. Entries are taken as given (nothing is read or stat-ed per entry, so a
  million-entry list costs no file-system calls): a missing file, or a folder without numbered
  images, is reported by the worker as a failed video, not dropped here.
Local paths come out absolute and normalised (no trailing slash), so a video is the same video
whatever the working directory of the run, or the form of SRC that named it (its path is its
identity: sample keys, shard assignment).

Listing a directory reads each folder once (os.walk: names and entry types from the directory
itself, no stat per file), so a YouTube-VOS root costs one directory read per video, not one
call per image.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from typing import Any

import storage
from pipeline.frame_folder import IMAGE_NAME, holds_images

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv", ".parquet")
# Mask folders of YouTube-VOS and DAVIS (numbered palette PNGs beside JPEGImages): not videos.
MASK_FOLDERS = ("Annotations",)


class InputError(ValueError):
    """SRC cannot be read; the message names it and says what is accepted."""


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _resolve(entry: str, base: str) -> str:
    entry = entry.strip()
    if "://" in entry and not entry.startswith("file://"):
        return entry.rstrip("/")  # a frame folder is named without its trailing slash
    if storage.is_local(base) or entry.startswith(("/", "file://")):
        return os.path.abspath(os.path.join(base, storage.strip_file(entry)))
    return storage.join(base, entry).rstrip("/")


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


def _names(src: str, fs: Any, path: str) -> list[str]:
    """Names in the directory `path` of SRC's file system (locally, no stat per entry)."""
    if storage.is_local(src):
        return os.listdir(path)
    return [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]


def _walk(src: str, exts: set[str]) -> tuple[list[str], int, int]:
    """(video files and frame folders under the directory `src`, other files, mask folders
    not searched): one read per directory (os.walk locally; fs.find, which lists every file
    once, on object stores)."""
    fs, path = storage.get_fs(src)
    found: list[str] = []
    ignored = masks = 0
    seen: set[tuple[int, int]] = set()
    if storage.is_local(src):
        walk = os.walk(path, followlinks=True)  # datasets are often linked in
    else:  # object stores have no directories to walk: group the listing by folder
        folders: dict[str, list[str]] = {}
        for p in fs.find(path):
            folder, name = posixpath.split(p)
            folders.setdefault(folder, []).append(name)
        walk = ((d, [], names) for d, names in folders.items())
    for folder, subfolders, names in walk:
        if storage.is_local(src):  # a link back up the tree would loop: each folder once
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                subfolders[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
        masks += sum(d in MASK_FOLDERS for d in subfolders)
        subfolders[:] = sorted(d for d in subfolders if d not in MASK_FOLDERS)  # deterministic
        if not storage.is_local(src) and any(p in MASK_FOLDERS for p in folder.split("/")):
            continue
        url = storage.to_url(fs, folder)
        frames = holds_images(names)
        if frames:
            found.append(url)
        for name in names:
            if os.path.splitext(name)[1].lower() in exts:
                found.append(storage.join(url, name))
            elif not (frames and IMAGE_NAME.fullmatch(name)):
                ignored += 1
    return found, ignored, masks


def list_videos(src: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted unique video URLs (video files and frame folders) named by SRC (see module
    docstring)."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    fs, path = storage.get_fs(src)
    if _is_glob(path) and not fs.exists(path):
        # matching files are videos, matching directories that hold numbered images frame
        # folders (not the folders above them, which `**` matches too)
        found, dropped = [], 0
        for p in fs.glob(path):
            if fs.isfile(p) or (fs.isdir(p) and holds_images(_names(src, fs, p))):
                found.append(storage.to_url(fs, p))
            else:
                dropped += 1
        if dropped:
            log.info("ignored %d folders matching %s that hold no numbered images", dropped, src)
    elif src.lower().endswith(LIST_SUFFIXES) and fs.isfile(path):
        found = _read_list(src)
    elif fs.isdir(path):
        found, ignored, masks = _walk(src, exts)
        if ignored:
            log.info(
                "ignored %d files under %s that are neither a video %s nor a numbered image "
                "of a frame folder", ignored, src, sorted(exts),
            )  # fmt: skip
        if masks:
            log.info("did not search %d mask folders %s under %s", masks, MASK_FOLDERS, src)
    elif fs.isfile(path):
        found = [storage.to_url(fs, path)]
    else:
        raise InputError(
            f"input {src!r} does not exist; pass a directory, a glob, a single video or a "
            ".txt/.csv/.parquet list of paths"
        )
    videos = sorted(set(found))
    if not videos:
        raise InputError(
            f"input {src!r} names no videos (extensions {sorted(exts)}) and no frame folders "
            "(folders of numbered images: 00000.jpg, 00001.jpg, ...)"
        )
    return videos
