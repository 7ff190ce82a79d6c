"""`python -m jobs.checkpoint convert PATH [PATH ...]`: rewrite a trusted checkpoint written
before checkpoints held only tensors (its numpy RNG state is pickled as numpy objects) in
today's format, in place and atomically.

    python -m jobs.checkpoint convert runs/ray/demo-pretrain/checkpoint_00000004

PATH is a checkpoint directory (its .pt files are converted, then its marker is rewritten with
every file's sha256 and size), a file inside one (the same), or any other .pt file (converted
alone). This is the one place that calls `torch.load(weights_only=False)`: only for the files
the user named, because naming them is the user's statement that they trust them. What a file
held that weights_only refuses is turned into tensors and numbers (numpy arrays -> tensors,
numpy scalars -> Python numbers); anything else (a class, a function: not what jobs.train ever
wrote) is refused and the file is left as it was.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.checkpoint import (
    MARKER_FILE,
    MARKER_FORMAT,
    STATE_FILE,
    load_checkpoint,
    numpy_rng_tensors,
    read_checkpoint_file,
    read_marker,
)
from jobs.tensor_files import (
    CheckpointError,
    UnsafeFileError,
    file_record,
    load_tensors,
    read_bytes,
    tensor_bytes,
    write_file,
)
from storage import TMP_MARK

log = logging.getLogger("jobs.checkpoint")


def tensors_only(value: Any) -> Any:
    """`value` with numpy arrays as tensors and numpy scalars as Python numbers."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: tensors_only(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(tensors_only(v) for v in value)
    return value


def converted_bytes(data: bytes, file: Path) -> bytes | None:
    """`data` (the bytes of `file`) in the tensors-only format; None if it is in it already."""
    try:
        load_tensors(data, file)
        return None
    except UnsafeFileError:
        pass
    log.warning("loading %s with weights_only=False: you named it to convert it", file)
    value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    rng = value.get("rng") if isinstance(value, dict) else None
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        rng["numpy"] = numpy_rng_tensors(rng["numpy"])  # the form jobs.checkpoint writes
    safe = tensor_bytes(tensors_only(value))
    try:
        load_tensors(safe, file)
    except UnsafeFileError as e:
        raise CheckpointError(
            f"cannot convert {file}: after converting numpy values it still holds other "
            f"objects ({e}); it is not a file jobs.train wrote, and it was left as it was"
        ) from None
    return safe


def checkpoint_files(directory: Path, marker: dict[str, Any]) -> list[str]:
    """The files a checkpoint directory is made of (an old marker lists none: what is there)."""
    if "files" in marker:
        return sorted(marker["files"])
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name != MARKER_FILE and TMP_MARK not in p.name
        and not p.name.startswith(".")
    )  # fmt: skip


def convert(path: str | Path) -> list[Path]:
    """Convert `path` (module docstring) in place; return the files rewritten."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file() and (path.parent / MARKER_FILE).exists():
        path = path.parent  # the marker records the file's hash: rewrite both
    if path.is_file():
        safe = converted_bytes(read_bytes(path), path)
        if safe is not None:
            write_file(path, safe)
        return [path] if safe is not None else []
    marker = read_marker(path)  # CheckpointError if it was never finished
    names = checkpoint_files(path, marker)
    if STATE_FILE not in names:
        raise CheckpointError(f"{path} has no {STATE_FILE}: not a checkpoint directory")
    rewritten, contents = [], {}
    for name in names:
        data = read_checkpoint_file(path, name, marker)  # a marker's hashes must hold: no
        safe = converted_bytes(data, path / name) if name.endswith(".pt") else None  # blessing
        if safe is not None:  # of a file changed since
            write_file(path / name, safe)
            rewritten.append(path / name)
        contents[name] = safe if safe is not None else data
    records = {name: file_record(data) for name, data in contents.items()}
    marker = {**marker, "format": MARKER_FORMAT, "files": records, "converted": time.time()}
    write_file(path / MARKER_FILE, json.dumps(marker).encode())  # last, as a save writes it
    load_checkpoint(path)  # reads as a whole, or says why not
    return rewritten


def cli(argv: list[str] | None = None) -> int:
    """Exit code 0: every PATH is in today's format; 2: one could not be (an `error:` line)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser("convert", help="rewrite trusted old checkpoints")
    convert_parser.add_argument("paths", nargs="+", help="checkpoint directories or .pt files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in args.paths:
        try:
            rewritten = convert(path)
        except Exception as e:  # noqa: BLE001 - one line per PATH the user can act on
            print(f"error: {path}: {' '.join(str(e).splitlines())}", file=sys.stderr)
            return 2
        done = ", ".join(p.name for p in rewritten) or "nothing to convert"
        log.info("%s: %s (now loads with weights_only=True)", path, done)
    return 0
