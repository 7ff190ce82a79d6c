"""What `jobs.train --data` names, resolved once in the driver: readable shards, sample
counts, the content hash that lineage and the same-data resume check use, and the clip layout
every stage is checked against before any work starts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tarfile
from typing import Any

import storage
from jobs.train_config import TrainConfig
from pipeline.loader import check_layout
from pipeline.samples import UnusableClip
from typedconfig import ConfigError

log = logging.getLogger("jobs.train")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    uri: str  # what the user gave (manifest or shards)
    shards: list[str]  # readable shard URLs
    # What the loader gets: the manifest, {"manifest", "exclude"} when shards were skipped, or
    # the readable shard URLs.
    source: str | list[str] | dict[str, Any]
    # Of what is trained on: the manifest's content hash, or with skipped shards a hash of it
    # and their names (lineage and the same-data resume check see the difference).
    content_hash: str
    num_samples: int  # in the readable shards; -1 when shard URLs were given (unknown)
    skipped: list[str]  # "shard: reason" of corrupt shards, recorded
    manifest_hash: str  # the manifest's own content hash
    # What a sample holds, from the manifest (frame_offsets, size): {} for shard URLs.
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)


def data_tags(data: DataInfo) -> dict[str, str]:
    """MLflow tags that record the shards skipped (the loader never sees them)."""
    tags = {"data.num_shards_skipped": str(len(data.skipped))}
    if data.skipped:
        tags["data.shards_skipped"] = "; ".join(data.skipped)[:5000]
        tags["data.manifest_hash"] = data.manifest_hash
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
        path = os.path.join(path, "manifest.json")
    per_shard: list[int] | None = None
    layout: dict[str, Any] = {}  # what a sample holds, from a manifest
    if path.endswith(".json"):
        manifest = read_manifest(path, remote)
        layout = {k: manifest[k] for k in ("frame_offsets", "size") if k in manifest}
        base = path.rsplit("/", 1)[0]
        shards = [
            s if ("://" in s or s.startswith("/")) else f"{base}/{s}" for s in manifest["shards"]
        ]
        num_samples = manifest["num_samples"]
        per_shard = manifest.get("samples_per_shard")
        content_hash = str(manifest.get("content_hash", ""))
        if not shards or num_samples <= 0:
            raise ConfigError(
                f"data manifest {path} lists {len(shards)} shards and {num_samples} samples: "
                "nothing to train on (did ingest find any videos?)"
            )
    else:
        shards = [s.strip() for s in data.split(",") if s.strip()]
        num_samples = -1
        content_hash = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()
        path = data
    skipped: list[str] = []
    skipped_names: list[str] = []
    if not remote:
        missing = [
            s for s in shards if "{" not in s and not os.path.isfile(s.removeprefix("file://"))
        ]
        if missing and missing == shards and len(shards) == 1:
            raise ConfigError(
                f"data {path} does not exist; give a manifest.json written by jobs.ingest, "
                "its directory, or .tar shard paths"
            )
        if missing:
            raise ConfigError(
                f"data {path}: {len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}; "
                "rerun jobs.ingest on the same output to finish them"
            )
        good = []
        for i, s in enumerate(shards):
            reason = tar_ok(s.removeprefix("file://")) if "{" not in s else ""
            if reason:
                log.warning("corrupt shard %s skipped: %s", s, reason)
                skipped.append(f"{s}: {reason}")
                skipped_names.append(s.rsplit("/", 1)[-1])
                if per_shard is not None:
                    num_samples -= per_shard[i]
            else:
                good.append(s)
        if not good:
            raise ConfigError(f"data {path}: every shard is unreadable: {skipped}")
        shards = good
    manifest_hash = content_hash or "unknown"
    if skipped:  # names, not paths: the same data copied elsewhere keeps its hash
        text = "\n".join([manifest_hash, *sorted(skipped_names)])
        content_hash = hashlib.sha256(text.encode()).hexdigest()
    # The manifest (less any corrupt shards): the loader then weights shards by their counts.
    source: str | list[str] | dict[str, Any] = shards
    if path.endswith(".json"):
        source = {"manifest": path, "exclude": skipped_names} if skipped else path
    return DataInfo(
        data, shards, source, content_hash or "unknown", num_samples, skipped, manifest_hash, layout
    )


def read_manifest(path: str, remote: bool) -> dict[str, Any]:
    """The manifest at `path`, checked to be what jobs.ingest writes (clear errors if not)."""
    if not remote and not os.path.isfile(path):
        raise ConfigError(
            f"data manifest {path} does not exist; run jobs.ingest first, or give the absolute "
            "path (a job submitted to Ray runs in a copy of its --working-dir)"
        )
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"data manifest {path} is not valid JSON ({e}); rerun jobs.ingest") from e
    problem = ""
    if not isinstance(manifest, dict):
        problem = f"it holds a JSON {type(manifest).__name__}, not an object"
    elif not isinstance(manifest.get("shards"), list) or not all(
        isinstance(s, str) for s in manifest["shards"]
    ):
        problem = f"'shards' is {str(manifest.get('shards'))[:80]}, not a list of shard names"
    elif type(manifest.get("num_samples")) is not int:  # bool is no count either
        problem = f"'num_samples' is {manifest.get('num_samples')!r}, not an integer"
    elif manifest["shards"] and (
        not isinstance(manifest.get("samples_per_shard"), list)
        or len(manifest["samples_per_shard"]) != len(manifest["shards"])
        or not all(type(n) is int for n in manifest["samples_per_shard"])
    ):
        problem = "'samples_per_shard' is not one integer per shard"
    if problem:
        raise ConfigError(
            f"data manifest {path} is not a manifest written by jobs.ingest ({problem}); give "
            "the manifest.json that jobs.ingest writes (or its directory), or rerun jobs.ingest"
        )
    return manifest


def check_layouts(cfgs: list[TrainConfig], data: DataInfo) -> None:
    """Every stage can draw its samples from the data's clips (the manifest says how they are
    laid out): a stage that cannot would otherwise fail only when it starts, maybe days in."""
    for cfg in cfgs:
        try:
            check_layout(data.layout, cfg.loader, data.uri, cfg.model.long_term_gap)
        except UnusableClip as e:
            raise ConfigError(str(e)) from None
