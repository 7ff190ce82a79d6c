"""An exclusive lock on an output (a directory or an object-store prefix): one small JSON file
{"owner": run id, "host", "pid", "pid_namespace", "started", "heartbeat"} (ISO 8601 UTC).

    with OutputLock(join(dst, ".ingest.lock"), new_run_id()) as lock:
        ...  # lock.check() raises LockLost if another run has taken the lock over

- Created exclusively: locally `os.open(O_CREAT | O_EXCL)`; on S3 a PutObject with
  `If-None-Match: *` (412 if the key exists) through s3fs's botocore client (its endpoint and
  credentials). Of any number of concurrent creators one wins.
- Held unless stale: its pid is dead on this machine (same host name and pid namespace), or
  its heartbeat is older than `stale_after_s` (any host; clocks must agree well within that).
  A file that is not a lock (its creator died before writing it) is stale after a grace time.
- Takeover is a compare-and-swap on the content judged stale: S3 PutObject `If-Match: <ETag>`;
  locally a rename to a name of this run's (one renamer wins), a check, remove, create again.
- A daemon thread rewrites the heartbeat every `heartbeat_s` while the lock is ours (S3:
  `If-Match` on our last ETag; locally compare, then atomic replace); once it is not (another
  run judged this one stale), `check()` raises LockLost. Release: S3 DeleteObject `If-Match`;
  locally remove the file if it is ours.

Not guaranteed: other fsspec stores (gs://, ...) get no conditional write (exists-then-put:
two runs starting within one round trip may both hold the lock until the overwritten one's
next heartbeat stops it; a warning says so); locally a heartbeat racing a takeover is
compare-then-replace (only a run stopped for `stale_after_s` can be taken over at all).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from fsspec.asyn import sync

from storage.atomic import atomic_write_bytes, fsync_dir
from storage.fs import get_fs, is_local, makedirs, strip_file

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats
UNREADABLE_GRACE_S = 10.0  # a creator writes its lock microseconds after creating it
_ATTEMPTS = 5  # creations or takeovers lost to a concurrent run before giving up


class LockError(RuntimeError):
    """The output is locked by another run, or this run lost its lock."""


class LockHeld(LockError):
    pass


class LockLost(LockError):
    pass


def new_run_id() -> str:
    """A run's id: owner of its lock and tag of its temp files (no '-': see storage.atomic)."""
    return uuid.uuid4().hex[:12]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a zombie, killed and not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True  # no /proc


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data)
        datetime.fromisoformat(info["heartbeat"])
        if isinstance(info["owner"], str) and isinstance(info["pid"], int) and info["pid"] > 0:
            return {"host": "?", "started": "?", **info}
    except (ValueError, TypeError, KeyError):
        pass
    return None


def _beat_age(info: dict[str, Any]) -> float:
    return time.time() - datetime.fromisoformat(info["heartbeat"]).timestamp()


def describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "an unreadable lock file"
    return (
        f"run {info['owner']} on host {info['host']}, pid {info['pid']}, since "
        f"{info['started']} (heartbeat {_beat_age(info):.0f}s ago)"
    )


def stale_reason(info: dict[str, Any] | None, age_s: float, stale_after_s: float) -> str:
    """Why a lock (parsed `info`, file age `age_s`) is stale, or "" when it is held."""
    if info is None:
        grace = min(UNREADABLE_GRACE_S, stale_after_s)
        return f"it is not a lock file and {age_s:.0f}s old" if age_s > grace else ""
    here = info["host"] == socket.gethostname() and info.get("pid_namespace") == _pid_namespace()
    if here and not _alive(info["pid"]):
        return f"its process {info['pid']} is dead"
    beat = _beat_age(info)
    if beat > stale_after_s:
        return f"its heartbeat is {beat:.0f}s old (stale after {stale_after_s:g}s)"
    return ""


def _s3_code(e: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (e.g. PreconditionFailed)."""
    response = getattr(e, "response", None) or getattr(e.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _lost_race(e: OSError, *, creating: bool = False) -> bool:
    """Whether a conditional S3 request failed because the lock is not what it expected (when
    not `creating`, also because it is gone; a missing bucket is no race when creating)."""
    if isinstance(e, FileExistsError) or _s3_code(e) in ("PreconditionFailed", "409", "412",
                                                          "ConditionalRequestConflict"):  # fmt: skip
        return True
    return not creating and (isinstance(e, FileNotFoundError) or _s3_code(e) == "NoSuchKey")


class _PlainObject:
    """The lock in any fsspec store, conditions checked by reading first; tokens: its bytes."""

    def __init__(self, url: str, owner: str) -> None:
        self.fs, self.path = get_fs(url)
        self.owner = owner

    def create(self, data: bytes) -> Any:
        if self.fs.exists(self.path):
            raise FileExistsError(self.path)
        self._write(data)
        return data

    def read(self) -> tuple[bytes, Any, float]:
        """(content, token, age in seconds); FileNotFoundError when there is no lock."""
        data = self.fs.cat_file(self.path)
        info = self.fs.info(self.path)
        when = info.get("mtime") or info.get("LastModified") or info.get("updated")
        stamp = when.timestamp() if isinstance(when, datetime) else float(when or 0)
        return data, data, time.time() - stamp

    def _write(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def refresh(self, token: Any, data: bytes) -> Any:
        """Write `data` if the lock is still `token`: the new token, or None."""
        with contextlib.suppress(FileNotFoundError):
            if self.read()[1] == token:
                self._write(data)
                return data
        return None

    replace = refresh

    def delete(self, token: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.read()[1] == token:
                self.fs.rm_file(self.path)


class _LocalFile(_PlainObject):
    """The lock as a local (or shared-filesystem) file."""

    def create(self, data: bytes) -> bytes:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # FileExistsError
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(self.path))
        return data

    def _write(self, data: bytes) -> None:
        atomic_write_bytes(self.path, data, tag=self.owner)

    def replace(self, token: bytes, data: bytes) -> bytes | None:
        aside = f"{self.path}.stale-{self.owner}"
        try:
            os.rename(self.path, aside)  # of concurrent takers, one gets the file
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != token:  # a lock made after ours was judged: put it back, unless yet
            with contextlib.suppress(FileExistsError):  # another was made (its owner's
                os.link(aside, self.path)  # heartbeat then finds it changed and stops)
            os.remove(aside)
            return None
        os.remove(aside)
        try:
            return self.create(data)
        except FileExistsError:
            return None


class _S3Object(_PlainObject):
    """The lock as an S3 object, written with conditional PUTs; tokens are ETags."""

    def __init__(self, url: str, owner: str) -> None:
        super().__init__(url, owner)
        self.bucket, self.key, _ = self.fs.split_path(self.path)

    def _put(self, data: bytes, **condition: str) -> str:
        return self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
        )["ETag"]

    def create(self, data: bytes) -> str:
        try:
            return self._put(data, IfNoneMatch="*")
        except OSError as e:
            if _lost_race(e, creating=True):
                raise FileExistsError(self.key) from e
            raise

    def read(self) -> tuple[bytes, str, float]:
        r = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)  # body and ETag
        try:  # of one version: a compare-and-swap on the ETag swaps what was read
            data = sync(self.fs.loop, r["Body"].read)
        finally:
            r["Body"].close()
        return data, r["ETag"], time.time() - r["LastModified"].timestamp()

    def refresh(self, token: str, data: bytes) -> str | None:
        try:
            return self._put(data, IfMatch=token)
        except OSError as e:
            if _lost_race(e):
                return None
            raise

    replace = refresh

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except OSError as e:
            if _s3_code(e) != "NotImplemented":
                if _lost_race(e):
                    return  # not ours any more: left to its holder
                raise
            super().delete(token)  # a store without conditional deletes: check, then delete


_warned: set[str] = set()


def _store(url: str, owner: str) -> _PlainObject:
    if is_local(url):
        return _LocalFile(strip_file(url), owner)
    fs, _ = get_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"s3", "s3a"} & set(protocols) and hasattr(fs, "call_s3"):
        return _S3Object(url, owner)
    if protocols[0] not in _warned:
        _warned.add(protocols[0])
        log.warning("%s:// has no conditional writes here: two runs starting at the same "
                    "moment may both take %s until the next heartbeat", protocols[0], url)  # fmt: skip
    return _PlainObject(url, owner)


def read_lock(url: str, stale_after_s: float = STALE_AFTER_S) -> tuple[dict | None, str] | None:
    """(the lock at `url` parsed, or None if unreadable; why it is stale or ""); None if none."""
    try:
        data, _, age = _store(url, "").read()
    except FileNotFoundError:
        return None
    info = _parse(data)
    return info, stale_reason(info, age, stale_after_s)


def live_owner(url: str, stale_after_s: float = STALE_AFTER_S) -> str:
    """The run id holding the lock at `url`, or "" when there is no live lock."""
    info, stale = read_lock(url, stale_after_s) or (None, "")
    return info["owner"] if info and not stale else ""


class OutputLock:
    """The lock file `url` held by run `owner` (see the module docstring).

    Args:
        url: the lock file, e.g. `DST/.ingest.lock` (local path or fsspec URL).
        owner: this run's id (`new_run_id()`).
        heartbeat_s: seconds between heartbeats.
        stale_after_s: a heartbeat older than this makes a lock of another host stale.
    """

    def __init__(self, url: str, owner: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:  # fmt: skip
        self.url, self.owner = url, owner
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._store = _store(url, owner)
        self._token: Any = None
        self._lost, self._stop = "", threading.Event()
        self._thread: threading.Thread | None = None
        self._started = _now()

    def _content(self) -> bytes:
        info = {
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_namespace": _pid_namespace(), "started": self._started, "heartbeat": _now(),
        }  # fmt: skip
        return json.dumps(info, indent=1).encode()

    def acquire(self) -> None:
        """Take the lock, or a stale one over (with a warning); raises LockHeld naming the
        holder and the fix when a live run holds it."""
        makedirs(self.url.rsplit("/", 1)[0])
        self._stop, self._lost, info = threading.Event(), "", None
        for _ in range(_ATTEMPTS):
            with contextlib.suppress(FileExistsError):
                self._token = self._store.create(self._content())
                break
            try:
                data, token, age = self._store.read()
            except FileNotFoundError:
                continue  # released meanwhile: create again
            info = _parse(data)
            reason = stale_reason(info, age, self.stale_after_s)
            if not reason:
                raise LockHeld(self._held_message(info))
            self._token = self._store.replace(token, self._content())
            if self._token is not None:
                log.warning("took over the lock %s of %s: %s", self.url, describe(info), reason)
                break
            time.sleep(random.uniform(0.01, 0.1))  # another run changed it first: look again
        else:
            raise LockHeld(self._held_message(info))
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _held_message(self, info: dict[str, Any] | None) -> str:
        return (
            f"{self.url.rsplit('/', 1)[0]} is locked by another run: {describe(info)}. Wait for that run to "
            f"end, or stop it; a dead run's lock is taken over by the next run (on its host "
            f"at once, from another host once its heartbeat is {self.stale_after_s:g}s old). "
            f"If no run writes there, delete {self.url}"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                token = self._store.refresh(self._token, self._content())
            except Exception as e:  # thread boundary; a network error: the next beat retries
                log.warning("could not refresh the lock %s: %s", self.url, e)
                continue
            if token is None:  # this process was stopped or cut off for `stale_after_s`
                self._lost = f"lost the lock {self.url}: another run took it over; this run stops"
                log.error("%s", self._lost)
                return
            self._token = token

    def check(self) -> None:
        """Raise LockLost when another run has taken the lock over."""
        if self._lost:
            raise LockLost(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._token is not None and not self._lost:
            self._store.delete(self._token)
        self._token = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
