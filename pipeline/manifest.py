"""The shard manifest, DST/manifest.json: what ingest writes and training reads, owned here.

    manifest = build_manifest(shards, stats, errors, cfg)    # ingest, from its shards' stats
    manifest.write(dst)                                      # atomic, deterministic bytes
    manifest = read_manifest("s3://b/shards/manifest.json")  # validated: ManifestError if not
    shards = manifest.shard_set(url)                         # ShardSet: what a loader reads
    shards = resolve_shards(source)                          # a ShardSet from any loader source

manifest.json (deterministic: the same inputs and config give the same bytes):
    version            the format version (1)
    shards             tar file names, relative to the manifest, in shard index order (a
                       shard split by `shard_mb` lists its parts in order, one without clips
                       none); an absolute path, a URL or a `..` is refused: a manifest reads
                       only what lies beside it. Never written without a sample (jobs.ingest)
    samples_per_shard  clips in each tar
    num_samples, num_frames, num_shards (tars), bytes
    videos             {"total", "ok", "skipped", "failed"} over every input video
    problems           [{"path", "status", "message"}] for every skipped or failed video,
                       and every "ok" one that stopped early (its message says where)
    incomplete_shards  {name: error} for shards that failed twice (absent from `shards`)
    clip_frames, frame_offsets, size, storage, dtype: what a sample holds (the loader needs
                       shards, samples_per_shard and the layout: frame_offsets and size)
    run_len            runs of consecutive frames (IngestConfig.run_len): a sample is a run
                       of at most run_len frames, frame_offsets is empty, and num_frames
                       counts every frame stored; absent for clip layouts
    num_source_frames  frames of the videos that were stored (run shard sets; absent for
                       clip layouts, whose manifests keep the bytes earlier versions wrote)
    config
    config_hash        the hash the shard set was written with (its first shard's: a set
                       an earlier version wrote keeps its hash, shard_stats.accepted_hashes)
    content_hash       sha256 over config_hash and every tar's name and sha256: the data
                       lineage training logs

Only `shards`, `num_samples` and (when there are shards) `samples_per_shard` are required: a
manifest written before a later key existed (frame_offsets, size, dtype, content_hash, ...)
reads with that field empty. Keys this version does not know are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import storage
from pipeline.config import IngestConfig
from pipeline.shard_stats import UNLISTED_AT_DEFAULT, config_hash, shard_tars
from pipeline.sharding import ShardSpec
from typedconfig import ConfigError, from_dict, to_dict, to_plain

MANIFEST = "manifest.json"
VERSION = 1


class ManifestError(ConfigError):
    """A manifest that is missing, not JSON, or not what jobs.ingest writes; the message names
    the file and the fix. A ConfigError: `--data` names it, and is refused before any work."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A video that was skipped, failed, or stopped early (its message says where)."""

    path: str
    status: str  # "ok" (stopped early), "skipped" or "failed"
    message: str


@dataclasses.dataclass(frozen=True)
class ClipLayout:
    """What a stored clip holds, from a manifest; empty when unknown (shard URLs given, or a
    manifest older than these keys). The loader checks it against a stage before reading."""

    frame_offsets: tuple[int, ...] = ()  # source-frame offsets of a clip's frames
    size: tuple[int, ...] = ()  # (height, width) of the stored frames
    run_len: int = 0  # > 0: samples are runs of at most this many consecutive frames


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """A manifest.json as a value (the module docstring says what each field holds). Its dict
    and list fields are JSON values: treat them as read-only."""

    version: int = VERSION
    shards: tuple[str, ...]
    samples_per_shard: tuple[int, ...] = ()
    num_samples: int
    num_frames: int = 0
    num_shards: int = 0
    bytes: int = 0
    videos: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    incomplete_shards: dict[str, str] = dataclasses.field(default_factory=dict)
    clip_frames: int = 0
    frame_offsets: tuple[int, ...] = ()
    size: tuple[int, ...] = ()
    storage: str = ""
    dtype: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    config_hash: str = ""
    content_hash: str = ""
    run_len: int = 0
    num_source_frames: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json (tuples as lists, problems as objects); the keys
        of run shard sets only when they are set (clip layouts keep their earlier bytes)."""
        obj = to_plain(self)
        for key in ("run_len", "num_source_frames"):
            if not obj[key]:
                del obj[key]
        return obj

    def write(self, dst: str) -> str:
        """Write DST/manifest.json atomically; returns its URL. The bytes are those every
        version has written (`json.dumps(indent=1, sort_keys=True)`): same inputs, same file."""
        url = storage.join(dst, MANIFEST)
        body = json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
        storage.atomic_write_bytes(url, body.encode("utf-8"))
        return url

    @property
    def layout(self) -> ClipLayout:
        return ClipLayout(self.frame_offsets, self.size, self.run_len)

    def shard_set(self, url: str) -> ShardSet:
        """The shards this manifest, read from `url`, lists: names relative to the manifest's
        directory (the validator refused anything else)."""
        base = posixpath.dirname(url)
        urls = tuple(storage.join(base, name) if base else name for name in self.shards)
        return ShardSet(
            urls=urls,
            samples_per_shard=self.samples_per_shard,
            layout=self.layout,
            manifest_url=url,
            content_hash=self.content_hash,
        )

    @classmethod
    def from_json(cls, obj: Any, url: str) -> Manifest:
        """`obj` (a parsed manifest.json) checked to be what jobs.ingest writes; ManifestError,
        naming `url` and the fix, if it is not."""
        problem = _first_problem(obj)
        if problem:
            raise ManifestError(
                f"data manifest {url} is not a manifest written by jobs.ingest ({problem}); give "
                "the manifest.json that jobs.ingest writes (or its directory), or rerun jobs.ingest"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in obj.items() if k in known and v is not None}
        if values.get("version", VERSION) > VERSION:
            raise ManifestError(
                f"data manifest {url} has format version {values['version']}, newer than this "
                f"code reads ({VERSION}); update this checkout, or rerun jobs.ingest with it"
            )
        for key in ("shards", "samples_per_shard", "frame_offsets", "size"):
            if key in values:
                values[key] = tuple(values[key])
        values["problems"] = tuple(Problem(**p) for p in values.get("problems", ()))
        return cls(**values)


def _under_manifest(name: str) -> bool:
    """A relative name below the manifest's directory: no URL, absolute path or `..` (a
    manifest from elsewhere must not make training read other files, e.g. another bucket)."""
    parts = name.split("/")
    return (
        bool(name)
        and "://" not in name
        and not name.startswith("/")
        and not any(c in name for c in "\\\0")
        and all(p not in ("", ".", "..") for p in parts)
    )


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is no count either


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(n) for n in value)


def _str(value: Any) -> bool:
    return isinstance(value, str)


def _mapping(value_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(_str(k) and value_ok(x) for k, x in v.items())


def _problems(value: Any) -> bool:
    keys = {"path", "status", "message"}
    return isinstance(value, list) and all(
        isinstance(p, dict) and set(p) == keys and all(map(_str, p.values())) for p in value
    )


# What each optional key holds when present (null counts as absent).
_OPTIONAL: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "version": ("an integer", _is_int),
    "num_frames": ("an integer", _is_int),
    "num_shards": ("an integer", _is_int),
    "bytes": ("an integer", _is_int),
    "videos": ("a mapping of counts", _mapping(_is_int)),
    "problems": ("a list of {path, status, message}", _problems),
    "incomplete_shards": ("a mapping of shard names to errors", _mapping(_str)),
    "clip_frames": ("an integer", _is_int),
    "frame_offsets": ("a list of integers", _ints),
    "size": ("[height, width]", lambda v: _ints(v) and len(v) == 2),
    "storage": ("a string", _str),
    "dtype": ("a string", _str),
    "config": ("a mapping", lambda v: isinstance(v, dict)),
    "config_hash": ("a string", _str),
    "content_hash": ("a string", _str),
    "run_len": ("an integer", _is_int),
    "num_source_frames": ("an integer", _is_int),
}


def _first_problem(obj: Any) -> str:
    """Why `obj` is not a manifest ("" if it is). The required keys come first, with the
    messages jobs.train has always given."""
    if not isinstance(obj, dict):
        return f"it holds a JSON {type(obj).__name__}, not an object"
    shards = obj.get("shards")
    if not isinstance(shards, list) or not all(map(_str, shards)):
        return f"'shards' is {str(shards)[:80]}, not a list of shard names"
    outside = next((name for name in shards if not _under_manifest(name)), None)
    if outside is not None:
        return f"shard {outside[:80]!r} is not a file name under the manifest's directory"
    if not _is_int(obj.get("num_samples")):
        return f"'num_samples' is {obj.get('num_samples')!r}, not an integer"
    per_shard = obj.get("samples_per_shard")
    if (shards or per_shard is not None) and not (
        _ints(per_shard) and len(per_shard) == len(shards)
    ):
        return "'samples_per_shard' is not one integer per shard"
    for key, (what, ok) in _OPTIONAL.items():
        if obj.get(key) is not None and not ok(obj[key]):
            return f"'{key}' is {str(obj[key])[:80]}, not {what}"
    return ""


def read_manifest(url: str) -> Manifest:
    """The manifest at `url` (a local path or an fsspec URL), checked to be what jobs.ingest
    writes: ManifestError, naming the file and the fix, if it is missing or is not."""
    try:
        obj = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        hint = ""
        if storage.is_local(url):  # a relative path is the usual cause
            hint = ", or give the absolute path (a job submitted to Ray runs in a copy of its "
            hint += "--working-dir)"
        raise ManifestError(
            f"data manifest {url} does not exist; run jobs.ingest first{hint}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"data manifest {url} is not valid JSON ({e}); rerun jobs.ingest"
        ) from e
    return Manifest.from_json(obj, url)


def build_manifest(
    shards: list[ShardSpec],
    stats: dict[int, dict[str, Any]],
    errors: dict[int, str],
    cfg: IngestConfig,
) -> Manifest:
    """The manifest of an ingest run: every shard planned (`shards`), the stats of those done
    (by index), the errors of those that failed twice (by index)."""
    complete = [s for s in shards if s.index in stats]
    tars = [t for s in complete for t in shard_tars(s, stats[s.index])]
    per_shard = tuple(t["num_samples"] for t in tars)
    videos = [v for s in complete for v in stats[s.index]["videos"]]
    status = Counter(v["status"] for v in videos)
    lost = sum(len(s.videos) for s in shards if s.index not in stats)
    chash = stats[complete[0].index]["config_hash"] if complete else config_hash(cfg)
    content = hashlib.sha256(chash.encode())
    for t in tars:
        content.update(f"{t['name']}:{t['sha256']}\n".encode())
    problems = [
        Problem(v["path"], v["status"], v["message"])
        for v in videos
        if v["status"] != "ok" or v["message"]
    ] + [
        Problem(v, "failed", f"{s.name} incomplete: {errors.get(s.index, '')}")
        for s in shards
        if s.index not in stats
        for v in s.videos
    ]
    runs, default = cfg.run_len > 0, to_dict(IngestConfig())
    config = {k: v for k, v in to_dict(cfg).items()
              if not (k in UNLISTED_AT_DEFAULT and v == default[k])}  # fmt: skip
    return Manifest(
        version=VERSION,
        shards=tuple(t["name"] for t in tars),
        samples_per_shard=per_shard,
        num_samples=sum(per_shard),
        num_frames=sum(stats[s.index]["num_frames"] for s in complete),
        num_shards=len(tars),
        bytes=sum(stats[s.index]["bytes"] for s in complete),
        videos={
            "total": len(videos) + lost,
            "ok": status["ok"],
            "skipped": status["skipped"],
            "failed": status["failed"] + lost,
        },
        problems=tuple(problems),
        incomplete_shards={shards[i].name: e for i, e in sorted(errors.items())},
        clip_frames=cfg.run_len if runs else len(cfg.offsets),
        frame_offsets=() if runs else tuple(cfg.offsets),
        size=tuple(cfg.size),
        storage=cfg.storage,
        dtype=cfg.dtype,
        config=config,
        config_hash=chash,
        content_hash=content.hexdigest(),
        run_len=cfg.run_len,
        # Frames of the videos runs were cut from (every one of them is stored).
        num_source_frames=sum(v.get("frames", 0) for v in videos if v.get("clips")) if runs else 0,
    )


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards a training run reads, resolved once (in the driver) and handed to every
    loader as it is: a frozen value that survives Ray's pickling, and typedconfig's
    `to_dict` / `from_dict` too."""

    urls: tuple[str, ...]
    samples_per_shard: tuple[int, ...] | None = None  # one per URL; None: shard URLs given
    layout: ClipLayout = ClipLayout()
    manifest_url: str = ""  # "" when shard URLs were given
    content_hash: str = ""  # the manifest's
    excluded: tuple[str, ...] = ()  # file names of the manifest's shards left out as corrupt

    def validate(self) -> None:
        counts = self.samples_per_shard
        if counts is not None and len(counts) != len(self.urls):
            raise ValueError(f"{len(counts)} sample counts for {len(self.urls)} shard URLs")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def name(self) -> str:
        """What to call this set in a message."""
        return self.manifest_url or f"{len(self.urls)} shard URLs"

    @property
    def num_samples(self) -> int | None:
        return None if self.samples_per_shard is None else sum(self.samples_per_shard)

    def excluding(self, names: Iterable[str]) -> ShardSet:
        """This set less the shards whose file names are in `names` (corrupt ones); the
        others keep their sample counts, which weight them in a resampled stream."""
        drop = set(names)
        keep = [i for i, url in enumerate(self.urls) if _file_name(url) not in drop]
        counts = self.samples_per_shard
        return dataclasses.replace(
            self,
            urls=tuple(self.urls[i] for i in keep),
            samples_per_shard=None if counts is None else tuple(counts[i] for i in keep),
            excluded=(*self.excluded, *(_file_name(u) for u in self.urls if _file_name(u) in drop)),
        )


def _file_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# What a loader may be given (resolve_shards).
ShardSource = ShardSet | str | Sequence[str] | Mapping[str, Any]


def expand_pattern(pattern: str) -> list[str]:
    """Shard URLs from a brace pattern, WebDataset's "shard-{000000..000009}.tar"; a URL
    without braces is taken as it is (braceexpand would drop its backslashes)."""
    if "{" not in pattern:
        return [pattern]
    import braceexpand  # WebDataset's dependency: only readers of shards need it

    return list(braceexpand.braceexpand(pattern))


def resolve_shards(source: ShardSource) -> ShardSet:
    """A ShardSet from what a loader may be given: a ShardSet; its plain dict (what `to_dict`
    makes of one on its way to Ray workers); a manifest's path or URL (*.json, read and
    validated); a brace pattern or one shard URL; a list of shard URLs."""
    if isinstance(source, ShardSet):
        return source
    if isinstance(source, Mapping):
        return from_dict(ShardSet, dict(source))
    if isinstance(source, str):
        if source.endswith(".json"):
            return read_manifest(source).shard_set(source)
        return ShardSet(urls=tuple(expand_pattern(source)))
    return ShardSet(urls=tuple(source))


# -- The loader source before ShardSet, for callers not moved yet (tests/jobs/test_train.py):
# delete both once none is left.
