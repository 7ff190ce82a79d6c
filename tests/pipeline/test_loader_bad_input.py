"""One bad sample never stops training or blows up memory. Every bad input is made for real:
tar files written with tarfile, JPEG/PNG/.npy headers declaring huge clips, a gzip tar with a
1 GiB member of zeros; each is read by the real loader beside good samples (the 3 clips ingest
wrote in tests/fixtures/main_dc3dea1), and the stream must go on with the good samples, move
the right counter, warn with the shard and key, and keep the epoch's batch counts equal."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.clip_stream
from pipeline.codec import encode_clip
from pipeline.config import LoaderConfig
from pipeline.loader import iter_shard, make_epoch_loader, make_train_loader
from pipeline.manifest import ClipLayout
from pipeline.shard_reader import MAX_RECORD_BYTES, member_cap
from tests.bad_inputs.craft import Zeros, jpeg_declaring, npy_declaring, png_declaring, write_tar
from typedconfig import from_dict

REPO = Path(__file__).resolve().parents[2]
LEGACY = REPO / "tests" / "fixtures" / "main_dc3dea1" / "shards"
GOOD = list(iter_shard(str(LEGACY / "shard-000000.tar")))  # 3 clips: 8 frames of 32x32, jpeg
GOOD_KEYS = {key for key, *_ in GOOD}
BAD = "badbadbadbadbad0_c0000"


def _cfg(**kw) -> LoaderConfig:
    base = dict(stage="pretrain", batch_size=2, num_workers=0, crop_size=32, shuffle_buffer=2)
    return from_dict(LoaderConfig, {**base, **kw})


def _bytes(obj) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def _members(key: str, record, ext: str, clip) -> list[tuple[str, bytes | int]]:
    """A sample's (member name, bytes or a count of zero bytes) pair."""
    return [(f"{key}.json", _bytes(record)), (f"{key}.{ext}", clip)]


def _good(i: int) -> list[tuple[str, bytes | int]]:
    return _members(*GOOD[i])


def _bad(record_changes=None, ext="lab.jpg", clip=None, record=None):
    """The bad sample: a good record (its own checksum) with `record_changes`, or `record`."""
    clip = GOOD[0][3] if clip is None else clip
    if record is None:
        record = {**GOOD[0][1], "key": BAD}
        if isinstance(clip, bytes):
            record["clip_sha256"] = hashlib.sha256(clip).hexdigest()
        for name, value in (record_changes or {}).items():
            if value is _DROP:
                record.pop(name)
            else:
                record[name] = value
    return _members(BAD, record, ext, clip)


_DROP = object()


def write_shard(root: Path, bad_members, name: str = "case") -> str:
    """<root>/<name>.tar holding good 0, the bad sample, good 1 and good 2, and a manifest
    beside it (the fixture's layout: 8 frames of 32x32); returns the manifest's path."""
    root.mkdir(parents=True, exist_ok=True)
    write_tar(root / f"{name}.tar", [*_good(0), *bad_members, *_good(1), *_good(2)])
    manifest = json.loads((LEGACY / "manifest.json").read_text())
    manifest.update(shards=[f"{name}.tar"], samples_per_shard=[4], num_samples=4)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / "manifest.json")


JPEG_BOMB = jpeg_declaring(52500, 20000)  # 348-ish bytes, 1.05 Gpx
PNG_BOMB = png_declaring(14000, 14000)  # 196 Mpx
NPY_BOMB = npy_declaring((8, 3, 1 << 20, 1 << 19))  # 12 TiB
TIB = 1 << 40


def test_crafted_headers_declare_what_they_claim(monkeypatch):
    with pytest.raises(Image.DecompressionBombError):  # what crashed the stream before
        Image.open(io.BytesIO(PNG_BOMB))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow reads the headers only
    assert Image.open(io.BytesIO(PNG_BOMB)).size == (14000, 14000)
    assert len(JPEG_BOMB) < 400 and Image.open(io.BytesIO(JPEG_BOMB)).size == (20000, 52500)
    header = io.BytesIO(NPY_BOMB)
    assert np.lib.format.read_magic(header) == (1, 0)
    shape, _, dtype = np.lib.format.read_array_header_1_0(header)
    assert math.prod(shape) * dtype.itemsize > 9 * TIB and len(NPY_BOMB) < 300
    # Every fixture record carries its checksum: the default (verified clips only) reads them.
    assert all(re.fullmatch("[0-9a-f]{64}", rec["clip_sha256"]) for _, rec, _, _ in GOOD)


def _damaged_jpeg() -> bytes:
    data = bytearray(GOOD[0][3])
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)  # still decodes: to garbage
    return bytes(data)


# (case, the bad sample's members, counter moved, what the warning says)
CASES = [
    ("missing frame_indices", _bad({"frame_indices": _DROP}), "bad_samples", "frame_indices is None"),
    ("empty frame_indices", _bad({"frame_indices": []}), "bad_samples", r"frame_indices is \[\]"),
    ("null record", _bad(record=b"null"), "bad_samples", "JSON NoneType, not an object"),
    ("non-JSON record", _bad(record=b"{frame_indices: [0, 2"), "bad_samples", "not JSON"),
    ("string frame_indices", _bad({"frame_indices": ["0", "2"] * 4}), "bad_samples", "must be ints"),
    ("decreasing frame_indices", _bad({"frame_indices": [8, 7, 6, 5, 4, 3, 2, 1]}), "bad_samples",
     "strictly increase"),
    ("negative frame_indices", _bad({"frame_indices": list(range(-1, 7))}), "bad_samples", "ints in"),
    ("frame count not the layout's", _bad({"frame_indices": list(range(7))}), "bad_samples",
     "7 frame_indices; the manifest's clips hold 8"),
    ("string fps", _bad({"fps": "fast"}), "bad_samples", "fps is 'fast': expected a number"),
    ("int clip_sha256", _bad(record={**GOOD[0][1], "key": BAD, "clip_sha256": 123}), "bad_samples",
     "clip_sha256 is '123'"),
    ("bool clip_index", _bad({"clip_index": True}), "bad_samples", "clip_index is 'True'"),
    ("storage not the member's", _bad({"storage": "png"}), "bad_samples", "storage 'png'"),
    ("another sample's key", _bad({"key": "other"}), "bad_samples", "names key 'other'"),
    ("npy header claiming TiB", _bad({"storage": "raw"}, "lab.npy", NPY_BOMB), "bad_samples",
     r"header declares \(8, 3, 1048576, 524288\)"),
    ("PNG bomb header", _bad({"storage": "png"}, "lab.png", PNG_BOMB), "bad_samples",
     r"header declares \(14000, 14000\)"),
    ("JPEG declaring 20000x52500", _bad(clip=JPEG_BOMB), "bad_samples",
     r"header declares \(52500, 20000\)"),
    ("clip size not the manifest's", _bad(clip=encode_clip(np.zeros((8, 3, 48, 48), np.uint8),
     "jpeg")[1]), "bad_samples", r"declares \(1152, 48\); the manifest's layout"),
    ("member over the cap", _bad(clip=200_000), "bad_samples", "of 200,000 bytes is over its cap"),
    ("record over the cap", _bad(record=b" " * (MAX_RECORD_BYTES + 1)), "bad_samples",
     "json of 1,048,577 bytes is over its cap"),
    ("record without clip_sha256", _bad({"clip_sha256": _DROP}), "unverified_samples",
     "set loader.allow_unverified_clips=true"),
    ("clip bytes not matching clip_sha256",
     _bad(record={**GOOD[0][1], "key": BAD}, clip=_damaged_jpeg()), "corrupt_samples",
     "do not match the clip_sha256"),
]  # fmt: skip


def check_stream(source, counter: str, message: str, caplog, bad_key: str = BAD) -> None:
    """The good samples flow on, `counter` moved, one warning names the shard, key, reason;
    the resampled stream is seeded as before; 2 ranks get equal epochs."""
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        loader = make_train_loader(source, _cfg(), rank=0, world_size=1, seed=1)
        batches = [b for _, b in zip(range(6), loader)]
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 12 and set(keys) == GOOD_KEYS  # the shard re-read 4 times, bad skipped
    stats = loader.stats
    assert stats[counter] >= 1 and stats["samples"] >= 12
    assert sum(v for k, v in stats.items() if k not in ("samples", counter)) == 0, stats
    warned = [r.getMessage() for r in caplog.records if bad_key in r.getMessage()]
    assert len(warned) == 1 and re.search(message, warned[0]), warned
    assert "case.tar" in warned[0] and counter in warned[0]
    again = make_train_loader(source, _cfg(), rank=0, world_size=1, seed=1)
    assert [b["keys"] for _, b in zip(range(6), again)] == [b["keys"] for b in batches]
    epochs = []
    for rank in (0, 1):
        epoch = make_epoch_loader(source, _cfg(batch_size=1), rank=rank, world_size=2, seed=0)
        got = list(epoch)
        assert {k for b in got for k in b["keys"]} <= GOOD_KEYS
        epochs.append((len(epoch), len(got), epoch.stats[counter], epoch.stats["padded"]))
    # 4 samples: rank 0 reads good 0 and the bad one (padded), rank 1 goods 1 and 2.
    assert epochs == [(2, 2, 1, 1), (2, 2, 0, 0)]


@pytest.mark.parametrize("case, members, counter, message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_sample_is_skipped_counted_and_warned(case, members, counter, message, tmp_path,
                                                     caplog):  # fmt: skip
    check_stream(write_shard(tmp_path, members), counter, message, caplog)


def test_unverified_clips_are_read_with_the_option(tmp_path):
    source = write_shard(tmp_path, _bad({"clip_sha256": _DROP}))
    cfg = _cfg(batch_size=1, allow_unverified_clips=True)
    loader = make_epoch_loader(source, cfg, rank=0, world_size=1, seed=0)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted([*GOOD_KEYS, BAD]) and loader.stats["unverified_samples"] == 0
    assert loader.stats["padded"] == 0


def test_bad_samples_are_counted_across_dataloader_workers(tmp_path):
    source = write_shard(tmp_path, _bad(record=b"null"))
    loader = make_train_loader(source, _cfg(num_workers=2), rank=0, world_size=1, seed=0)
    keys = [k for _, b in zip(range(8), loader) for k in b["keys"]]
    assert len(keys) == 16 and set(keys) == GOOD_KEYS
    assert loader.stats["bad_samples"] >= 2  # both workers read the shard, and count


def test_any_exception_opening_or_sampling_one_clip_skips_it(tmp_path, caplog, monkeypatch):
    # What no check foresees (MemoryError, ZeroDivisionError, ...) skips the one sample too.
    other = "badbadbadbadbad1_c0000"
    members = [*_bad(), *_members(other, {**GOOD[1][1], "key": other}, "lab.jpg", GOOD[1][3])]
    write_tar(tmp_path / "case.tar", [*_good(0), *members, *_good(1), *_good(2)])
    open_sample, make_sample = pipeline.clip_stream.open_sample, pipeline.clip_stream.make_sample

    def failing_open(sample, *args):
        if sample.key == BAD:
            raise MemoryError("Unable to allocate 9.50 TiB")
        return open_sample(sample, *args)

    def failing_sample(lab, frame_indices, *args):
        if frame_indices == GOOD[1][1]["frame_indices"] and not failing_sample.once:
            failing_sample.once = True  # the renamed copy of good 1 comes first
            raise ZeroDivisionError("division by zero")
        return make_sample(lab, frame_indices, *args)

    failing_sample.once = False
    monkeypatch.setattr(pipeline.clip_stream, "open_sample", failing_open)
    monkeypatch.setattr(pipeline.clip_stream, "make_sample", failing_sample)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        loader = make_epoch_loader([str(tmp_path / "case.tar")], _cfg(batch_size=1,
                                   shuffle_buffer=0), rank=0, world_size=1, seed=0)  # fmt: skip
        keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(loader) == 5 and set(keys) == GOOD_KEYS  # 2 padded
    assert loader.stats["bad_samples"] == 2 and loader.stats["padded"] == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "MemoryError while decoding: sample " + BAD in text
    assert "ZeroDivisionError while sampling: sample " + other in text


def test_a_resampled_stream_of_nothing_but_bad_samples_raises(tmp_path):
    write_tar(tmp_path / "bad.tar", _bad(record=b"null"))
    loader = make_train_loader([str(tmp_path / "bad.tar")], _cfg(), rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="1000 samples in a row skipped as bad data"):
        next(iter(loader))
    epoch = make_epoch_loader([str(tmp_path / "bad.tar")], _cfg(), rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="no usable sample in any of 1 shards"):
        list(epoch)


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tars_are_told_by_their_bytes_and_read(mode, tmp_path):
    # Named .tar: the compression is found from the first bytes, not the name.
    url = write_tar(tmp_path / "shard.tar", [*_good(0), *_good(1), *_good(2)], mode)
    magic = Path(url).read_bytes()[:6]
    assert magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"
    loader = make_epoch_loader([url], _cfg(batch_size=1), rank=0, world_size=1, seed=0)
    assert sorted(k for b in loader for k in b["keys"]) == sorted(GOOD_KEYS)
    assert loader.stats["corrupt_shards"] == 0


def test_unreadable_shards_are_skipped_and_the_good_ones_read(tmp_path, caplog):
    # zstd (not readable here) and a pax header of 2 MiB (tarfile would read it whole).
    zstd = tmp_path / "zstd.tar"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(1000))
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w") as tar:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, 2 << 20
        tar.addfile(info, Zeros(2 << 20))
    good = str(LEGACY / "shard-000000.tar")
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        loader = make_train_loader([str(zstd), str(pax), good], _cfg(), rank=0, world_size=1,
                                   seed=0)  # fmt: skip
        keys = {k for _, b in zip(range(30), loader) for k in b["keys"]}
    assert keys == GOOD_KEYS and loader.stats["corrupt_shards"] >= 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "zstd-compressed shard" in text and "tar header member of 2,097,152 bytes" in text


def test_member_cap_follows_the_layout():
    assert member_cap(ClipLayout((0, 2, 4, 8), (32, 32))) == 4 * 4 * 3 * 32 * 32 + 65536
    assert member_cap(ClipLayout()) == 256 * 2**20 + 65536  # unknown: 64 Mi values x 4 bytes


# -- memory: in a fresh process, the big ones with no manifest (the layout unknown) -----------
MEASURE = r"""
import json, resource, sys
from pipeline.config import LoaderConfig
from pipeline.loader import make_epoch_loader

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

cfg = LoaderConfig(stage="pretrain", crop_size=32, num_workers=0, batch_size=1, shuffle_buffer=0)
good, cases = sys.argv[1], json.loads(sys.argv[2])
list(make_epoch_loader([good], cfg, rank=0, world_size=1, seed=0))  # warm: imports, decoders
base, out = peak_mb(), {}
for name, url in cases.items():
    before, runs = peak_mb(), []
    for rank in (0, 1):
        loader = make_epoch_loader([url], cfg, rank=rank, world_size=2, seed=0)
        batches = list(loader)
        runs.append([len(loader), len(batches), [k for b in batches for k in b["keys"]],
                     loader.stats])
    out[name] = {"growth_mb": peak_mb() - before, "runs": runs}
print(json.dumps({"growth_mb": peak_mb() - base, "cases": out}))
"""


@pytest.mark.slow
def test_bombs_are_refused_in_bounded_memory(tmp_path):
    shards = {}
    for name, members in [
        ("jpeg", _bad(clip=JPEG_BOMB)),
        ("png", _bad({"storage": "png"}, "lab.png", PNG_BOMB)),
        ("npy", _bad({"storage": "raw"}, "lab.npy", NPY_BOMB)),
    ]:
        shards[name] = write_tar(tmp_path / f"{name}.tar", [*_good(0), *members, *_good(1),
                                                              *_good(2)])  # fmt: skip
    # A 1 GiB member of zeros in a gzip tar (about 1 MB on disk), named .tar.
    gz = write_tar(tmp_path / "gzip.tar", [*_good(0), *_bad(clip=1 << 30), *_good(1), *_good(2)],
                   "w:gz", compresslevel=6)  # fmt: skip
    assert Path(gz).stat().st_size < 8 << 20
    shards["gzip"] = gz
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(LEGACY / "shard-000000.tar"), json.dumps(shards)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, case in result["cases"].items():
        (len0, n0, keys0, stats0), (len1, n1, keys1, stats1) = case["runs"]
        assert (len0, n0, len1, n1) == (2, 2, 2, 2), name  # equal batch counts on 2 ranks
        assert set(keys0 + keys1) == GOOD_KEYS, name
        assert stats0["bad_samples"] == 1 and stats0["padded"] == 1, (name, stats0)
        assert stats1["bad_samples"] == 0 and stats1["corrupt_shards"] == 0, (name, stats1)
        assert case["growth_mb"] < 200, (name, case["growth_mb"])
    assert result["growth_mb"] < 200, result
