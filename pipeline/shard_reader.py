"""One shard (a WebDataset tar of clips, maybe compressed) read sample by sample, every member's
size checked against a cap before a byte of it is held.

    for sample in iter_samples(url, member_cap(layout)): ...   # RawSample, as the loader reads
    for key, record, ext, data in iter_shard(url): ...         # records parsed; raises if bad

WebDataset's tar reader (`tar_file_iterator`) reads every member whole, whatever size its
header declares, through tarfile's own decompression, which skips an unread member by
re-slicing one buffer per 10 KiB (a 1 GiB member of a 1 MB gzip costs 2.3 GB, or minutes).
So the tar is read here, with WebDataset's semantics (regular files only, `__meta__` names
skipped, key = member name up to the first dot, grouping and the duplicate check by its
`group_by_keys`), and:
- compression is told by the first bytes, never the name: gzip, bz2 and xz are read through
  the standard library's streaming readers (bounded memory) under tarfile's stream mode, so
  the caps below hold on decompressed members; zstd is refused with a message;
- a member over its cap is read past unread (a bounded buffer at a time) and stands in its
  sample as an `OversizedMember`: the loader refuses that sample alone, the shard goes on;
- a pax or GNU long-name header (tarfile reads those whole) over MAX_HEADER_BYTES makes the
  shard unreadable (OversizedHeader, one of SHARD_ERRORS).
Decompressing still costs CPU in proportion to the decompressed size (1 GiB: about 3 s).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import lzma
import math
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

import webdataset as wds

import storage
from pipeline.codec import CLIP_EXTENSIONS, MAX_CLIP_PIXELS, ClipDecodeError
from pipeline.manifest import ClipLayout

MAX_RECORD_BYTES = 1 << 20  # a clip's JSON record (ingest writes ~400 bytes)
MAX_HEADER_BYTES = 1 << 20  # a pax or GNU long-name header member
# A clip member may take 4 bytes per stored value: JPEG of noise at quality 100 takes 1.6,
# float16 raw 2 (+ a 128-byte header); 64 KiB more for headers and tiny clips.
BYTES_PER_VALUE = 4
MEMBER_SLACK = 64 << 10

# What reading a broken shard raises: tarfile and I/O errors, a truncated or corrupt
# compressed stream, a clip without its json (ClipDecodeError), duplicate members
# (WebDataset's group_by_keys: ValueError).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)

_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's skip_meta
_DECOMPRESSORS: dict[bytes, Callable[[IO[bytes]], IO[bytes]]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    b"BZh": lambda f: bz2.BZ2File(f, "rb"),
    b"\xfd7zXZ\x00": lambda f: lzma.LZMAFile(f, "rb"),
}
_REFUSED = {b"\x28\xb5\x2f\xfd": "zstd"}
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)  # fmt: skip


def member_cap(layout: ClipLayout) -> int:
    """The largest clip member read (bytes): BYTES_PER_VALUE per stored value of the layout's
    clip or longest run (frames x 3 planes x H x W) + MEMBER_SLACK (+ 1 KiB a frame of a
    run for its own headers: ~600 bytes a JPEG frame); 256 MiB (MAX_CLIP_PIXELS values) when the
    layout is unknown (shard URLs given, or an old manifest)."""
    frames = layout.run_len or len(layout.frame_offsets)  # a run member: at most run_len
    if frames and layout.size:
        values = frames * 3 * math.prod(layout.size)
    else:
        values = MAX_CLIP_PIXELS
    return BYTES_PER_VALUE * values + MEMBER_SLACK + (layout.run_len << 10)


@dataclasses.dataclass(frozen=True)
class OversizedMember:
    """A member whose header declares more bytes than its cap: never read."""

    name: str
    size: int
    cap: int

    def __str__(self) -> str:
        return f"member {self.name} of {self.size:,} bytes is over its cap of {self.cap:,}"


class RawSample(NamedTuple):
    """One sample as it lies in the shard: nothing parsed, decoded or checked yet."""

    key: str
    record: bytes | OversizedMember  # the `<key>.json` member
    ext: str  # the clip member's extension (pipeline.codec.CLIP_EXTENSIONS)
    clip: bytes | OversizedMember


class OversizedHeader(tarfile.TarError):
    """A pax or GNU long-name header over MAX_HEADER_BYTES: the shard is refused."""


class _CappedTarInfo(tarfile.TarInfo):
    # `frombuf` (public API) parses each 512-byte header before tarfile reads the extended
    # header it announces: refuse a huge one there.
    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _HEADER_TYPES and info.size > MAX_HEADER_BYTES:
            raise OversizedHeader(
                f"a tar header member of {info.size:,} bytes (over {MAX_HEADER_BYTES:,})"
            )
        return info


def _decompressed(f: IO[bytes]) -> IO[bytes]:
    """`f`, or a streaming reader of its decompressed bytes, told by its first bytes."""
    magic = f.read(6)
    f.seek(0)
    for prefix, name in _REFUSED.items():
        if magic.startswith(prefix):
            raise tarfile.ReadError(
                f"a {name}-compressed shard: not readable here; write tars uncompressed "
                "(ingest does) or gzip them"
            )
    for prefix, reader in _DECOMPRESSORS.items():
        if magic.startswith(prefix):
            return reader(f)
    return f


def _members(tar: tarfile.TarFile, url: str, clip_cap: int) -> Iterator[dict[str, Any]]:
    """WebDataset's member dicts ({"fname", "data", "__url__"}), an OversizedMember as the data
    of a member over its cap."""
    for info in tar:
        tar.members = []  # stream mode keeps every TarInfo otherwise
        if not info.isreg() or _META.match(info.name):
            continue
        cap = MAX_RECORD_BYTES if info.name.lower().endswith(".json") else clip_cap
        if info.size > cap:
            data: bytes | OversizedMember = OversizedMember(info.name, info.size, cap)
        else:
            data = tar.extractfile(info).read()
        yield {"fname": info.name, "data": data, "__url__": url}


def _raw_sample(sample: dict[str, Any]) -> RawSample:
    key = sample["__key__"]
    ext = next((e for e in CLIP_EXTENSIONS if e in sample), None)
    if ext is None or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ClipDecodeError(f"sample {key} lacks a clip or its json ({members})")
    return RawSample(key, sample["json"], ext, sample[ext])


def iter_samples(url: str, clip_cap: int = member_cap(ClipLayout())) -> Iterator[RawSample]:
    """Every sample of the shard at `url` (any fsspec URL), members over their caps unread;
    raises one of SHARD_ERRORS if the shard itself is unreadable."""
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as f:
        stream = _decompressed(f)
        tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo)
        try:
            for sample in wds.tariterators.group_by_keys(_members(tar, url, clip_cap)):
                yield _raw_sample(sample)
        finally:
            tar.close()
            stream.close()


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, Any], str, bytes]]:
    """(key, record, clip extension, clip bytes) per sample, for tools and tests reading
    shards they trust; raises ClipDecodeError for a member over its cap or a record that is
    not JSON (the loader skips such samples one by one instead)."""
    for sample in iter_samples(url):
        for member in (sample.record, sample.clip):
            if isinstance(member, OversizedMember):
                raise ClipDecodeError(f"sample {sample.key}: {member}")
        try:
            record = json.loads(sample.record)
        except ValueError as e:
            raise ClipDecodeError(f"sample {sample.key}: record is not JSON ({e})") from None
        yield sample.key, record, sample.ext, sample.clip
