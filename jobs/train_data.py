"""What `jobs.train --data` names, resolved once in the driver: readable shards, sample
counts, the content hash that lineage and the same-data resume check use, and the clip layout
every stage is checked against before any work starts."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tarfile

from jobs import mlflow_keys as keys
from jobs.train_config import TrainConfig
from pipeline.loader import check_layout
from pipeline.manifest import MANIFEST, ShardSet, expand_pattern, read_manifest
from pipeline.samples import UnusableClip
from typedconfig import ConfigError

log = logging.getLogger("jobs.train")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    uri: str  # what the user gave (manifest or shards)
    # What every worker's loader reads: the readable shards, their sample counts and clip
    # layout (from a manifest), the names of the corrupt ones left out.
    shard_set: ShardSet
    # Of what is trained on: the manifest's content hash, or with skipped shards a hash of it
    # and their names (lineage and the same-data resume check see the difference).
    content_hash: str
    num_samples: int  # in the readable shards; -1 when shard URLs were given (unknown)
    skipped: list[str]  # "shard: reason" of corrupt shards, recorded
    manifest_hash: str  # the manifest's own content hash

    @property
    def shards(self) -> list[str]:
        """The readable shard URLs."""
        return list(self.shard_set.urls)


def data_tags(data: DataInfo) -> dict[str, str]:
    """MLflow tags that record the shards skipped (the loader never sees them)."""
    tags = {keys.DATA_NUM_SHARDS_SKIPPED: str(len(data.skipped))}
    if data.skipped:
        tags[keys.DATA_SHARDS_SKIPPED] = "; ".join(data.skipped)[:5000]
        tags[keys.DATA_MANIFEST_HASH] = data.manifest_hash
    return tags


def tar_ok(path: str) -> str:
    """'' if `path` is a readable tar with at least one member, else the reason."""
    try:
        with tarfile.open(path) as tf:
            if tf.next() is None:
                return "empty tar"
            for _ in tf:  # walks every header: a truncated or garbled shard fails here
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def describe_data(data: str) -> DataInfo:
    """Resolve --data into readable shards; clear errors for missing or empty data."""
    if not data:
        raise ConfigError(
            "no training data: pass --data path/to/manifest.json (written by jobs.ingest)"
        )
    remote = "://" in data and not data.startswith("file://")
    path = data.removeprefix("file://")
    if not remote:  # Ray workers change directory: only absolute paths survive the trip
        path = os.path.abspath(path)
    if not remote and os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if path.endswith(".json"):
        manifest = read_manifest(path)
        shards = manifest.shard_set(path)
        num_samples = manifest.num_samples
        content_hash = manifest.content_hash
        if not shards.urls or num_samples <= 0:
            raise ConfigError(
                f"data manifest {path} lists {len(shards.urls)} shards and {num_samples} "
                "samples: nothing to train on (did ingest find any videos?)"
            )
    else:
        given = [s.strip() for s in data.split(",") if s.strip()]
        shards = ShardSet(urls=tuple(u for s in given for u in expand_pattern(s)))
        num_samples = -1
        content_hash = hashlib.sha256("\n".join(sorted(given)).encode()).hexdigest()
        path = data
    skipped: list[str] = []
    skipped_names: list[str] = []
    if not remote:
        urls = shards.urls
        missing = [s for s in urls if not os.path.isfile(s.removeprefix("file://"))]
        if missing and missing == list(urls) and len(urls) == 1:
            raise ConfigError(
                f"data {path} does not exist; give a manifest.json written by jobs.ingest, "
                "its directory, or .tar shard paths"
            )
        if missing:
            raise ConfigError(
                f"data {path}: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}; "
                "rerun jobs.ingest on the same output to finish them"
            )
        for i, s in enumerate(urls):
            reason = tar_ok(s.removeprefix("file://"))
            if reason:
                log.warning("corrupt shard %s skipped: %s", s, reason)
                skipped.append(f"{s}: {reason}")
                skipped_names.append(s.rsplit("/", 1)[-1])
                if shards.samples_per_shard is not None:
                    num_samples -= shards.samples_per_shard[i]
        if len(skipped) == len(urls):
            raise ConfigError(f"data {path}: every shard is unreadable: {skipped}")
        # The manifest's other shards keep their counts: the loader weights shards by them.
        shards = shards.excluding(skipped_names)
    manifest_hash = content_hash or "unknown"
    if skipped:  # names, not paths: the same data copied elsewhere keeps its hash
        text = "\n".join([manifest_hash, *sorted(skipped_names)])
        content_hash = hashlib.sha256(text.encode()).hexdigest()
    return DataInfo(data, shards, content_hash or "unknown", num_samples, skipped, manifest_hash)


def check_layouts(cfgs: list[TrainConfig], data: DataInfo) -> None:
    """Every stage can draw its samples from the data's clips (the manifest says how they are
    laid out): a stage that cannot would otherwise fail only when it starts, maybe days in."""
    for cfg in cfgs:
        try:
            check_layout(data.shard_set.layout, cfg.loader, data.uri, cfg.model.long_term_gap)
        except UnusableClip as e:
            raise ConfigError(str(e)) from None
