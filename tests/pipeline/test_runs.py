"""Runs of consecutive frames (IngestConfig.run_len, configs/ingest/default.yaml): one shard
set serves every stage. A run round-trips frame for frame; the loader decodes only the frames
a sample uses (a damaged unused frame does not matter, a damaged used one is refused); every
stage draws its layout from the same shards; every source frame is reachable."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import ClipDecodeError, encode_clip, encode_run, run_frame
from pipeline.config import IngestConfig, LoaderConfig
from pipeline.decode import run_bounds, video_clips
from pipeline.loader import check_layout, make_train_loader
from pipeline.manifest import ClipLayout, build_manifest, read_manifest
from pipeline.records import BAD_RECORD, UNVERIFIED, BadSample, StoredRun, open_sample
from pipeline.samples import UnusableClip, make_sample, select_frames
from pipeline.shard_reader import RawSample, iter_samples
from pipeline.sharding import assign
from pipeline.worker import process_shard
from storage import sample_video_dir
from typedconfig import ConfigError, from_dict, load_config, replace, to_dict

ROOT = Path(__file__).resolve().parents[2]
RUN_LEN = 24
CARPHONE = str(sample_video_dir() / "carphone_pristine.mp4")  # 120 frames: 5 runs of 24


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The carphone video as PNG runs (lossless: comparable exactly), 32x32."""
    cfg = load_config(IngestConfig, str(ROOT / "configs/ingest/default.yaml"),
                      [f"run_len={RUN_LEN}", "size=[32,32]", "storage=png"])  # fmt: skip
    dst = tmp_path_factory.mktemp("runs")
    specs = assign([CARPHONE], str(dst), 1)
    stats = {s.index: process_shard(s, to_dict(cfg)) for s in specs}
    build_manifest(specs, stats, {}, cfg).write(str(dst))
    return cfg, dst / "manifest.json"


def _loader_cfg(stage: str, **kw) -> LoaderConfig:
    base = dict(stage=stage, batch_size=8, num_workers=0, crop_size=32, shuffle_buffer=4,
                samples_per_clip=4)  # fmt: skip
    return from_dict(LoaderConfig, {**base, **kw})


def test_a_run_shard_round_trips_frame_for_frame(runs):
    cfg, manifest_url = runs
    manifest = read_manifest(str(manifest_url))
    (url,) = manifest.shard_set(str(manifest_url)).urls
    samples = list(iter_samples(url))
    _, frames = video_clips(CARPHONE, replace(cfg, run_len=0, clip_len=1))  # every frame alone
    source = np.concatenate([lab for _, _, lab in frames])
    assert len(source) == 120
    indices, stored = [], []
    for sample in samples:
        idx, run = open_sample(sample, manifest.layout)
        assert isinstance(run, StoredRun) and sample.ext == "run.png"
        indices.extend(idx)
        stored.append(run.take(list(range(len(idx)))))
    assert indices == list(range(120)) and [len(s) for s in stored] == [24] * 5
    assert np.array_equal(np.concatenate(stored), source)  # every frame, exactly (PNG)
    # The manifest: source frames, frames stored (each once), the run layout; no offsets.
    assert (manifest.num_source_frames, manifest.num_frames, manifest.num_samples) == (120, 120, 5)
    assert manifest.run_len == RUN_LEN and manifest.frame_offsets == ()
    assert manifest.layout == ClipLayout((), (32, 32), RUN_LEN)
    assert json.loads(manifest_url.read_text())["config"]["run_len"] == RUN_LEN


def test_jpeg_frames_share_their_header_and_rebuild_to_standalone_images():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 256, (5, 3, 16, 24), dtype=np.uint8)
    ext, data, header, sizes, digests = encode_run(lab, "jpeg")
    assert ext == "run.jpg" and 300 <= header <= 400 and header + sum(sizes) == len(data)
    starts = (header + np.cumsum([0, *sizes[:-1]])).tolist()
    for t in range(5):
        alone = encode_clip(lab[t : t + 1], "jpeg")[1]
        assert run_frame(data, header, starts, sizes, t) == alone  # the standalone JPEG
        assert hashlib.sha256(alone).hexdigest() == digests[t]
    assert encode_run(lab, "png")[2] == 0  # nothing shared: whole PNGs back to back


def test_runs_cut_every_frame_once_in_near_equal_lengths():
    for n, run_len in [(120, 24), (49, 48), (48, 48), (7, 48), (1000, 48), (97, 32)]:
        bounds = run_bounds(n, run_len)
        lengths = [e - s for s, e in bounds]
        assert [i for s, e in bounds for i in range(s, e)] == list(range(n))
        assert max(lengths) <= run_len and max(lengths) - min(lengths) <= 1
    assert [e - s for s, e in run_bounds(49, 48)] == [24, 25]  # no 1-frame leftover run


def _run_sample(manifest_url: Path) -> tuple[RawSample, ClipLayout]:
    manifest = read_manifest(str(manifest_url))
    return next(iter_samples(manifest.shard_set(str(manifest_url)).urls[0])), manifest.layout


def _damaged(sample: RawSample, t: int) -> RawSample:
    """`sample` with frame t's bytes changed (same length): only its sha256 tells."""
    record = json.loads(sample.record)
    start = record["header_bytes"] + sum(record["frame_bytes"][:t])
    data = bytearray(sample.clip)
    data[start + 60] ^= 0xFF
    return sample._replace(clip=bytes(data))


def test_only_the_frames_a_sample_uses_are_decoded(runs):
    _, manifest_url = runs
    sample, layout = _run_sample(manifest_url)
    rng = np.random.default_rng(0)
    for stage, used in (("pretrain", 2), ("main", 4), ("dynamic", 6)):
        idx, run = open_sample(sample, layout)
        frames, gaps = make_sample(run, idx, _loader_cfg(stage), rng)
        assert frames.shape == (used, 3, 32, 32) and run.decoded == used  # of 24 stored
        assert len(run.frames) == used
    # Frame 3 damaged: samples that do not use it decode, one that does is refused.
    idx, run = open_sample(_damaged(sample, 3), layout)
    assert run.take([0, 5, 23]).shape == (3, 3, 32, 32) and run.decoded == 3
    with pytest.raises(ClipDecodeError, match="frame 3: bytes do not match the frame_sha256"):
        run.take([1, 3])


def test_a_damaged_frame_skips_the_samples_that_use_it_not_the_run(runs, tmp_path):
    # Through the loader: every frame but frame 3 of the one run still trains.
    _, manifest_url = runs
    sample, _ = _run_sample(manifest_url)
    bad = _damaged(sample, 3)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in ((f"{bad.key}.json", bad.record), (f"{bad.key}.{bad.ext}", bad.clip)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = make_train_loader([str(tmp_path / "s.tar")], _loader_cfg("pretrain", batch_size=4),
                               rank=0, world_size=1, seed=0)  # fmt: skip
    batches = [b for _, b in zip(range(10), loader)]
    assert sum(len(b["keys"]) for b in batches) == 40
    assert loader.stats["corrupt_samples"] > 0 and loader.stats["samples"] >= 40  # drawn ahead


def test_run_records_are_checked_before_any_frame_is_decoded(runs):
    _, manifest_url = runs
    sample, layout = _run_sample(manifest_url)
    record = json.loads(sample.record)
    cases = [
        ({**record, "frame_bytes": [*record["frame_bytes"][:-1], record["frame_bytes"][-1] + 1]},
         BAD_RECORD, "header_bytes and frame_bytes sum to"),
        ({**record, "frame_bytes": record["frame_bytes"][:-1]}, BAD_RECORD, "24 byte lengths"),
        ({k: v for k, v in record.items() if k != "frame_sha256"}, UNVERIFIED, "frame_sha256"),
    ]  # fmt: skip
    for changed, kind, message in cases:
        with pytest.raises(BadSample, match=message) as refused:
            open_sample(sample._replace(record=json.dumps(changed).encode()), layout)
        assert refused.value.kind == kind
    short = ClipLayout((), (32, 32), 16)  # the manifest says runs of at most 16 frames
    with pytest.raises(BadSample, match="a run of 24 frames; the manifest's runs hold at most 16"):
        open_sample(sample, short)


def test_every_stage_draws_its_layout_from_one_shard_set(runs):
    _, manifest_url = runs
    seen = {}
    for stage in ("pretrain", "main", "dynamic"):
        loader = make_train_loader(str(manifest_url), _loader_cfg(stage), rank=0, world_size=1,
                                   seed=0)  # fmt: skip
        gaps = np.concatenate([b["gaps"].numpy() for _, b in zip(range(6), loader)])
        assert loader.stats["unusable_samples"] == 0 and loader.stats["samples"] >= 48
        seen[stage] = gaps
    assert seen["pretrain"].shape[1] == 1 and set(seen["pretrain"][:, 0]) == {2, 5, 8}
    main = seen["main"]
    assert main.shape[1] == 3 and ((main >= 1) & (main <= 15)).all()
    assert (np.diff(main, axis=1) < 0).all()  # distinct references, oldest first
    dynamic = seen["dynamic"]
    assert dynamic.shape[1] == 5 and (dynamic[:, :2] > 15).all()  # long-term: > 15 back
    assert ((dynamic[:, 2:] >= 1) & (dynamic[:, 2:] <= 15)).all()
    assert dynamic[:, 0].max() > 17  # long-term references reach across the run


def test_every_source_frame_is_reachable_by_every_stage(runs):
    # Over many draws from the stored runs of a 120-frame video, every source frame appears
    # in some sample of every stage (as a reference or the target).
    _, manifest_url = runs
    manifest = read_manifest(str(manifest_url))
    rng = np.random.default_rng(0)
    for stage in ("pretrain", "main", "dynamic"):
        seen: set[int] = set()
        for sample in iter_samples(manifest.shard_set(str(manifest_url)).urls[0]):
            idx, _ = open_sample(sample, manifest.layout)  # nothing decoded
            for _ in range(200):
                seen.update(idx[i] for i in select_frames(idx, _loader_cfg(stage), rng)[0])
        assert seen == set(range(120)), stage
    # The same on a run of 48 frames (a full default run); on a long run selection is cheap
    # (no T x T matrix).
    for stage in ("pretrain", "main", "dynamic"):
        cfg = _loader_cfg(stage)
        used = np.zeros(48, int)
        for _ in range(800):
            order, _ = select_frames(list(range(48)), cfg, rng)
            used[order] += 1
        assert (used > 0).all(), (stage, np.flatnonzero(used == 0))
    order, gaps = select_frames(list(range(1000)), _loader_cfg("dynamic"), rng)  # MAX run
    assert len(order) == 6 and min(gaps[:2]) > 15


def test_run_layouts_serve_every_stage_and_short_ones_are_refused():
    for stage in ("pretrain", "main", "dynamic"):
        check_layout(ClipLayout((), (32, 32), 48), _loader_cfg(stage), "runs")
    with pytest.raises(UnusableClip, match="cannot serve stage 'dynamic'.*default.yaml"):
        check_layout(ClipLayout((), (32, 32), 12), _loader_cfg("dynamic"), "runs of 12")
    with pytest.raises(ConfigError, match="run_len=2 must be 0"):
        from_dict(IngestConfig, {"run_len": 2})
    # One config serves all three stages: the shipped default.
    default = load_config(IngestConfig, str(ROOT / "configs/ingest/default.yaml"))
    assert default.run_len == 48 and default.size == (256, 256)
