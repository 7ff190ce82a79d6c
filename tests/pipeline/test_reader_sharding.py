"""Input listing (directory, glob, .txt/.csv/.parquet), append-only shard plans, config checks,
config hashes that keep shard sets written by earlier versions valid."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from pipeline.config import IngestConfig
from pipeline.decode import clip_starts
from pipeline.manifest import Problem, build_manifest
from pipeline.reader import InputError, list_videos
from pipeline.shard_stats import accepted_hashes, config_hash, read_done, recorded_videos
from pipeline.sharding import (
    AssignmentError,
    ShardSpec,
    assign,
    load_assignment,
    plan_shards,
    recover_plan,
)
from pipeline.summary import summary_table
from typedconfig import ConfigError, from_dict, load_config, replace

EXT = ("mp4", "mov")


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mp4", "a/b/y.MOV", "a/b/z.mp4", "a/readme.txt"):
        (tmp_path / name).write_bytes(b"0")
    return tmp_path


def test_directory_glob_and_single_file(tree):
    d = str(tree / "a")
    assert list_videos(d, EXT) == [f"{d}/b/y.MOV", f"{d}/b/z.mp4", f"{d}/x.mp4"]
    assert list_videos(f"{d}/**/*.mp4", EXT) == [f"{d}/b/z.mp4", f"{d}/x.mp4"]
    assert list_videos(f"{d}/x.mp4", EXT) == [f"{d}/x.mp4"]
    with pytest.raises(InputError, match="does not exist"):
        list_videos(str(tree / "nope"), EXT)


def test_list_files_resolve_relative_and_deduplicate(tree):
    (tree / "l.txt").write_text("# comment\na/x.mp4\n\na/x.mp4\n/abs/missing.mp4\n")
    assert list_videos(str(tree / "l.txt"), EXT) == ["/abs/missing.mp4", f"{tree}/a/x.mp4"]
    pd.DataFrame({"path": ["a/b/z.mp4", "a/x.mp4"]}).to_csv(tree / "l.csv", index=False)
    assert list_videos(str(tree / "l.csv"), EXT) == [f"{tree}/a/b/z.mp4", f"{tree}/a/x.mp4"]
    pd.DataFrame({"path": ["a/x.mp4"]}).to_parquet(tree / "l.parquet")
    assert list_videos(str(tree / "l.parquet"), EXT) == [f"{tree}/a/x.mp4"]
    pd.DataFrame({"file": ["a/x.mp4"]}).to_csv(tree / "bad.csv", index=False)
    with pytest.raises(InputError, match="'path' column"):
        list_videos(str(tree / "bad.csv"), EXT)


def test_paths_are_absolute_literal_and_kept_byte_for_byte(tree, monkeypatch):
    # Relative inputs come out absolute, whatever the working directory (a video's path is
    # its identity); names with "::", "[...]" or bytes that are not UTF-8 are taken as they
    # are; a .txt list with a byte-order mark, CRLF lines and a latin-1 name reads as meant.
    monkeypatch.chdir(tree)
    d = str(tree / "a")
    assert list_videos("a/x.mp4", EXT) == [f"{d}/x.mp4"]
    assert list_videos("./a/b/../x.mp4", EXT) == [f"{d}/x.mp4"]
    for name in ("colon::x.mp4", "vids[2024].mp4"):
        (tree / name).write_bytes(b"0")
        assert list_videos(name, EXT) == [f"{tree}/{name}"]
    (tree / "d[1]").mkdir()
    (tree / "d[1]" / "v.mp4").write_bytes(b"0")
    assert list_videos("d[1]", EXT) == [f"{tree}/d[1]/v.mp4"]
    latin1 = os.fsdecode(b"caf\xe9.mp4")
    (tree / latin1).write_bytes(b"0")
    (tree / "l.txt").write_bytes(b"\xef\xbb\xbfa/x.mp4\r\n" + bytes(tree) + b"/caf\xe9.mp4\r\n")
    assert list_videos("l.txt", EXT) == [f"{tree}/a/x.mp4", f"{tree}/{latin1}"]
    assert os.path.isfile(list_videos("l.txt", EXT)[1])
    (tree / "l.csv").write_bytes(b"path\r\na/x.mp4\r\ncaf\xe9.mp4\r\n")  # .csv likewise
    assert list_videos("l.csv", EXT) == [f"{tree}/a/x.mp4", f"{tree}/{latin1}"]


def test_shard_plan_is_deterministic_and_append_only(tmp_path):
    videos = [f"v{i}" for i in (5, 1, 3, 2, 4)]
    plan = plan_shards(videos, [], 2)
    assert plan == [["v1", "v2"], ["v3", "v4"], ["v5"]]
    grown = plan_shards(videos + ["v0", "v6"], plan, 2)
    assert grown[:3] == plan and grown[3:] == [["v0", "v6"]]  # new shards only
    specs = assign(videos, str(tmp_path), 2)
    assert [s.name for s in specs] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert load_assignment(str(tmp_path)) == plan
    again = assign(videos + ["v0"], str(tmp_path), 2)
    assert [list(s.videos) for s in again] == plan + [["v0"]]


def test_unreadable_assignment_is_rebuilt_from_the_done_shards_or_refused(tmp_path):
    videos = [f"v{i}" for i in (5, 1, 3, 2, 4)]
    for garbage in (b"{", b"\xff", b"[]", b'{"shards": "v1"}', b'{"shards": [[1]]}'):
        (tmp_path / "assignment.json").write_bytes(garbage)
        with pytest.raises(AssignmentError, match=f"{tmp_path}/assignment.json is not valid"):
            load_assignment(str(tmp_path))
    with pytest.raises(AssignmentError):  # nothing to rebuild it from
        assign(videos, str(tmp_path), 2)
    # Never appended to: the first-run plan, which agrees with every shard recorded.
    first = [["v1", "v2"], ["v3", "v4"], ["v5"]]
    assert recover_plan(videos, {}, 2, "x") == first
    assert recover_plan(videos, {1: ["v3", "v4"], 2: ["v5"]}, 2, "x") == first
    # Appended to (v0 came later, as shard 3): the done shards 0..k-1, the rest packed after.
    grown = [*first, ["v0", "v6"]]
    done = {i: shard for i, shard in enumerate(grown[:3])}
    assert recover_plan([*videos, "v0", "v6"], done, 2, "x") == grown
    assert recover_plan([*videos, "v0", "v6"], {**done, 3: ["v0", "v6"]}, 2, "x") == grown
    # A done shard after one without stats, and the first-run plan disagrees: refused.
    with pytest.raises(AssignmentError, match=r"^why, .*shard 1 has no valid stats file while "
                       r"shard 3 has.*Rerun with --overwrite"):  # fmt: skip
        recover_plan([*videos, "v0", "v6"], {0: first[0], 3: ["v0", "v6"]}, 2, "why")
    # assign() rebuilds and rewrites it from what `recorded` returns.
    specs = assign([*videos, "v0", "v6"], str(tmp_path), 2, lambda: done)
    assert [list(s.videos) for s in specs] == grown == load_assignment(str(tmp_path))


def test_stats_files_that_are_not_valid_make_their_shard_not_done(tmp_path, caplog):
    spec = ShardSpec(0, ("v.mp4",), str(tmp_path))
    (tmp_path / spec.name).write_bytes(b"")
    good = {"config_hash": config_hash(IngestConfig()), "num_samples": 0, "num_frames": 0,
            "bytes": 0, "sha256": "", "videos": [{"path": "v.mp4", "status": "ok", "clips": 0,
            "message": ""}]}  # fmt: skip
    stats = tmp_path / "shard-000000.stats.json"
    for content, problem in [
        (b"", "JSONDecodeError"),
        (b"\xff{}", "UnicodeDecodeError"),
        (b"[1]", "not a JSON object"),
        (json.dumps({**good, "videos": None}), "no valid 'videos'"),
        (json.dumps({**good, "tars": [{"name": 1}]}), "an entry of 'tars': no valid 'name'"),
        (json.dumps({**good, "videos": [{"path": "v"}]}), "an entry of 'videos': no valid 'status'"),
    ]:  # fmt: skip
        stats.write_bytes(content.encode() if isinstance(content, str) else content)
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.shard_stats"):
            assert read_done([spec], IngestConfig()) == {}
        assert f"{stats} is not a valid stats file ({problem}" in caplog.text
        assert "writing its shard again" in caplog.text
        assert recorded_videos(str(tmp_path)) == {}
    stats.write_text(json.dumps(good))
    assert read_done([spec], IngestConfig()) == {0: good}
    assert recorded_videos(str(tmp_path)) == {0: ["v.mp4"]}


def test_relative_paths_recorded_by_earlier_versions_match_absolute_input(tmp_path, monkeypatch):
    # Earlier versions recorded list entries relative to the run's working directory; the
    # input is absolute now: the same videos, so no new shards (duplicates) on a rerun.
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    old = {"videos_per_shard": 2, "shards": [["in/v1.mp4", "in/v2.mp4"]]}
    (dst / "assignment.json").write_text(json.dumps(old))
    specs = assign([f"{tmp_path}/in/v2.mp4", f"{tmp_path}/in/v1.mp4"], str(dst), 2)
    assert [list(s.videos) for s in specs] == old["shards"]  # recorded as they were


def test_clip_starts():
    cfg = from_dict(IngestConfig, {"clip_len": 3, "frame_step": 2})  # span 5
    assert clip_starts(4, cfg) == []
    assert clip_starts(12, cfg) == [0, 5]
    assert clip_starts(12, from_dict(IngestConfig, {"clip_len": 3, "clip_stride": 1}))[-1] == 9
    spread = from_dict(IngestConfig, {"clip_len": 3, "frame_step": 2, "clips_per_video": 3})
    assert clip_starts(25, spread) == [0, 10, 20]
    assert clip_starts(6, spread) == [0, 1]


def test_config_validation_and_shipped_configs():
    with pytest.raises(ConfigError, match="frame_offsets"):
        from_dict(IngestConfig, {"frame_offsets": [1, 4]})
    with pytest.raises(ConfigError, match="storage"):
        from_dict(IngestConfig, {"storage": "webp"})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(IngestConfig, {"clip_length": 3})
    with pytest.raises(ConfigError, match="shard_mb"):
        from_dict(IngestConfig, {"shard_mb": -1})
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(IngestConfig, {"dtype": "float32"})
    with pytest.raises(ConfigError, match=r"size=\[100000, 256\] must be \[height, width\]"):
        from_dict(IngestConfig, {"size": [100000, 256]})
    for bad in ({"storage": "jpeg"}, {"storage": "png"}, {"storage": "raw", "lab": "uint8"}):
        with pytest.raises(ConfigError, match="set storage=raw and lab=float"):
            from_dict(IngestConfig, {"dtype": "float16", **bad})
    assert from_dict(IngestConfig, {"dtype": "float16", "storage": "raw"}).dtype == "float16"
    dyn = load_config(IngestConfig, "configs/ingest/dynamic.yaml")
    assert dyn.offsets[-1] - dyn.offsets[0] >= 45 and dyn.span == 50  # ROI dilation 4 too
    for name in ("pretrain", "main"):
        cfg = load_config(IngestConfig, f"configs/ingest/{name}.yaml")
        assert cfg.span <= 15
    assert load_config(IngestConfig, "configs/ingest/demo.yaml", ["size=[64,64]"]).size == (64, 64)


# The demo's shard set as written at 0c7a8fc, before shard_mb existed (its content fields).
DEMO_0C7A8FC = {"frame_offsets": [0, 4, 8, 16, 18, 20, 21], "clips_per_video": 32,
                "size": [128, 128], "storage": "jpeg", "lab": "uint8", "videos_per_shard": 1}  # fmt: skip


def test_config_hashes_keep_shard_sets_already_written_valid(tmp_path):
    # Pinned: a change here makes reruns refuse every shard set written so far. A new content
    # field goes into shard_stats.LATER_FIELDS (hashed only off its default), which keeps these.
    assert config_hash(IngestConfig()) == "93e95ae2819813ef"
    demo = from_dict(IngestConfig, DEMO_0C7A8FC)
    assert config_hash(demo) == "e2c88d154355f80c"
    # Shard sets written before shard_mb was hashed: the hash a real one (0c7a8fc) recorded.
    assert accepted_hashes(demo) == {"e2c88d154355f80c", "91a72e6365899f78"}
    split = replace(demo, shard_mb=5)  # content no earlier version could write
    assert accepted_hashes(split) == {config_hash(split)}
    # A rerun takes a done shard of either hash as done, and refuses any other config.
    spec = ShardSpec(0, ("v.mp4",), str(tmp_path))
    (tmp_path / spec.name).write_bytes(b"")
    for recorded in ("91a72e6365899f78", "e2c88d154355f80c"):
        stats = {"config_hash": recorded, "num_samples": 0, "num_frames": 0, "bytes": 0,
                 "sha256": "", "videos": []}  # fmt: skip
        (tmp_path / "shard-000000.stats.json").write_text(json.dumps(stats))
        assert read_done([spec], demo) == {0: stats}
        # The manifest keeps the set's hash, so its content hash (the lineage) stays too.
        assert build_manifest([spec], {0: stats}, {}, demo).config_hash == recorded
    with pytest.raises(ConfigError, match="different ingest config.*--overwrite"):
        read_done([spec], replace(demo, quality=90))


def test_videos_that_stopped_early_are_listed_as_problems():
    # "ok" with the clips before a decode error: in the manifest's problems and the summary,
    # not only in the shard's stats file. A non-UTF-8 path prints.
    name = os.fsdecode(b"/v/caf\xe9.mp4")
    videos = [
        {"path": "/v/a.mp4", "status": "ok", "clips": 3, "message": ""},
        {"path": name, "status": "ok", "clips": 2, "message": "stopped after 2 clips: X"},
    ]
    stats = {"config_hash": "h", "num_samples": 5, "num_frames": 10, "bytes": 9, "sha256": "",
             "videos": videos}  # fmt: skip
    manifest = build_manifest(
        [ShardSpec(0, ("/v/a.mp4", name), "/o")], {0: stats}, {}, IngestConfig()
    )
    assert manifest.problems == (Problem(name, "ok", "stopped after 2 clips: X"),)
    table = summary_table(manifest)
    assert "ok 2 (1 stopped early)" in table and "stopped after 2 clips" in table
    table.encode("utf-8")
