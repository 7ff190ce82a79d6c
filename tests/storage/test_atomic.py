"""storage.atomic: a destination holds nothing or the whole file, also when the writer is
killed with SIGKILL mid-write; the file and its directory are fsynced before and after the
rename."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import storage

WRITER = """
import sys, time
from storage import atomic_write

def write(f):
    for i in range(10_000):
        f.write(b"x" * 4096)
        f.flush()
        if i == 100:
            print("writing", flush=True)
            time.sleep(30)  # killed here, a quarter of the way in

atomic_write(sys.argv[1], write)
"""


def test_publishes_the_whole_file_or_nothing(tmp_path):
    dst = tmp_path / "a" / "out.bin"
    dst.parent.mkdir()
    storage.atomic_write_bytes(str(dst), b"first")
    with pytest.raises(RuntimeError, match="boom"):

        def fail(f):
            f.write(b"half of the second")
            raise RuntimeError("boom")

        storage.atomic_write(str(dst), fail)
    assert dst.read_bytes() == b"first"  # the old content, not half of the new
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.bin"]  # no temp file left
    with storage.atomic_path(tmp_path / "b" / "img.png") as tmp:
        tmp.write_bytes(b"png")
    assert (tmp_path / "b" / "img.png").read_bytes() == b"png"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["img.png"]


def test_a_writer_killed_mid_write_leaves_no_partial_destination(tmp_path):
    dst = tmp_path / "out.bin"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(dst)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()  # readers never see the 400 KB written so far
    (tmp,) = tmp_path.iterdir()  # the writer's own temp file, named as a temp file
    assert storage.TMP_MARK in tmp.name and tmp.stat().st_size > 0


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    # A power loss cannot be produced here: count the fsyncs instead (the one mock allowed).
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage.atomic_write_bytes(str(tmp_path / "x.json"), b"{}")
    assert len(synced) == 2
    assert storage.TMP_MARK in Path(synced[0]).name and synced[1] == str(tmp_path)
    synced.clear()
    with storage.atomic_path(tmp_path / "y.png") as tmp:
        tmp.write_bytes(b"png")
    assert Path(synced[0]).name.startswith(".y.png.") and synced[1] == str(tmp_path)
