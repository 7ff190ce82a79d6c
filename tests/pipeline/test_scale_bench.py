"""bench/scale.py's checks at a small size: the loader's epoch plans over many ranks and
DataLoader workers, and the ingest driver's rerun of a simulated completed run (the figures
at a million inputs and 64 ranks are `python -m bench.scale`'s)."""

from __future__ import annotations

import json
import math
import os

from bench import scale
from pipeline.config import IngestConfig
from pipeline.manifest import read_manifest
from pipeline.shard_stats import read_done
from pipeline.sharding import ShardSpec, load_assignment, plan_shards


def test_epoch_plans_of_8_ranks_by_2_workers_cover_every_sample_in_equal_batches(tmp_path):
    figures = scale.loader_figures(tmp_path, 200, ranks=8, workers=2, children=False)
    total = read_manifest(str(tmp_path / "manifest.json")).num_samples
    assert figures["loader_samples"] == total > 200 * 50
    assert figures["loader_equal_batches"] is True
    assert figures["loader_8_ranks_equal_batches"] is True
    assert figures["loader_batches_per_rank"] == math.ceil(math.ceil(total / 8) / 12)
    assert figures["loader_epoch_coverage"] == 1.0
    # Padding only evens the ranks out: fewer than one sample per rank read twice.
    assert 0 <= figures["loader_epoch_padding"] * total < 8


def test_rerun_of_a_simulated_completed_run_has_nothing_to_write_and_starts_no_ray(tmp_path):
    cfg = IngestConfig()
    template = scale.template_shard(tmp_path, cfg)
    sim = scale.simulate_done(tmp_path, 2000, cfg, template)
    dst = sim["dst"]
    specs = [ShardSpec(i, tuple(v), dst) for i, v in enumerate(load_assignment(dst))]
    assert len(specs) == sim["shards"] == 125
    # The simulated stats are what the worker writes: the resume check takes every shard as
    # done, and a tar of another size than its stats record makes that shard not done.
    assert sorted(read_done(specs, cfg)) == list(range(125))
    with open(os.path.join(dst, "shard-000007.tar"), "r+b") as f:
        f.truncate(5)
    assert sorted(read_done(specs, cfg)) == [i for i in range(125) if i != 7]
    with open(os.path.join(dst, "shard-000007.tar"), "r+b") as f:
        f.truncate(json.loads(open(os.path.join(dst, "shard-000007.stats.json")).read())["bytes"])

    run, peak_gb = scale.in_child(["--child-rerun", sim["list"], dst])  # the real driver
    assert run["nothing_to_write"] is True
    assert run["imported_ray"] is False
    assert (run["shards"], run["videos"], run["problems"]) == (125, 2000, 2000 // 100)
    manifest = read_manifest(os.path.join(dst, "manifest.json"))
    clips = template["ok"]["clips"]
    assert manifest.num_samples == clips * (2000 - 20)
    assert manifest.videos == {"total": 2000, "ok": 1980, "skipped": 0, "failed": 20}
    assert all("no such file" in p.message for p in manifest.problems)
    assert 0 < peak_gb < 2


def test_shard_plan_matches_recorded_paths_in_any_spelling_of_the_same_absolute_path():
    recorded = [["/d/v.mp4", "/d/.hidden/w.mp4"]]
    given = ["/d/./v.mp4", "/d//v.mp4", "/d/x/../v.mp4", "/d/.hidden/w.mp4", "/d/hidden/w.mp4"]
    # Only /d/hidden/w.mp4 is new: the others name recorded videos.
    assert plan_shards(given, recorded, 4) == [recorded[0], ["/d/hidden/w.mp4"]]
