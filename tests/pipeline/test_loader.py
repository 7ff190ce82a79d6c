"""Training loader over real ingest shards (written by the shard worker, no Ray needed):
two ranks with uneven shards, frame selection per stage, seeding, corrupt shards."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import cv2
import numpy as np
import pytest
import torch

from model.colour import normalise_lab
from model.memory import roi_dilation
from pipeline.codec import ClipDecodeError, decode_clip
from pipeline.config import IngestConfig, LoaderConfig
from pipeline.loader import collate, iter_shard, make_epoch_loader, make_train_loader
from pipeline.manifest import build_manifest
from pipeline.samples import UnusableClip, select_frames
from pipeline.sharding import assign
from pipeline.worker import process_shard
from typedconfig import ConfigError, from_dict, to_dict

LENGTHS = (12, 20, 31, 9, 13)  # clips of span 9, stride 3: 2, 4, 8, 1, 2 = 17 samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ingest_media import write_video

    root = tmp_path_factory.mktemp("loader")
    src = root / "in"
    src.mkdir()
    videos = [str(write_video(src / f"v{i}.mp4", n, 48, 64)) for i, n in enumerate(LENGTHS)]
    cfg = from_dict(IngestConfig, dict(clip_len=9, clip_stride=3, size=[32, 32],
                                       videos_per_shard=1))  # fmt: skip
    dst = root / "shards"
    dst.mkdir()
    specs = assign(videos, str(dst), 1)
    stats = {s.index: process_shard(s, to_dict(cfg)) for s in specs}
    build_manifest(specs, stats, {}, cfg).write(str(dst))
    manifest = json.loads((dst / "manifest.json").read_text())
    stored = {}
    for name in manifest["shards"]:
        for key, record, ext, data in iter_shard(str(dst / name)):
            stored[key] = (record, decode_clip(ext, data, 9))
    return dst, manifest, stored


def _cfg(**kw) -> LoaderConfig:
    base = dict(stage="pretrain", batch_size=4, num_workers=0, crop_size=0, shuffle_buffer=4)
    return from_dict(LoaderConfig, {**base, **kw})


def _check_against_store(batch, stored):
    """Each sample's frames are the stored frames `gap` source frames apart (value check)."""
    for frames, gaps, key in zip(batch["frames"].numpy(), batch["gaps"].numpy(), batch["keys"]):
        record, lab = stored[key]
        idx = record["frame_indices"]
        target = [t for t in range(9) if np.array_equal(lab[t], frames[-1])]
        assert target, key
        t = target[-1]
        for ref, gap in zip(frames[:-1], gaps):
            assert np.array_equal(lab[idx.index(idx[t] - gap)], ref)


def test_manifest_has_uneven_shards(shards):
    _, manifest, stored = shards
    assert manifest["samples_per_shard"] == [2, 4, 8, 1, 2]
    assert manifest["num_samples"] == len(stored) == 17


def test_epoch_two_ranks_equal_batches_full_coverage(shards):
    dst, manifest, stored = shards
    seen, counts = [], []
    for rank, workers in ((0, 2), (1, 0)):
        loader = make_epoch_loader(str(dst / "manifest.json"), _cfg(num_workers=workers),
                                   rank=rank, world_size=2, seed=3)  # fmt: skip
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        for b in batches:
            assert b["frames"].dtype.is_floating_point is False
            assert b["frames"].shape[1:] == (2, 3, 32, 32) and b["gaps"].shape[1:] == (1,)
            _check_against_store(b, stored)
        seen += [k for b in batches for k in b["keys"]]
        assert loader.stats["corrupt_shards"] == 0
    # ceil(17 / 2) = 9 samples per rank -> 3 batches of 4, 4, 1 on both ranks.
    assert counts == [(3, 3), (3, 3)]
    assert len(seen) == 18 and set(seen) == set(stored)  # every sample, one padded repeat


def test_epoch_batches_stay_equal_with_fewer_samples_than_ranks_or_a_rank_all_corrupt(
    shards, tmp_path
):
    # Both used to leave a rank with no batch at all while the others trained: a DDP hang.
    dst, manifest, stored = shards
    one = [str(dst / "shard-000003.tar")]  # 1 sample, 3 ranks
    got = [list(make_epoch_loader(one, _cfg(), rank=r, world_size=3, seed=0)) for r in range(3)]
    assert [len(b) for b in got] == [1, 1, 1] and all(len(b[0]["keys"]) == 1 for b in got)
    # Shards of 2 and 8 samples over 5 ranks: rank 0's whole share, the 2-sample shard, is
    # unreadable; it pads from the other shard.
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(dst / "shard-000002.tar", bad / "shard-000002.tar")
    (bad / "shard-000000.tar").write_bytes(b"")
    subset = {"shards": ["shard-000000.tar", "shard-000002.tar"], "samples_per_shard": [2, 8]}
    (bad / "manifest.json").write_text(json.dumps({**manifest, **subset, "num_samples": 10}))
    epochs = [
        make_epoch_loader(str(bad / "manifest.json"), _cfg(), rank=r, world_size=5, seed=0)
        for r in range(2)
    ]
    got = [list(e) for e in epochs]
    assert [len(b) for b in got] == [len(e) for e in epochs] == [1, 1]
    assert [len(b[0]["keys"]) for b in got] == [2, 2]
    assert epochs[0].stats["corrupt_shards"] >= 1 and epochs[0].stats["padded"] == 2


def test_resampled_is_infinite_seeded_and_rank_specific(shards):
    dst, _, stored = shards
    source = str(dst / "manifest.json")

    def take(rank, start_step, n=6, workers=0):
        loader = make_train_loader(source, _cfg(num_workers=workers, crop_size=24),
                                   rank=rank, world_size=2, seed=7, start_step=start_step)  # fmt: skip
        return [b for _, b in zip(range(n), loader)]

    a, again = take(0, 0), take(0, 0)
    assert [b["keys"] for b in a] == [b["keys"] for b in again]
    assert all((x["frames"] == y["frames"]).all() for x, y in zip(a, again))
    assert [b["keys"] for b in take(1, 0)] != [b["keys"] for b in a]
    assert [b["keys"] for b in take(0, 100)] != [b["keys"] for b in a]
    # 6 batches x 4 = 24 samples from 17: the stream does not end; workers too.
    with_workers = take(0, 0, n=8, workers=2)
    assert len(with_workers) == 8
    for b in a + with_workers:
        assert b["frames"].shape == (4, 2, 3, 24, 24)
        assert set(b["gaps"].flatten().tolist()) <= {2, 5, 8}


def test_normalise_yields_network_space_lab(shards):
    dst, _, _ = shards
    source = str(dst / "manifest.json")

    def take(**kw):
        loader = make_train_loader(source, _cfg(crop_size=24, **kw), rank=0, world_size=1, seed=3)
        return [b for _, b in zip(range(2), loader)]

    for raw, norm in zip(take(), take(normalise=True)):
        assert raw["keys"] == norm["keys"]
        assert raw["frames"].dtype == torch.uint8 and norm["frames"].dtype == torch.float32
        torch.testing.assert_close(norm["frames"], normalise_lab(raw["frames"]))
        assert -1.0 <= norm["frames"][:, :, 0].min() and norm["frames"][:, :, 0].max() <= 1.0


def test_float16_shards_load_as_normalised_float_lab(shards, tmp_path):
    # The same videos stored unquantised (float16, raw) and as uint8 raw: the loader draws
    # the same samples and yields float32 network-space Lab, equal to the uint8 frames
    # normalised up to their 8-bit quantisation (<= 1 level: 0.008 in network units).
    src = shards[0].parent / "in"  # the videos behind the `shards` fixture
    videos = [str(src / f"v{i}.mp4") for i in range(len(LENGTHS))]
    sets = {}
    for dtype in ("float16", "uint8"):
        dst = tmp_path / dtype
        dst.mkdir()
        cfg = from_dict(IngestConfig, dict(clip_len=9, clip_stride=3, size=[32, 32],
                        videos_per_shard=2, storage="raw", dtype=dtype))  # fmt: skip
        specs = assign(videos, str(dst), 2)
        stats = {s.index: process_shard(s, to_dict(cfg)) for s in specs}
        build_manifest(specs, stats, {}, cfg).write(str(dst))
        key, record, ext, data = next(iter_shard(str(dst / "shard-000000.tar")))
        assert record["dtype"] == dtype and decode_clip(ext, data, 9).dtype == np.dtype(dtype)
        assert json.loads((dst / "manifest.json").read_text())["dtype"] == dtype
        loader = make_train_loader(str(dst / "manifest.json"), _cfg(crop_size=24), rank=0,
                                   world_size=1, seed=5)  # fmt: skip
        sets[dtype] = [b for _, b in zip(range(3), loader)]
    for f16, u8 in zip(sets["float16"], sets["uint8"]):
        assert f16["keys"] == u8["keys"] and torch.equal(f16["gaps"], u8["gaps"])
        assert f16["frames"].dtype == torch.float32 and u8["frames"].dtype == torch.uint8
        diff = (f16["frames"] - normalise_lab(u8["frames"])).abs()
        assert diff.max() < 0.012 and diff.mean() < 0.003
    # A batch mixing both (two shard sets in one list) is normalised as a whole.
    mixed = collate([{"frames": sets[d][0]["frames"][0], "gaps": sets[d][0]["gaps"][0],
                      "key": d} for d in ("uint8", "float16")])  # fmt: skip
    assert mixed["frames"].dtype == torch.float32 and mixed["frames"].shape[0] == 2


def test_samples_per_clip_reuses_each_decoded_clip(shards):
    dst, _, stored = shards
    cfg = _cfg(samples_per_clip=3, shuffle_buffer=0)
    loader = make_train_loader(str(dst / "manifest.json"), cfg, rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(3), loader)]  # 12 samples
    keys = [k for b in batches for k in b["keys"]]
    # 3 samples per decoded clip, spread by a 12-sample buffer: <= 23 drawn from <= 8 clips.
    assert len(keys) == 12 and len(set(keys)) <= 8
    assert max(keys.count(k) for k in keys) >= 2
    for b in batches:
        _check_against_store(b, stored)


def test_pair_gap_probabilities():
    rng = np.random.default_rng(0)
    cfg = _cfg()
    draws = [select_frames(list(range(9)), cfg, rng)[1][0] for _ in range(3000)]
    freq = {g: draws.count(g) / len(draws) for g in (2, 5, 8)}
    assert sum(freq.values()) == 1.0
    assert freq[2] == pytest.approx(0.4, abs=0.03) and freq[5] == pytest.approx(0.4, abs=0.03)
    assert freq[8] == pytest.approx(0.2, abs=0.03)
    # A clip offering only gap 2 always gives 2.
    assert {select_frames([0, 2], cfg, rng)[1][0] for _ in range(20)} == {2}


def test_memory_stages_select_short_and_long_term_references():
    rng = np.random.default_rng(1)
    dynamic = _cfg(stage="dynamic", num_short_refs=3, num_long_refs=2)
    offsets = [0, 15, 30, 41, 44, 46, 48, 49]  # configs/ingest/dynamic.yaml
    dilations = set()
    for _ in range(50):
        order, gaps = select_frames(offsets, dynamic, rng)
        assert len(order) == 6 and order == sorted(order)
        assert all(g > 15 for g in gaps[:2]) and all(0 < g <= 15 for g in gaps[2:])
        assert gaps == [offsets[order[-1]] - offsets[i] for i in order[:-1]]
        dilations.update(roi_dilation(g) for g in gaps[:2])
    assert dilations == {2, 3, 4}  # all three coarse dilations DAVIS is read with
    main = _cfg(stage="main", num_short_refs=3)
    for _ in range(50):
        order, gaps = select_frames(list(range(0, 16, 2)), main, rng)
        assert len(order) == 4 and order == sorted(order) and all(0 < g <= 15 for g in gaps)
    with pytest.raises(UnusableClip, match="configs/ingest/dynamic.yaml"):
        select_frames(list(range(9)), dynamic, rng)
    # The threshold is the model's long_term_gap, given to the loader: at 5, frames 0..3 of a
    # 9-frame clip are long-term references of frame 8.
    for _ in range(20):
        order, gaps = select_frames(list(range(9)), dynamic, rng, long_term_gap=5)
        assert all(g > 5 for g in gaps[:2]) and all(0 < g <= 5 for g in gaps[2:])


@pytest.mark.parametrize(
    "stage, refs",
    [("pretrain", {}), ("main", {"num_short_refs": 3}),
     ("dynamic", {"num_short_refs": 1, "num_long_refs": 1}),
     ("dynamic", {"num_short_refs": 3, "num_long_refs": 2})],
)  # fmt: skip
def test_demo_and_stage_ingest_configs_serve_their_stages(stage, refs):
    """configs/ingest/demo.yaml serves all three stages; each stage config serves its own."""
    from typedconfig import load_config

    rng = np.random.default_rng(0)
    cfg = _cfg(stage=stage, **refs)
    names = ["demo", stage]
    for name in names:
        offsets = list(load_config(IngestConfig, f"configs/ingest/{name}.yaml").offsets)
        gaps = {tuple(select_frames(offsets, cfg, rng)[1]) for _ in range(200)}
        if stage == "pretrain":
            assert {g[0] for g in gaps} == {2, 5, 8}
        else:
            assert all(sum(x > 15 for x in g) == refs.get("num_long_refs", 0) for g in gaps)


def test_clips_that_cannot_serve_the_stage_fail_loudly(shards):
    # Clips of span 9 hold no reference 15+ frames back. From a manifest: refused when the
    # loader is made, in both modes (an epoch loader used to yield nothing, silently).
    dst, _, _ = shards
    manifest, fix = str(dst / "manifest.json"), "Ingest with configs/ingest/dynamic.yaml"
    for make in (make_train_loader, make_epoch_loader):
        with pytest.raises(
            UnusableClip, match=f"manifest.json cannot serve stage 'dynamic'.*{fix}"
        ):
            make(manifest, _cfg(stage="dynamic"), rank=0, world_size=2, seed=0)
    with pytest.raises(UnusableClip, match="32x32, smaller than loader.crop_size=64"):
        make_train_loader(manifest, _cfg(crop_size=64), rank=0, world_size=1, seed=0)
    # From shard URLs: found while reading; no rank ends an epoch without its batches.
    urls = sorted(str(p) for p in dst.glob("shard-*.tar"))
    loader = make_train_loader(urls, _cfg(stage="dynamic"), rank=0, world_size=1, seed=0)
    with pytest.raises(UnusableClip, match=fix):
        next(iter(loader))
    epoch = make_epoch_loader(urls, _cfg(stage="dynamic"), rank=1, world_size=2, seed=0)
    with pytest.raises(RuntimeError, match="no usable sample in any of 5 shards"):
        list(epoch)


def test_corrupt_shards_are_skipped_counted_and_batches_stay_equal(shards, tmp_path, caplog):
    dst, manifest, stored = shards
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    data = (bad / "shard-000002.tar").read_bytes()  # the 8-sample shard
    (bad / "shard-000002.tar").write_bytes(data[: len(data) // 2])  # truncated
    (bad / "shard-000001.tar").write_bytes(np.random.default_rng(0).bytes(20000))  # garbage
    source = str(bad / "manifest.json")
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        loader = make_train_loader(source, _cfg(), rank=0, world_size=1, seed=0)
        batches = [b for _, b in zip(range(12), loader)]
    assert len(batches) == 12 and loader.stats["corrupt_shards"] >= 2
    assert any("corrupt shard" in r.message for r in caplog.records)
    garbage = {k for k, (record, _) in stored.items() if record["source"].endswith("v1.mp4")}
    assert len(garbage) == 4
    assert {k for b in batches for k in b["keys"]} <= set(stored) - garbage
    lens = []
    for rank in (0, 1):
        epoch = make_epoch_loader(source, _cfg(), rank=rank, world_size=2, seed=0)
        got = list(epoch)
        lens.append((len(epoch), len(got), sum(len(b["keys"]) for b in got)))
        assert {k for b in got for k in b["keys"]} <= set(stored) - garbage
        if rank == 1:
            assert epoch.stats["corrupt_shards"] >= 1 and epoch.stats["padded"] > 0
    assert lens[0] == lens[1] == (3, 3, 9)


def test_damaged_clip_bytes_that_still_decode_are_caught_by_their_checksum(shards, tmp_path):
    # 200 bytes overwritten inside a JPEG's entropy-coded data: OpenCV decodes garbage (libjpeg
    # only warns on stderr). The record's clip_sha256 catches it: skipped, warned, counted.
    dst, manifest, stored = shards
    with tarfile.open(dst / "shard-000001.tar") as tar:
        members = [(m.name, bytearray(tar.extractfile(m).read())) for m in tar.getmembers()]
    name, data = members[1]
    assert name.endswith(".lab.jpg") and json.loads(members[0][1])["clip_sha256"]
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_GRAYSCALE) is not None
    damaged = tmp_path / "shard-000001.tar"
    with tarfile.open(damaged, "w") as tar:
        for member, payload in members:
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(bytes(payload)))
    loader = make_epoch_loader([str(damaged)], _cfg(), rank=0, world_size=1, seed=0)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 4 and name.split(".")[0] not in keys  # 3 good ones, 1 padded repeat
    assert loader.stats["corrupt_samples"] == 1 and loader.stats["padded"] == 1


def test_malformed_samples_make_a_corrupt_shard(shards, tmp_path):
    # WebDataset's grouping refuses a duplicated member; a clip without its json is refused
    # by ours. Either way the shard is skipped and counted; good shards keep training going.
    dst, _, _ = shards
    with tarfile.open(dst / "shard-000000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert members[0][0].endswith(".json") and members[1][0].endswith(".lab.jpg")

    def write(name: str, items: list[tuple[str, bytes]]) -> str:
        with tarfile.open(tmp_path / name, "w") as tar:
            for member, data in items:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return str(tmp_path / name)

    dup = write("dup.tar", [*members[:2], members[1]])
    nojson = write("nojson.tar", [members[1]])
    with pytest.raises(ValueError, match="duplicate"):
        list(iter_shard(dup))
    with pytest.raises(ClipDecodeError, match="lacks a clip or its json"):
        list(iter_shard(nojson))
    good = str(dst / "shard-000000.tar")
    loader = make_train_loader([dup, nojson, good], _cfg(), rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(4), loader)]
    assert len(batches) == 4 and loader.stats["corrupt_shards"] >= 2


def test_loader_config_is_validated():
    with pytest.raises(ConfigError, match="pair_probs"):
        from_dict(LoaderConfig, {"pair_probs": [0.5, 0.2, 0.2]})
    with pytest.raises(ConfigError, match="stage"):
        from_dict(LoaderConfig, {"stage": "finetune"})
    assert from_dict(LoaderConfig, {"stage": "dynamic"}).clip_frames == 6
