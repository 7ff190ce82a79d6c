"""The ingest CLI's up-front errors: named key or path and a fix, exit code 1, before Ray
starts; --help lists every config key with its default."""

from __future__ import annotations

import logging

import pytest

from jobs.ingest import main, parse_args


def test_bad_input_and_config_fail_fast_with_clear_messages(tmp_path, caplog):
    out = str(tmp_path / "out")
    with caplog.at_level(logging.ERROR):
        assert main(parse_args(["--input", str(tmp_path / "nope"), "--output", out])) == 1
    assert "does not exist; pass a directory, a glob" in caplog.text
    caplog.clear()
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.ERROR):
        assert main(parse_args(["--input", str(tmp_path / "empty"), "--output", out])) == 1
    assert "names no videos" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        args = ["--input", str(tmp_path), "--output", out, "storage=webp"]
        assert main(parse_args(args)) == 1
    assert "storage='webp' is not allowed; choose one of ['jpeg', 'png', 'raw']" in caplog.text
    assert not (tmp_path / "out").exists()


def test_help_lists_config_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for line in ("clip_len = 2", "frame_offsets = ()", "storage = 'jpeg'", "max_in_flight = 0"):
        assert line in text


def test_output_that_is_a_file_fails_fast(tmp_path, caplog):
    (tmp_path / "f").write_text("x")
    with caplog.at_level(logging.ERROR):
        assert main(parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "f")])) == 1
    assert (
        f"--output {tmp_path / 'f'} is a file; give a directory path for the shards" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        args = ["--input", str(tmp_path), "--output", str(tmp_path / "f" / "sub" / "out")]
        assert main(parse_args(args)) == 1
    assert f"is under {tmp_path / 'f'}, a file; give a directory path for the shards" in caplog.text


@pytest.mark.ray
def test_tasks_no_node_can_hold_and_runs_without_clips_exit_1(tmp_path, caplog):
    # task_cpus above every node's CPUs used to wait forever (Ray's warning went to its
    # worker logs); a run where no video gave a clip exited 0.
    import ray

    from pipeline.distributor import ray_may_grow

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.mp4").write_text("not a video\n")
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    try:
        with caplog.at_level(logging.ERROR):
            assert main(parse_args([*args, "task_cpus=64"])) == 1
            assert "task_cpus=64 but the largest Ray node has" in caplog.text
            assert not ray_may_grow()  # main started this instance: no node will join it
            assert main(parse_args(args)) == 1
        assert "no video gave a clip" in caplog.text
    finally:
        ray.shutdown()
