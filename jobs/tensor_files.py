"""Files of tensors that load without running code: how checkpoints and registered models are
written and read back, byte for byte.

- Written: `torch.save` into memory (`tensor_bytes`), hashed (`file_record`: sha256 + size, what
  a checkpoint's marker records), then published atomically (`write_file`: temp file + rename).
- Read: `read_bytes` retries an I/O error (EIO, EACCES, a flaky mount) a few times, then raises
  `CheckpointReadError`: the file may be fine, so it is never taken for a corrupt one.
  `load_tensors` is `torch.load(weights_only=True)`: a file holding anything else (a pickle
  that would call code, or the numpy objects of checkpoints written before this format) is
  refused before anything of it is unpickled, with `UnsafeFileError` naming the file and the
  command that converts a trusted one (`python -m jobs.checkpoint convert PATH`).
- The kill -9 tests' hook (`kill_hook`): each write point of a save can SIGKILL the process.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from storage import Location, atomic_write

log = logging.getLogger(__name__)

CONVERT_COMMAND = "python -m jobs.checkpoint convert"
KILL_ENV = "MAST_TEST_KILL_AT"  # test hook, "<point>:<step>": see kill_hook
READ_ATTEMPTS = 3
READ_RETRY_S = 0.5  # times the attempt number


class CheckpointError(RuntimeError):
    """A checkpoint (or a registered model's file) is unreadable or does not fit the current
    config; the message says why."""


class UnsafeFileError(CheckpointError):
    """A file holds more than tensors: unpickling it could run code, so it was not loaded."""


class CheckpointReadError(CheckpointError):
    """A file could not be read (an I/O error, a permission) even after retries. The file may
    well be fine: it is not recorded as corrupt, and nothing falls back from it."""


def kill_hook(step: int) -> Callable[[str], None]:
    """What a save calls at each of its write points (`"<file>.tmp"`: its temporary file is
    written; `"<file>"`: renamed into place; the callers' own points after that). With the test
    hook MAST_TEST_KILL_AT=<point>:<step> set for this step, the point named SIGKILLs this very
    process (tests/jobs/test_checkpoint_kill.py); otherwise nothing. One environment lookup."""
    point, _, at_step = os.environ.get(KILL_ENV, "").rpartition(":")
    if not point or at_step != str(step):
        return lambda here: None

    def kill(here: str) -> None:
        if here == point:
            log.warning("%s=%s:%s: SIGKILL", KILL_ENV, point, step)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def tensor_bytes(value: Any) -> bytes:
    """`torch.save` of `value`, in memory: hashed before it is written."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def file_record(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_file(
    path: Location, data: bytes, kill: Callable[[str], None] = lambda here: None
) -> None:
    """Publish `data` at `path` atomically (`kill`: the write points `<name>.tmp`, `<name>`).

    On an object store the temporary file is local and the upload one PUT (`storage.atomic`).
    """

    def write(f) -> None:
        f.write(data)
        f.flush()  # in the temporary file (the OS keeps it) if the test hook kills here
        kill(f"{path.name}.tmp")

    atomic_write(str(path), write)
    kill(path.name)


def read_bytes(file: Location) -> bytes:
    """The bytes of `file`. An I/O error is retried, then raised as CheckpointReadError; a
    missing file raises FileNotFoundError (what that means is the caller's to say)."""
    attempt = 1
    while True:
        try:
            return file.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == READ_ATTEMPTS:
                raise CheckpointReadError(
                    f"cannot read {file} ({type(e).__name__}: {e}) after {READ_ATTEMPTS} "
                    "attempts; not recorded as corrupt: fix the storage or its permissions and "
                    "rerun"
                ) from e
            log.warning("reading %s failed (%s); retrying", file, e)
            time.sleep(READ_RETRY_S * attempt)
            attempt += 1


def unsafe_message(file: Location, calls: list[str], convert: Location) -> str:
    return (
        f"{file} may hold code: unpickling it would call "
        f"{', '.join(sorted(calls)) or 'objects torch.load(weights_only=True) refuses'}. It "
        "was NOT run (only tensors, numbers and containers are loaded). If you trust it (a "
        "checkpoint written by jobs.train before checkpoints held only tensors), convert it "
        f"once with: {CONVERT_COMMAND} {convert}"
    )


def load_tensors(data: bytes, file: Location, convert: Location | None = None) -> Any:
    """`torch.load(weights_only=True)` of `data`, the bytes of `file` (on the CPU).

    CheckpointError if it is not a file torch.save wrote; UnsafeFileError (nothing unpickled)
    if it holds anything but tensors, naming `convert` (default: `file`) in the fix.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The weights-only unpickler says the same for a refused global and for bytes that are
        # no pickle at all: a static scan of the pickle (it calls nothing) tells them apart.
        try:
            calls = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - not a zip file torch.save wrote: corrupt
            raise CheckpointError(f"{file} is corrupt ({type(e).__name__}: {e})") from None
        raise UnsafeFileError(unsafe_message(file, calls, convert or file)) from None
    except Exception as e:  # noqa: BLE001 - any other failure to load means a corrupt file
        raise CheckpointError(f"{file} is corrupt ({type(e).__name__}: {e})") from e
