"""The shard manifest (pipeline/manifest.py): the one written by main at dc3dea1 reads,
resolves and loads; build -> write -> read gives the same bytes and the same object; the
validator names what is wrong; a ShardSet resolves once and travels as a value."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import decode_clip
from pipeline.config import IngestConfig, LoaderConfig
from pipeline.loader import iter_shard, make_epoch_loader, make_train_loader
from pipeline.manifest import (
    MANIFEST,
    ClipLayout,
    Manifest,
    ManifestError,
    Problem,
    ShardSet,
    build_manifest,
    read_manifest,
    resolve_shards,
)
from pipeline.sharding import ShardSpec
from typedconfig import ConfigError, from_dict, to_dict

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "main_dc3dea1" / "shards"
OFFSETS = (0, 15, 30, 41, 44, 46, 48, 49)  # configs/ingest/dynamic.yaml, as ingested then


def _stored(url: str) -> dict[str, tuple[dict, np.ndarray]]:
    return {key: (rec, decode_clip(ext, data, len(rec["frame_indices"])))
            for key, rec, ext, data in iter_shard(url)}  # fmt: skip


def test_manifest_written_by_main_dc3dea1_reads_resolves_and_loads():
    url = str(LEGACY / MANIFEST)
    manifest = read_manifest(url)
    assert manifest.version == 1 and manifest.shards == ("shard-000000.tar",)
    assert manifest.samples_per_shard == (3,) and manifest.num_samples == 3
    assert manifest.num_frames == 24 and manifest.clip_frames == 8 and manifest.bytes == 40960
    assert manifest.frame_offsets == OFFSETS and manifest.size == (32, 32)
    assert (manifest.storage, manifest.dtype, manifest.config_hash) == (
        "jpeg", "uint8", "fcce35bd93764766",
    )  # fmt: skip
    assert manifest.content_hash.startswith("34a3d164355890e4")
    assert manifest.videos == {"failed": 0, "ok": 1, "skipped": 0, "total": 1}
    assert manifest.problems == () and manifest.incomplete_shards == {}
    shards = manifest.shard_set(url)
    assert shards == resolve_shards(url)  # a loader given the path resolves the same set
    assert shards.urls == (str(LEGACY / "shard-000000.tar"),)
    assert shards.samples_per_shard == (3,) and shards.num_samples == 3
    assert shards.layout == ClipLayout(OFFSETS, (32, 32)) and shards.excluded == ()
    assert (shards.manifest_url, shards.content_hash) == (url, manifest.content_hash)

    stored = _stored(shards.urls[0])
    cfg = LoaderConfig(stage="pretrain", crop_size=32, num_workers=0, batch_size=2)
    loader = make_epoch_loader(shards, cfg, rank=0, world_size=1, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and loader.stats["corrupt_shards"] == 0
    assert [b["frames"].shape for b in batches] == [(2, 2, 3, 32, 32), (1, 2, 3, 32, 32)]
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(stored) and len(keys) == 3
    gaps = {g for b in batches for g in b["gaps"].flatten().tolist()}
    assert gaps <= {2, 5, 8} and gaps
    for b in batches:  # the stored frames, `gap` source frames apart (crop = stored size)
        for frames, (gap,), key in zip(b["frames"].numpy(), b["gaps"].tolist(), b["keys"]):
            record, lab = stored[key]
            idx = record["frame_indices"]
            t = next(t for t in range(len(idx)) if np.array_equal(lab[t], frames[1]))
            assert np.array_equal(lab[idx.index(idx[t] - gap)], frames[0])
    # The path and the resolved set are one source: the same batches.
    again = list(make_epoch_loader(url, cfg, rank=0, world_size=1, seed=0))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert all((x["frames"] == y["frames"]).all() for x, y in zip(again, batches))


def _legacy_rebuilt() -> Manifest:
    """The dc3dea1 manifest built again from what that run left: its stats, its assignment."""
    recorded = json.loads((LEGACY / MANIFEST).read_text())
    (videos,) = json.loads((LEGACY / "assignment.json").read_text())["shards"]
    stats = json.loads((LEGACY / "shard-000000.stats.json").read_text())
    cfg = from_dict(IngestConfig, recorded["config"])
    return build_manifest([ShardSpec(0, tuple(videos), str(LEGACY))], {0: stats}, {}, cfg)


def test_build_write_read_round_trip_keeps_the_bytes_and_the_object(tmp_path):
    built = _legacy_rebuilt()
    url = built.write(str(tmp_path))
    assert url == str(tmp_path / MANIFEST)
    assert (tmp_path / MANIFEST).read_bytes() == (LEGACY / MANIFEST).read_bytes()
    assert read_manifest(url) == built == read_manifest(str(LEGACY / MANIFEST))
    assert built.to_json() == json.loads((LEGACY / MANIFEST).read_text())
    assert built.num_samples == 3 and built.frame_offsets == tuple(OFFSETS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # no temp file left


def test_build_accounts_for_problems_and_incomplete_shards(tmp_path):
    stats = {"config_hash": "h", "num_samples": 2, "num_frames": 4, "bytes": 9, "sha256": "ab",
             "videos": [{"path": "/v/a.mp4", "status": "ok", "message": ""},
                        {"path": "/v/b.mp4", "status": "skipped", "message": "too short"}]}  # fmt: skip
    specs = [ShardSpec(0, ("/v/a.mp4", "/v/b.mp4"), str(tmp_path)),
             ShardSpec(1, ("/v/c.mp4",), str(tmp_path))]  # fmt: skip
    built = build_manifest(specs, {0: stats}, {1: "OSError: disk full"}, IngestConfig())
    assert built.problems == (
        Problem("/v/b.mp4", "skipped", "too short"),
        Problem("/v/c.mp4", "failed", "shard-000001.tar incomplete: OSError: disk full"),
    )
    assert built.videos == {"total": 3, "ok": 1, "skipped": 1, "failed": 1}
    assert built.incomplete_shards == {"shard-000001.tar": "OSError: disk full"}
    assert built.shards == ("shard-000000.tar",) and built.samples_per_shard == (2,)
    assert read_manifest(built.write(str(tmp_path))) == built


def test_manifests_without_later_keys_still_read(tmp_path):
    # Written before frame_offsets, size, dtype, content_hash (and the rest) existed.
    old = {"shards": ["a.tar", "part/b.tar", "c.tar"], "num_samples": 5,
           "samples_per_shard": [1, 2, 2], "future_key": {"ignored": True}}  # fmt: skip
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    manifest = read_manifest(str(tmp_path / MANIFEST))
    assert manifest.layout == ClipLayout() and manifest.content_hash == ""
    assert manifest.dtype == "" and manifest.problems == () and manifest.version == 1
    shards = manifest.shard_set(str(tmp_path / MANIFEST))
    assert shards.urls == tuple(str(tmp_path / n) for n in ("a.tar", "part/b.tar", "c.tar"))
    assert shards.samples_per_shard == (1, 2, 2)
    # The dc3dea1 shards without the layout keys: nothing to check, and they still load.
    copy = shutil.copytree(LEGACY, tmp_path / "copy")
    recorded = json.loads((copy / MANIFEST).read_text())
    for key in ("frame_offsets", "size", "dtype", "content_hash", "clip_frames", "version"):
        del recorded[key]
    (copy / MANIFEST).write_text(json.dumps(recorded))
    cfg = LoaderConfig(stage="pretrain", crop_size=32, num_workers=0, batch_size=3)
    (batch,) = make_epoch_loader(str(copy / MANIFEST), cfg, rank=0, world_size=1, seed=0)
    assert len(batch["keys"]) == 3 and set(batch["gaps"].flatten().tolist()) <= {2, 5, 8}


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"videos_per_shard": 1, "shards": [["a.mp4"]]}, "'shards' is [['a.mp4']], not a list"),
        ([], "it holds a JSON list, not an object"),
        ({"shards": ["s.tar"], "num_samples": "abc"}, "'num_samples' is 'abc', not an integer"),
        ({"shards": ["s.tar"], "num_samples": None}, "'num_samples' is None, not an integer"),
        ({"shards": ["s.tar"], "num_samples": True}, "'num_samples' is True, not an integer"),
        ({"shards": ["s.tar"], "num_samples": 3}, "'samples_per_shard' is not one integer"),
        ({"shards": ["s.tar"], "num_samples": 3, "samples_per_shard": [1, 2]},
         "'samples_per_shard' is not one integer per shard"),
        ({"shards": ["s.tar"], "num_samples": 3, "samples_per_shard": [3], "size": [32]},
         "'size' is [32], not [height, width]"),
        ({"shards": [], "num_samples": 0, "problems": [{"path": "v.mp4"}]},
         "'problems' is [{'path': 'v.mp4'}], not a list of {path, status, message}"),
        # Entries name files beside the manifest: nothing elsewhere is read through it.
        *(({"shards": [name], "num_samples": 1, "samples_per_shard": [1]},
           f"shard {name!r} is not a file name under the manifest's directory")
          for name in ("/etc/passwd", "../other/shard-000000.tar", "a/../../x.tar",
                       "s3://other-bucket/shard.tar", "file:///x.tar", "", "a\\b.tar")),
    ],
)  # fmt: skip
def test_what_is_not_a_manifest_is_named_with_the_fix(tmp_path, content, problem):
    wrong = tmp_path / "assignment.json"
    wrong.write_text(json.dumps(content))
    expected = f"{wrong} is not a manifest written by jobs.ingest ({problem}"
    with pytest.raises(ManifestError, match=re.escape(expected) + ".*rerun jobs.ingest"):
        read_manifest(str(wrong))


def test_missing_unreadable_and_newer_manifests_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; run jobs.ingest first, or give the"):
        read_manifest(str(tmp_path / "nope" / MANIFEST))  # ManifestError is a ConfigError
    with pytest.raises(ManifestError, match="does not exist; run jobs.ingest first"):
        read_manifest(str(tmp_path))  # a directory is no manifest
    bad = tmp_path / MANIFEST
    for content in (b'{"shards": [', b"\xff\xfe\x00garbage"):
        bad.write_bytes(content)
        with pytest.raises(ManifestError, match=f"{bad} is not valid JSON .*; rerun jobs.ingest"):
            read_manifest(str(bad))
    bad.write_text(json.dumps({"version": 2, "shards": [], "num_samples": 0}))
    with pytest.raises(ManifestError, match="format version 2, newer than this code reads"):
        read_manifest(str(bad))
    with pytest.raises(ManifestError, match="does not exist"):
        make_train_loader(str(tmp_path / "gone.json"), LoaderConfig(), rank=0, world_size=1, seed=0)


def test_shard_sets_resolve_exclude_and_travel_as_values(tmp_path):
    shards = read_manifest(str(LEGACY / MANIFEST)).shard_set(str(LEGACY / MANIFEST))
    # What crosses to Ray workers: pickled, or through typedconfig's plain dicts.
    assert pickle.loads(pickle.dumps(shards)) == shards
    assert from_dict(ShardSet, to_dict(shards)) == shards == resolve_shards(to_dict(shards))
    urls = [f"{tmp_path}/shard-{i:06d}.tar" for i in range(3)]
    assert resolve_shards(f"{tmp_path}/shard-{{000000..000002}}.tar").urls == tuple(urls)
    listed = resolve_shards(urls)
    assert listed.samples_per_shard is None and listed.num_samples is None
    assert listed.layout == ClipLayout() and listed.name == "3 shard URLs"
    counted = ShardSet(urls=tuple(urls), samples_per_shard=(4, 5, 6), manifest_url="m.json")
    less = counted.excluding(["shard-000001.tar", "not-there.tar"])
    assert less.urls == (urls[0], urls[2]) and less.samples_per_shard == (4, 6)
    assert less.excluded == ("shard-000001.tar",) and less.num_samples == 10
    with pytest.raises(ValueError, match="2 sample counts for 3 shard URLs"):
        ShardSet(urls=tuple(urls), samples_per_shard=(1, 2))
