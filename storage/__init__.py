"""Ground floor: files. Local paths and fsspec URLs behind one API (`storage.fs`), atomic
writes (`storage.atomic`), run-directory places local or on an object store (`storage.location`),
an exclusive lock on an output (`storage.lock`) and the packaged
sample videos (`storage.samples`). Imports no other package of this project.

    from storage import atomic_write_bytes, join, read_text
"""

from storage.atomic import (
    TMP_MARK,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    fsync_dir,
    tmp_tag,
)
from storage.fs import (
    exists,
    get_fs,
    is_local,
    join,
    list_names,
    list_sizes,
    local_copy,
    makedirs,
    not_a_directory,
    read_bytes,
    read_text,
    remove,
    strip_file,
    to_url,
)
from storage.location import Location, ObjectPath, append_text, as_location, remove_tree
from storage.lock import (
    LockError,
    LockHeld,
    LockLost,
    OutputLock,
    live_owner,
    new_run_id,
    read_lock,
)
from storage.samples import SAMPLE_VIDEOS, sample_video_dir

__all__ = [
    "LockError",
    "LockHeld",
    "LockLost",
    "Location",
    "ObjectPath",
    "OutputLock",
    "SAMPLE_VIDEOS",
    "TMP_MARK",
    "append_text",
    "as_location",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "exists",
    "fsync_dir",
    "get_fs",
    "is_local",
    "join",
    "list_names",
    "list_sizes",
    "live_owner",
    "local_copy",
    "makedirs",
    "new_run_id",
    "not_a_directory",
    "read_bytes",
    "read_lock",
    "read_text",
    "remove",
    "remove_tree",
    "sample_video_dir",
    "strip_file",
    "tmp_tag",
    "to_url",
]
