"""Object-store input and output through fsspec: ingest s3:// -> s3:// against moto in server
mode on loopback (a real HTTP S3 endpoint), then the loader reads the shards from s3://."""

from __future__ import annotations

import json

import pytest

from jobs.ingest import ingest
from pipeline.config import IngestConfig, LoaderConfig
from pipeline.loader import make_epoch_loader
from tests.object_store import moto_s3
from typedconfig import from_dict, to_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3_server():
    """moto in server mode on loopback, this process's AWS_* variables pointing at it (fake
    credentials; tests/object_store.py); yields those variables. Other modules import this
    fixture."""
    with moto_s3() as env:
        yield env


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray

    # Ray workers get the same endpoint and fake credentials.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": s3_server})  # fmt: skip
    try:
        yield s3_server
    finally:
        ray.shutdown()


def test_ingest_and_load_through_s3(s3_ray, tmp_path):
    import fsspec
    from ingest_media import sample_video_dir, write_video

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("videos")
    fs.put_file(str(sample_video_dir() / "carphone_pristine.mp4"), "videos/in/carphone.mp4")
    write_video(tmp_path / "gray.mp4", 12, 48, 64, gray=True)
    fs.put_file(str(tmp_path / "gray.mp4"), "videos/in/sub/gray.mp4")
    fs.pipe_file("videos/in/broken.mp4", b"not a video")
    cfg = from_dict(IngestConfig, dict(clip_len=3, clips_per_video=2, size=[32, 32],
                                       videos_per_shard=2))  # fmt: skip
    manifest = ingest("s3://videos/in/", "s3://videos/out", cfg, progress=False)
    assert manifest["videos"] == {"total": 3, "ok": 2, "skipped": 0, "failed": 1}
    assert manifest["problems"][0]["path"] == "s3://videos/in/broken.mp4"
    assert manifest["num_samples"] == 4 and manifest["shards"] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("videos/out"))
    assert names == ["assignment.json", "manifest.json", "shard-000000.stats.json",
                     "shard-000000.tar", "shard-000001.stats.json", "shard-000001.tar"]  # fmt: skip
    stored = json.loads(fs.cat_file("videos/out/manifest.json"))
    assert stored["content_hash"] == manifest["content_hash"]
    # A rerun finds every shard done through the object store listing.
    before = fs.info("videos/out/shard-000000.tar")["LastModified"]
    again = ingest("s3://videos/in/", "s3://videos/out", cfg, progress=False)
    assert again["content_hash"] == manifest["content_hash"]
    fs.invalidate_cache()
    assert fs.info("videos/out/shard-000000.tar")["LastModified"] == before
    # The loader streams the shards from s3:// given the manifest URL.
    lcfg = LoaderConfig(stage="pretrain", batch_size=2, num_workers=0, crop_size=32,
                        pair_gaps=(1, 2), pair_probs=(0.5, 0.5))  # fmt: skip
    loader = make_epoch_loader("s3://videos/out/manifest.json", lcfg, rank=0, world_size=1, seed=0)
    batches = list(loader)
    keys = sorted(k for b in batches for k in b["keys"])
    assert len(batches) == 2 and len(keys) == 4 and len(set(keys)) == 4
    assert batches[0]["frames"].shape == (2, 2, 3, 32, 32)
    assert set(batches[0]["gaps"].flatten().tolist()) <= {1, 2}
    # Target tar size: parts are written to the object store like whole shards, and load.
    split_cfg = from_dict(IngestConfig, {**to_dict(cfg), "videos_per_shard": 3, "shard_mb": 1e-3})
    split = ingest("s3://videos/in/", "s3://videos/split", split_cfg, progress=False)
    assert split["shards"] == ["shard-000000.tar", "shard-000000_001.tar"]  # carphone | gray
    loader = make_epoch_loader(
        "s3://videos/split/manifest.json", lcfg, rank=0, world_size=1, seed=0
    )
    assert sorted(k for b in loader for k in b["keys"]) == keys
