"""A frame folder (a directory of numbered images) -> the RGB frames of one video, streamed.

YouTube-VOS and DAVIS ship their videos as folders of JPEG frames (`JPEGImages/<video>/00000.jpg
...`); a folder is a frame folder when it directly holds files named by a number with a JPEG or
PNG extension (`IMAGE_NAME`). Its frames are its images in number order; the numbering may step
by more than 1 (YouTube-VOS 2018 train folders hold every 5th frame of the 30 fps source, named
00000, 00005, ...: 6 fps), but not skip a step: a gap would make frames that are far apart look
consecutive to every training stage, so such a folder is refused, naming the missing numbers.

`FrameFolder.frames` feeds the clip cutting of `pipeline/decode.py` exactly as a video reader
does: (index, (H, W, 3) uint8 RGB) in index order, already resized by `codec.resize_frame` (the
same size and resize policy as videos). Images are read and decoded by a bounded thread pool
(`decoder_threads`; cv2.imdecode and cv2.resize release the GIL) a few frames ahead of the clip
cutting, so a long folder never sits in memory decoded. A JPEG shrunk by 2x or more is decoded
at reduced scale by libjpeg (`_reduction`), as FFmpeg scales videos while decoding.

Errors name the file and the fix: an unreadable image, an image whose size differs from the
first one's, gaps in the numbering, a folder without numbered images.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import re
from collections.abc import Generator, Iterable

import cv2
import numpy as np

import storage
from pipeline.codec import resize_frame, scaled_size

# "00000.jpg", "12.PNG": the number is the frame's position in the video.
IMAGE_NAME = re.compile(r"(\d+)\.(?:jpe?g|png)", re.IGNORECASE)
FIX_GAPS = "restore the missing images, or split the folder where the numbering breaks"
FIX_IMAGE = "replace the image (copy it again from the dataset) or remove the folder from SRC"
FIX_SIZES = "resize the frames to one size, or remove the folder from SRC"
FIX_EMPTY = "pass folders of numbered images (00000.jpg, 00001.png, ...) or video files"


class FrameFolderError(ValueError):
    """A frame folder that is not one readable video; `fix` says what to do about it (the
    worker appends it to the message it records)."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def numbered_images(names: Iterable[str]) -> list[tuple[int, str]]:
    """(number, name) of the names that are numbered images, sorted by number."""
    found = [(int(m.group(1)), n) for n in names if (m := IMAGE_NAME.fullmatch(n))]
    return sorted(found)


def holds_images(names: Iterable[str]) -> bool:
    """True when a folder holding `names` (directly) is a frame folder."""
    return any(IMAGE_NAME.fullmatch(n) for n in names)


def is_frame_folder(url: str) -> bool:
    """`url` is a directory (its images are then checked by `FrameFolder.open`)."""
    fs, path = storage.get_fs(url)
    return fs.isdir(path)


def numbering_problem(numbers: list[int]) -> str:
    """Why sorted frame numbers are not one video ("" when they are): a repeated number, or
    missing ones in the steps of the smallest difference (1 for DAVIS, 5 for YouTube-VOS)."""
    diffs = [b - a for a, b in zip(numbers, numbers[1:])]
    if not diffs:
        return ""
    if 0 in diffs:
        return f"two images are numbered {numbers[diffs.index(0)]}"
    step = min(diffs)
    missing: list[int] = []
    for a, d in zip(numbers, diffs):
        if d % step:
            return f"the numbering steps by {step} but {a + d} follows {a}"
        missing += range(a + step, a + d, step)
    if not missing:
        return ""
    shown = ", ".join(str(n) for n in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return f"gaps in the numbering (step {step}): {len(missing)} missing ({shown})"


def _reduction(height: int, width: int, size: tuple[int, int], policy: str) -> int:
    """JPEG decode scale 1/f (f in 1, 2, 4, 8; OpenCV's IMREAD_REDUCED_*): the largest that
    leaves the image at least the size it is resized to, so libjpeg skips the DCT detail that
    the INTER_AREA shrink would average away (at 720p -> 256x256, 1/2: decode + resize in
    0.6x the CPU time)."""
    out_w, out_h = scaled_size(height, width, size, policy)
    f = 8
    while f > 1 and (width < out_w * f or height < out_h * f):
        f //= 2
    return f


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip


class FrameFolder:
    """The numbered images of one folder: `open` lists them and reads the first one's size."""

    def __init__(self, url: str, names: list[str], height: int, width: int) -> None:
        self.url, self.names, self.height, self.width = url, names, height, width

    @property
    def num_frames(self) -> int:
        return len(self.names)

    @classmethod
    def open(cls, url: str) -> FrameFolder:
        """List the folder (one directory read) and read the first image's size from its header.
        Raises FrameFolderError naming the folder (no numbered images, gaps) or the image."""
        fs, path = storage.get_fs(url)
        if storage.is_local(url):
            names = os.listdir(path)  # names only: no stat per image
        else:
            names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        images = numbered_images(names)
        if not images:
            raise FrameFolderError(f"no numbered images in the folder {url}", FIX_EMPTY)
        if problem := numbering_problem([n for n, _ in images]):
            raise FrameFolderError(f"{url}: {problem}", FIX_GAPS)
        width, height = _image_size(storage.join(url, images[0][1]), _read(url, images[0][1]))
        return cls(url, [n for _, n in images], height, width)

    def frames(
        self, wanted: list[int], size: tuple[int, int], policy: str, threads: int
    ) -> Generator[tuple[int, np.ndarray], None, None]:
        """(index, (H, W, 3) uint8 RGB resized to `size` by `policy`) for the sorted frame
        indices `wanted`, decoded by `threads` threads at most 2 x threads frames ahead.
        Raises FrameFolderError naming an unreadable image or one of another size than the
        first."""
        reduction = _reduction(self.height, self.width, size, policy)
        threads = max(1, threads)
        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="frames")
        ahead: collections.deque[tuple[int, concurrent.futures.Future[np.ndarray]]] = (
            collections.deque()
        )
        try:
            for i in wanted:
                ahead.append((i, pool.submit(self._frame, i, reduction, size, policy)))
                if len(ahead) >= 2 * threads:
                    j, done = ahead.popleft()
                    yield j, done.result()
            while ahead:
                j, done = ahead.popleft()
                yield j, done.result()
        finally:  # also when the clips stop early: no decoding goes on behind them
            pool.shutdown(wait=True, cancel_futures=True)

    def _frame(self, index: int, reduction: int, size: tuple[int, int], policy: str) -> np.ndarray:
        """Image `index` read, decoded (at 1/reduction scale for JPEG), checked against the
        first image's size, converted to RGB and resized (in a pool thread)."""
        name = self.names[index]
        data = _read(self.url, name)
        url = storage.join(self.url, name)
        width, height = _image_size(url, data)  # the header: exact whatever the reduction
        if (height, width) != (self.height, self.width):
            raise FrameFolderError(
                f"mixed image sizes: {url} is {width}x{height}, the folder's first image "
                f"{self.names[0]} is {self.width}x{self.height} (width x height)",
                FIX_SIZES,
            )
        jpeg = not name.lower().endswith(".png")
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduction if jpeg else 1])
        if bgr is None:
            raise FrameFolderError(
                f"unreadable image {url} ({len(data)} bytes OpenCV cannot decode)", FIX_IMAGE
            )
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(resize_frame(rgb, size, policy))


def _read(folder: str, name: str) -> bytes:
    url = storage.join(folder, name)
    try:
        return storage.read_bytes(url)
    except OSError as e:
        raise FrameFolderError(f"cannot read the image {url}: {e}", FIX_IMAGE) from e


def _image_size(url: str, data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header (Pillow parses it without decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        what = "an empty file" if not data else f"{len(data)} bytes, not a JPEG or PNG image"
        raise FrameFolderError(f"unreadable image {url} ({what})", FIX_IMAGE) from e
