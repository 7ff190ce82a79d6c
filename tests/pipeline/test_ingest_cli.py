"""The ingest CLI's up-front errors: named key or path and a fix, exit code 1, before Ray
starts; --help lists every config key with its default."""

from __future__ import annotations

import pytest

from jobs.ingest import main, parse_args


def test_bad_input_and_config_fail_fast_with_clear_messages(tmp_path, capsys):
    # One `error: ...` line on stderr, as train and evaluate print theirs (no log timestamp).
    out = str(tmp_path / "out")
    assert main(parse_args(["--input", str(tmp_path / "nope"), "--output", out])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: input ") and "does not exist; pass a directory, a glob" in err
    assert err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(parse_args(["--input", str(tmp_path / "empty"), "--output", out])) == 1
    assert "names no videos" in capsys.readouterr().err
    args = ["--input", str(tmp_path), "--output", out, "storage=webp"]
    assert main(parse_args(args)) == 1
    err = capsys.readouterr().err
    assert "error: storage='webp' is not allowed; choose one of ['jpeg', 'png', 'raw']" in err
    assert not (tmp_path / "out").exists()


def test_help_lists_config_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for line in ("clip_len = 2", "frame_offsets = ()", "storage = 'jpeg'", "max_in_flight = 0"):
        assert line in text


def test_output_that_is_a_file_fails_fast(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "f")])) == 1
    err = capsys.readouterr().err
    assert (
        f"error: --output {tmp_path / 'f'} is a file; give a directory path for the shards" in err
    )
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "f" / "sub" / "out")]
    assert main(parse_args(args)) == 1
    err = capsys.readouterr().err
    assert f"is under {tmp_path / 'f'}, a file; give a directory path for the shards" in err


@pytest.mark.ray
def test_tasks_no_node_can_hold_and_runs_without_clips_exit_1(tmp_path, capsys):
    # task_cpus above every node's CPUs used to wait forever (Ray's warning went to its
    # worker logs); a run where no video gave a clip exited 0 (tests/pipeline/
    # test_ingest_no_clips.py: what it writes now, which is no tar and no manifest).
    import ray

    from pipeline.distributor import ray_may_grow

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.mp4").write_text("not a video\n")
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    try:
        assert main(parse_args([*args, "task_cpus=64"])) == 1
        assert "error: task_cpus=64 but the largest Ray node has" in capsys.readouterr().err
        assert not ray_may_grow()  # main started this instance: no node will join it
        assert main(parse_args(args)) == 1
        out, err = capsys.readouterr()
        assert f"error: no video in {tmp_path / 'in'} gave a clip (0 skipped, 1 failed;" in err
        assert "per frame -" in out  # not the empty tar's bytes over 0 frames
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
            "assignment.json", "shard-000000.stats.json"]  # fmt: skip
    finally:
        ray.shutdown()
