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
