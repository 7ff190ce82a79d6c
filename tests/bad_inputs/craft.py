"""Crafted bad files for the bad-input corpus and the loader's bad-input tests: tars written
member by member (a huge member streamed from zeros, never held in memory), and JPEG, PNG and
.npy headers that declare whatever size a test wants."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


class Zeros(io.RawIOBase):
    """`n` zero bytes, read in chunks: a 1 GiB member is never held in memory."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def write_tar(path: Path, members, mode: str = "w", **kw) -> str:
    with tarfile.open(path, mode, **kw) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tar.addfile(info, Zeros(data) if isinstance(data, int) else io.BytesIO(data))
    return str(path)


def jpeg_declaring(height: int, width: int) -> bytes:
    """A real 8x8 grayscale JPEG whose frame header (SOF0) declares height x width."""
    ok, data = cv2.imencode(".jpg", np.full((8, 8), 99, np.uint8))
    data = bytearray(data.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png_declaring(height: int, width: int) -> bytes:
    """A real 8x8 grayscale PNG whose IHDR (CRC fixed) declares height x width."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(64)
