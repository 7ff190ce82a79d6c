"""Two ingests into one output cannot break each other, and damaged bookkeeping heals: the
lock on DST (refused while a live run holds it, taken over from a dead one; on a local
directory and on an S3-compatible server), temp files named per run, garbage stats files and
assignment.json, same-size damage to a tar found by --verify. Real files and processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_ingest
import test_ingest_s3
from ingest_media import write_video
from test_ingest import CFG, file_tree

import storage
from jobs.ingest import LOCK, clean, ingest, main, parse_args
from pipeline.config import IngestConfig
from pipeline.sharding import AssignmentError
from typedconfig import from_dict

pytestmark = pytest.mark.ray

# The fixtures of the neighbouring modules: a local Ray instance, a moto S3 server.
ray_local = test_ingest.ray_local
s3_server = test_ingest_s3.s3_server

ROOT = Path(__file__).resolve().parents[2]
ONE = {**CFG, "videos_per_shard": 1}
ARGS = [
    "clip_len=3",
    "frame_step=2",
    "clips_per_video=2",
    "size=[64,64]",
    "storage=png",
    "videos_per_shard=1",
]  # fmt: skip  (ONE as key=value overrides)

# A run in flight, as far as DST can tell: it holds the lock and is writing a temp tar.
RUN_IN_FLIGHT = """
import sys, time
import storage
dst, run = sys.argv[1], sys.argv[2]
lock = storage.OutputLock(storage.join(dst, ".ingest.lock"), run)
lock.acquire()
open(f"{dst}/shard-000009.tar{storage.TMP_MARK}{run}-0a1b2c3d", "wb").write(b"half a tar")
print("locked", flush=True)
time.sleep(600)
"""


def run_in_flight(dst: Path, run: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RUN_IN_FLIGHT, str(dst), run], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def unlocked(tree: Path | dict[str, bytes]) -> dict[str, bytes]:
    """The files of a DST (or a `file_tree` of one) but the lock (its heartbeat rewrites it)."""
    files = file_tree(tree) if isinstance(tree, Path) else tree
    return {n: b for n, b in files.items() if n != LOCK}


def lost(lock: storage.OutputLock) -> bool:
    try:
        lock.check()
    except storage.LockLost:
        return True
    return False


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def cli(src: Path, dst: Path, *extra: str, ray=None) -> subprocess.Popen:
    env = dict(os.environ)
    if ray is not None:
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs.ingest", "--input", str(src), "--output", str(dst),
           "--no-progress", *ARGS, *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture
def videos(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("b", "c", "d"):
        write_video(src / f"{name}.mp4", 8, 32, 32)
    return src


def test_a_run_into_a_locked_output_is_refused_and_changes_nothing(ray_local, videos, tmp_path):
    dst = tmp_path / "out"
    ingest(str(videos), str(dst), from_dict(IngestConfig, ONE), progress=False)
    holder = run_in_flight(dst, "live1")
    try:
        before = file_tree(dst)
        mtimes = {n: os.stat(dst / n).st_mtime_ns for n in before if n != LOCK}
        proc = cli(videos, dst, ray=ray_local)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        lock = json.loads((dst / LOCK).read_text())
        assert (
            f"{dst} is locked by another run: run live1 on host {socket.gethostname()}, "
            f"pid {holder.pid}, since {lock['started']}" in err
        )
        assert "Wait for that run to end, or stop it" in err and f"delete {dst / LOCK}" in err
        assert lock["owner"] == "live1" and unlocked(dst) == unlocked(before)  # no change
        assert {n: os.stat(dst / n).st_mtime_ns for n in mtimes} == mtimes
        # clean() spares the temp files of the run a live lock names (here the lock is not
        # even ours), and removes those of dead runs and of older versions.
        in_flight = f"shard-000009.tar{storage.TMP_MARK}live1-0a1b2c3d"
        for name in (f"shard-000001.tar{storage.TMP_MARK}dead7-12345678",
                     f"shard-000001.tar{storage.TMP_MARK}0a1b2c3d"):  # fmt: skip
            (dst / name).write_bytes(b"left over")
        clean(str(dst), "mine1", everything=False)
        assert unlocked(dst) == unlocked(before) and (dst / in_flight).is_file()
        clean(str(dst), "mine1", everything=True)
        assert sorted(os.listdir(dst)) == [LOCK, in_flight]
    finally:
        kill(holder)


def test_a_dead_runs_lock_is_taken_over_with_a_warning(ray_local, videos, tmp_path, caplog):
    dst = tmp_path / "out"
    dst.mkdir()
    holder = run_in_flight(dst, "dead1")
    kill(holder)  # kill -9: its lock and half-written tar stay behind
    with caplog.at_level(logging.WARNING):
        got = ingest(str(videos), str(dst), from_dict(IngestConfig, ONE), progress=False)
    assert (
        f"took over the lock {dst / LOCK} of run dead1 on host {socket.gethostname()}, "
        f"pid {holder.pid}" in caplog.text
    )
    assert f"its process {holder.pid} is dead" in caplog.text
    assert got["num_shards"] == 3 and got["incomplete_shards"] == {}
    # The dead run's temp file is gone (this run held the lock); so is the lock.
    assert sorted(os.listdir(dst)) == [
        "assignment.json", "manifest.json",
        *[f"shard-00000{i}.{ext}" for i in range(3) for ext in ("stats.json", "tar")],
    ]  # fmt: skip


@pytest.mark.slow
def test_two_concurrent_runs_one_runs_one_is_refused(ray_local, tmp_path):
    import shutil

    from ingest_media import sample_video_dir

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):  # real video: the run lasts well beyond the second one's start
        shutil.copy(sample_video_dir() / "bikes.mp4", src / f"v{i}.mp4")
    slow = ("max_in_flight=1", "clips_per_video=0")  # every clip of 6 videos, one at a time
    single = tmp_path / "single"
    first = cli(src, single, *slow, ray=ray_local)
    assert first.communicate(timeout=300) and first.returncode == 0
    both = tmp_path / "both"
    procs = [cli(src, both, *slow, ray=ray_local) for _ in range(2)]  # started together
    results = [(p.communicate(timeout=300)[1], p.returncode)[::-1] for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 3], [err[-2000:] for _, err in results]
    refused = next(err for rc, err in results if rc == 3)
    assert f"{both} is locked by another run: run " in refused
    assert f"pid {procs[[rc for rc, _ in results].index(0)].pid}, since " in refused
    assert file_tree(both) == file_tree(single)  # complete, byte for byte, no lock left


def test_garbage_stats_files_heal(ray_local, videos, tmp_path, caplog):
    dst = tmp_path / "out"
    cfg = from_dict(IngestConfig, ONE)
    ingest(str(videos), str(dst), cfg, progress=False)
    before = file_tree(dst)
    (dst / "shard-000001.stats.json").write_bytes(b'{"shard": "shard-000001.tar", "ind')  # torn
    (dst / "shard-000002.stats.json").write_text(json.dumps({"index": 2}))  # keys missing
    with caplog.at_level(logging.WARNING):
        again = ingest(str(videos), str(dst), cfg, progress=False)
    for i, problem in ((1, "JSONDecodeError"), (2, "no valid 'config_hash'")):
        assert f"{dst}/shard-00000{i}.stats.json is not a valid stats file ({problem}" in (
            caplog.text
        )
    assert again["incomplete_shards"] == {} and file_tree(dst) == before  # rewritten


def test_garbage_assignment_is_rebuilt_or_refused(ray_local, videos, tmp_path, caplog):
    dst = tmp_path / "out"
    cfg = from_dict(IngestConfig, ONE)
    ingest(str(videos), str(dst), cfg, progress=False)
    write_video(videos / "a.mp4", 8, 32, 32)  # sorts first; appended as shard 3
    first = ingest(str(videos), str(dst), cfg, progress=False)
    assert json.loads((dst / "assignment.json").read_text())["shards"][3] == [str(videos / "a.mp4")]
    before = file_tree(dst)
    # Garbage: rebuilt from the stats files of shards 0..3 (a first-run plan would put a.mp4
    # first, and the done shards' tars would then be taken for other videos).
    (dst / "assignment.json").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        again = ingest(str(videos), str(dst), cfg, progress=False)
    assert f"{dst}/assignment.json is not valid (" in caplog.text
    assert "rebuilt from the input and the shards' stats files" in caplog.text
    assert again["content_hash"] == first["content_hash"] and file_tree(dst) == before
    # With shard 1's stats also gone, shards 2 and 3 cannot be placed safely: refused.
    (dst / "assignment.json").write_text("[]")
    (dst / "shard-000001.stats.json").unlink()
    damaged = file_tree(dst)
    with pytest.raises(AssignmentError) as refused:
        ingest(str(videos), str(dst), cfg, progress=False)
    assert f"{dst}/assignment.json is not valid" in str(refused.value)
    assert "shard 1 has no valid stats file while shard 3 has" in str(refused.value)
    assert "Rerun with --overwrite" in str(refused.value)
    assert file_tree(dst) == damaged
    fresh = ingest(str(videos), str(dst), cfg, overwrite=True, progress=False)
    assert fresh["num_shards"] == 4 and fresh["num_samples"] == first["num_samples"]


def test_verify_finds_same_size_damage_and_rewrites_it(ray_local, videos, tmp_path, capsys):
    dst = tmp_path / "out"
    args = ["--input", str(videos), "--output", str(dst), "--no-progress", *ARGS]
    assert main(parse_args(args)) == 0
    before = file_tree(dst)
    tar = dst / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one byte flipped: the size stays
    tar.write_bytes(bytes(data))
    assert main(parse_args(args)) == 0  # sizes only: not seen
    assert tar.read_bytes() == bytes(data)
    capsys.readouterr()
    assert main(parse_args([*args, "--verify"])) == 0
    out = capsys.readouterr().out
    assert "verified 3 done shards against their sha256: 1 damaged, written again" in out
    assert file_tree(dst) == before  # the original bytes
    assert main(parse_args([*args, "--verify"])) == 0
    assert "verified 3 done shards against their sha256: 0 damaged" in capsys.readouterr().out


def test_lock_on_an_s3_compatible_server(s3_server, caplog):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("locks")
    url = "s3://locks/out/.ingest.lock"
    first = storage.OutputLock(url, "run1", heartbeat_s=0.3)
    first.acquire()
    info = json.loads(fs.cat_file("locks/out/.ingest.lock"))
    assert info["owner"] == "run1" and info["pid"] == os.getpid()
    # A second attempt on the same key: the conditional create (If-None-Match) is refused.
    with pytest.raises(storage.LockHeld) as refused:
        storage.OutputLock(url, "run2").acquire()
    assert f"s3://locks/out is locked by another run: run run1 on host {socket.gethostname()}" in (
        str(refused.value)
    )
    assert json.loads(fs.cat_file("locks/out/.ingest.lock"))["owner"] == "run1"
    # Heartbeats are conditional puts on our last ETag. Right after one, another run puts
    # its lock in place: the next heartbeat finds out, and release leaves that lock alone.
    deadline = time.monotonic() + 10
    while json.loads(fs.cat_file("locks/out/.ingest.lock"))["heartbeat"] == info["heartbeat"]:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.01)
    far = {"owner": "far1", "host": "elsewhere", "pid": 1, "started": info["started"]}
    fs.pipe_file("locks/out/.ingest.lock", json.dumps({**far, "heartbeat": "2000-01-01T00:00Z"}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not lost(first):
        time.sleep(0.05)
    assert lost(first)
    first.release()
    assert json.loads(fs.cat_file("locks/out/.ingest.lock"))["owner"] == "far1"
    # far1's heartbeat is old: the next run takes over (If-Match on far1's ETag), with a warning.
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        with storage.OutputLock(url, "run3"):
            assert storage.live_owner(url) == "run3"
    assert "took over the lock s3://locks/out/.ingest.lock of run far1 on host elsewhere" in (
        caplog.text
    )
    assert not fs.exists("locks/out/.ingest.lock")  # released: a conditional delete
    # An ingest into an S3 output another run holds is refused before it writes anything.
    fs.pipe_file("locks/in/a.mp4", b"not read")
    with storage.OutputLock("s3://locks/dst/.ingest.lock", "live2"):
        with pytest.raises(storage.LockHeld, match="s3://locks/dst is locked by .* run live2"):
            ingest("s3://locks/in/", "s3://locks/dst", from_dict(IngestConfig, ONE))
        fs.invalidate_cache()
        assert [p.rsplit("/", 1)[-1] for p in fs.ls("locks/dst")] == [LOCK]
