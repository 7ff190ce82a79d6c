"""Progress in a terminal is a tqdm bar; anywhere else, plain periodic lines."""

from __future__ import annotations

import io

from pipeline.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_plain_lines_without_carriage_returns_or_colour():
    out = io.StringIO()
    with progress(total=4, desc="DAVIS sequences", unit="seq", stream=out, interval_s=0) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(failed=0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per update (interval 0); the last count is not repeated
    assert lines[-1].startswith("DAVIS sequences: 4/4 seq (100%), ")
    assert lines[-1].endswith("seq/s, failed=0")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_lines_are_rate_limited_and_an_empty_total_writes_nothing():
    out = io.StringIO()
    with progress(total=100, desc="videos", unit="video", stream=out, interval_s=3600) as bar:
        for _ in range(100):
            bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # the final one only
    empty = io.StringIO()
    with progress(total=0, desc="videos", unit="video", stream=empty):
        pass
    assert empty.getvalue() == ""  # no "0video [00:00, ?video/s]" on a rerun with nothing to do
    quiet = io.StringIO()
    with progress(total=3, desc="x", unit="step", stream=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == "" and bar.n == 3


def test_a_terminal_gets_the_tqdm_bar():
    term = Terminal()
    with progress(total=2, desc="steps", unit="step", stream=term) as bar:
        bar.update(2)
    assert type(bar).__name__ == "tqdm" and "\r" in term.getvalue()
