"""storage.lock on local files, with real processes: one holder at a time (also when many
processes race for a free or a stale lock), a live holder's lock refused with its host, pid
and start, a dead one's taken over with a warning, heartbeats, a lost lock detected, temp
file names tagged with the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import storage

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
import storage
lock = storage.OutputLock(sys.argv[1], sys.argv[2])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""

# Waits for a start time, tries the lock, says how it went, holds a won lock for a while.
RACER = """
import sys, time
import storage
url, owner, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, at - time.time()))
try:
    lock = storage.OutputLock(url, owner)
    lock.acquire()
except storage.LockHeld:
    print("refused", flush=True)
    sys.exit(0)
print("won", flush=True)
time.sleep(3)
lock.release()
"""


def hold(url: str, owner: str) -> subprocess.Popen:
    """A real process holding the lock at `url` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, owner], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its pid is dead, not a zombie


def iso(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat()


def test_second_holder_is_refused_naming_the_holder_and_release_frees(tmp_path):
    url = str(tmp_path / "out" / ".ingest.lock")
    proc = hold(url, "run1")
    try:
        info = json.loads(Path(url).read_text())
        assert info["owner"] == "run1" and info["pid"] == proc.pid
        assert info["host"] == socket.gethostname()
        assert datetime.fromisoformat(info["started"]) <= datetime.fromisoformat(info["heartbeat"])
        with pytest.raises(storage.LockHeld) as refused:
            storage.OutputLock(url, "run2").acquire()
        message = str(refused.value)
        assert f"{tmp_path / 'out'} is locked by another run: run run1 on host " in message
        assert f"pid {proc.pid}, since {info['started']}" in message
        assert f"delete {url}" in message
        assert json.loads(Path(url).read_text())["owner"] == "run1"  # untouched
        assert storage.live_owner(url) == "run1"
    finally:
        kill(proc)
    # The holder died without releasing: the next run takes the lock over at once.
    with storage.OutputLock(url, "run3") as lock:
        assert storage.live_owner(url) == "run3" and lock.owner == "run3"
    assert not Path(url).exists() and storage.live_owner(url) == ""
    assert os.listdir(tmp_path / "out") == []


def test_stale_locks_are_taken_over_with_a_warning_live_ones_are_not(tmp_path, caplog):
    url = str(tmp_path / ".ingest.lock")
    proc = hold(url, "dead1")
    kill(proc)
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        with storage.OutputLock(url, "run2"):
            assert json.loads(Path(url).read_text())["owner"] == "run2"
    assert f"took over the lock {url} of run dead1 on host {socket.gethostname()}, pid " in (
        caplog.text
    )
    assert f"its process {proc.pid} is dead" in caplog.text
    # Another host: its pid means nothing here; its heartbeat decides.
    other = {"owner": "far1", "host": "elsewhere", "pid": 1, "started": iso(4000)}
    Path(url).write_text(json.dumps({**other, "heartbeat": iso(5)}))
    with pytest.raises(storage.LockHeld, match="run far1 on host elsewhere, pid 1"):
        storage.OutputLock(url, "run3", stale_after_s=60).acquire()
    Path(url).write_text(json.dumps({**other, "heartbeat": iso(3600)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        with storage.OutputLock(url, "run4", stale_after_s=60):
            pass
    assert "of run far1 on host elsewhere" in caplog.text and "heartbeat is 3600s old" in (
        caplog.text
    )
    # Not a lock (a creator killed before it wrote one): held while young, then stale.
    Path(url).write_bytes(b"")
    with pytest.raises(storage.LockHeld, match="an unreadable lock file"):
        storage.OutputLock(url, "run5").acquire()
    os.utime(url, (time.time() - 60, time.time() - 60))
    with storage.OutputLock(url, "run6"):
        assert storage.live_owner(url) == "run6"


def test_heartbeat_refreshes_and_a_lost_lock_stops_the_run(tmp_path):
    url = str(tmp_path / ".ingest.lock")
    lock = storage.OutputLock(url, "run1", heartbeat_s=0.3)
    lock.acquire()
    first = json.loads(Path(url).read_text())
    deadline = time.monotonic() + 10
    while (later := json.loads(Path(url).read_text()))["heartbeat"] == first["heartbeat"]:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.01)
    assert later["started"] == first["started"] and later["heartbeat"] > first["heartbeat"]
    lock.check()  # still ours
    # Right after a beat, another run takes the lock over (as if it had judged this one
    # stale; it writes the whole file at once): the next beat finds out.
    taken = {**later, "owner": "run2", "heartbeat": iso(0)}
    storage.atomic_write_bytes(url, json.dumps(taken).encode())
    while time.monotonic() < deadline:
        try:
            lock.check()
        except storage.LockLost as e:
            assert f"lost the lock {url}: another run took it over" in str(e)
            break
        time.sleep(0.02)
    else:
        pytest.fail("the lost lock was not detected")
    lock.release()  # leaves the other run's lock alone
    assert json.loads(Path(url).read_text()) == taken
    assert sorted(os.listdir(tmp_path)) == [".ingest.lock"]  # no heartbeat temp file left


@pytest.mark.slow
@pytest.mark.parametrize("start", ["free", "stale"])
def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path, start):
    url = str(tmp_path / ".ingest.lock")
    if start == "stale":  # a dead holder: the racers all try to take it over
        kill(hold(url, "dead1"))
    at = time.time() + 3  # all start at once, after their imports
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url, f"r{i}", str(at)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True) for i in range(6)]  # fmt: skip
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes
    assert not Path(url).exists() and os.listdir(tmp_path) == []


def test_temp_files_carry_the_tag(tmp_path):
    dst = tmp_path / "x.tar"
    seen = []
    storage.atomic_write(str(dst), lambda f: seen.append(os.listdir(tmp_path)), tag="abc123")
    (name,) = seen[0]
    assert name.startswith(f"x.tar{storage.TMP_MARK}abc123-") and storage.tmp_tag(name) == "abc123"
    storage.atomic_write(str(dst), lambda f: seen.append(os.listdir(tmp_path)))
    untagged = [n for n in seen[1] if n != "x.tar"][0]
    assert storage.tmp_tag(untagged) == "" and storage.tmp_tag("x.tar") is None
    assert storage.tmp_tag("shard-000000.tar.tmp-dead") == ""  # older versions' names
    assert os.listdir(tmp_path) == ["x.tar"]
    with pytest.raises(ValueError, match="must not contain"):
        storage.atomic_write_bytes(str(dst), b"", tag="a-b")
