"""RGB frames -> stored Lab clips, and the compressed clip format of the shards.

Stored Lab (model/colour.py): uint8, OpenCV's 8-bit Lab layout, from float sRGB in [0, 1]:
    L8 = round(L * 255 / 100)   L in [0, 100]      -> [0, 255]
    a8 = round(a + 128)         a in about [-127, 127] -> [1, 255]
    b8 = round(b + 128)         b likewise
Quantisation error: <= 0.2 L units, <= 0.5 a/b units (before the codec).
`IngestConfig.dtype: float16` stores Lab unquantised instead, in Lab units (L in [0, 100],
a, b in about [-127, 127]; sRGB reaches a in [-86, 98], b in [-108, 95]): float16 rounding
is <= 0.03 L units and <= 0.03 a/b units (half a step of 0.0625 at |x| >= 64), and the clip
goes to `raw` storage only (6 bytes per pixel, no codec error). Training reads it the same
way (the loader normalises float clips to network-space float32).

Clip layout: a clip of T frames is the uint8 array (T, 3, H, W) (planes L, a, b per frame;
channel-first, the model's layout). In a shard it is stored as one 2-D grayscale image of
shape (T * 3 * H, W): the planes of all frames stacked vertically, frame-major
(frame 0 L, a, b, frame 1 L, a, b, ...). One decode per clip yields the whole clip, and the
Lab channels are never mixed by a colour transform (a JPEG of an RGB image would convert
to YCbCr and subsample chroma; here every plane is coded as luminance, at full resolution).
Formats (`IngestConfig.storage`), the member extension after the sample key:
    jpeg  `lab.jpg`  lossy, `quality` (default 95: on the sample videos at 256x256 the
                     error in stored levels is mean 0.7 (L) / 0.3 (a, b), 99th percentile
                     3 / 2, max 9 / 6, i.e. at worst 3.5 L units and 6 a/b units)
    png   `lab.png`  lossless
    raw   `lab.npy`  lossless, uncompressed numpy (T, 3, H, W) uint8 or float16
Bytes per frame and decode speed are measured by bench/loader.py (see its docstring).

Runs (`IngestConfig.run_len`, configs/ingest/default.yaml): a run of T consecutive frames is
ONE tar member (`run.jpg`, `run.png`, `run.npy`) holding T single-frame images back to back,
each what `encode_clip` makes of that frame alone. JPEG frames share their header (SOI to
the scan: tables and size, 318 bytes), stored once at the start (`header_bytes` in the
record); the record lists each frame's own length (`frame_bytes`) and its standalone image's
sha256 (`frame_sha256`). One member per run keeps tar members as few as with clips, and the
loader rebuilds, checks and decodes only the frames a sample uses (`run_frame`: a pretrain
pair decodes 2 of a run's 48). Per stored frame this costs what one tall image per clip does
(bench/layouts.py). A tool opening the member as an image sees frame 0.

Decoding reads a member's header first (`clip_header`: the SOF of a JPEG, the IHDR of a PNG,
the .npy header) and refuses, before allocating, a clip whose decoded size is not the one
expected (the manifest's layout) or, when that is unknown, exceeds MAX_CLIP_PIXELS: a
348-byte JPEG can declare 20000x52500 pixels, a .npy header 9.5 TiB.
"""

from __future__ import annotations

import hashlib
import io
import math

import cv2
import numpy as np

EXTENSIONS = {"jpeg": "lab.jpg", "png": "lab.png", "raw": "lab.npy"}
RUN_EXTENSIONS = {"jpeg": "run.jpg", "png": "run.png", "raw": "run.npy"}
# The extension of one frame of a run member, as a clip of one frame.
FRAME_EXTENSION = {run: EXTENSIONS[storage] for storage, run in RUN_EXTENSIONS.items()}
CLIP_EXTENSIONS = (*EXTENSIONS.values(), *RUN_EXTENSIONS.values())
STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))


# Stored values (frames x 3 planes x H x W) a clip may decode to when the expected size is
# unknown: 64 Mi, e.g. 8 frames of 1670x1670 or 64 frames of 590x590 (ingest allows frames up
# to 8192 pixels a side: a manifest's layout lifts the cap to its own size).
MAX_CLIP_PIXELS = 64 * 2**20


class ClipDecodeError(ValueError):
    """A stored clip cannot be decoded (corrupt member)."""


class ClipSizeError(ClipDecodeError):
    """A clip's header declares another size than expected (or one over MAX_CLIP_PIXELS, or
    a format ingest does not write): refused before anything is decoded."""


_TO_STORED = np.array([[255 / 100, 0, 0, 0], [0, 1, 0, 128], [0, 0, 1, 128]], np.float32)


def frame_to_stored_lab(
    frame: np.ndarray, method: str = "float", out: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB (rows may be strided, e.g. a crop view) -> (3, H, W) uint8 stored
    Lab, written into `out` when given.

    method "float" (default): cv2.cvtColor on float32 RGB in [0, 1], then quantised with
    round-half-even: within 1 level of model.colour.quantise_lab(rgb_to_lab(.)).
    method "uint8": OpenCV's fixed-point 8-bit conversion (same layout), about 5x faster,
    within 2 levels (mean 0.1): for ingest throughput when Lab conversion is the bottleneck.
    One frame at a time, split straight into planes (no transpose copy), so the worker
    converts each decoded frame once, even when clips overlap.
    """
    H, W, _ = frame.shape
    if method == "uint8":
        q = cv2.cvtColor(frame, cv2.COLOR_RGB2Lab)
    elif method == "float":
        rgb = np.multiply(frame, np.float32(1.0 / 255.0), dtype=np.float32)
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)  # L in [0, 100], a, b about [-127, 127]
        # (L * 2.55, a + 128, b + 128), then saturating round to uint8 (all values >= 0).
        q = cv2.convertScaleAbs(cv2.transform(lab, _TO_STORED))
    else:
        raise ValueError(f"lab conversion method {method!r}; choose 'float' or 'uint8'")
    if out is None:
        out = np.empty((3, H, W), np.uint8)
    cv2.split(q, [out[0], out[1], out[2]])  # writes into the (contiguous) plane views
    return out


# Exact float Lab (the formulas of model.colour.rgb_to_lab, OpenCV's constants): OpenCV's
# float cvtColor approximates the sRGB curve and the cube root (up to 0.4 Lab units off),
# which would waste float16's precision. sRGB -> linear is exact per uint8 value (a table).
_LINEAR = np.array(
    [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in np.arange(256) / 255],
    np.float32,
)
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
     [0.019334, 0.119193, 0.950227]]
)  # fmt: skip
_RGB_TO_XYZ_WHITE = (_RGB_TO_XYZ / np.array([[0.950456], [1.0], [1.088754]])).astype(np.float32)
_EPS = 0.008856


def frame_to_float16_lab(frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float16 Lab in Lab units (L in [0, 100]), the
    unquantised stored Lab of `IngestConfig.dtype: float16`: model.colour.rgb_to_lab to
    float32 precision, then rounded to float16."""
    H, W, _ = frame.shape
    t = cv2.transform(cv2.LUT(frame, _LINEAR), _RGB_TO_XYZ_WHITE)  # (H, W, 3) XYZ / white
    f = np.where(t > _EPS, np.cbrt(t), np.float32(7.787) * t + np.float32(16 / 116))
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    if out is None:
        out = np.empty((3, H, W), np.float16)
    ty = t[..., 1]
    out[0] = np.where(ty > _EPS, np.float32(116) * fy - np.float32(16), np.float32(903.3) * ty)
    out[1] = np.float32(500) * (fx - fy)
    out[2] = np.float32(200) * (fy - fz)
    return out


def frame_to_stored(
    frame: np.ndarray, method: str = "float", dtype: str = "uint8", out: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) stored Lab of `dtype`: uint8 (`frame_to_stored_lab`
    with `method`) or float16 (`frame_to_float16_lab`), written into `out` when given."""
    if dtype == "float16":
        return frame_to_float16_lab(frame, out)
    if dtype != "uint8":
        raise ValueError(f"stored Lab dtype {dtype!r}; choose 'uint8' or 'float16'")
    return frame_to_stored_lab(frame, method, out)


def rgb_to_stored_lab(
    frames: np.ndarray, method: str = "float", dtype: str = "uint8"
) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, 3, H, W) stored Lab of `dtype` (`frame_to_stored`)."""
    T, H, W, _ = frames.shape
    if dtype not in ("uint8", "float16"):
        raise ValueError(f"stored Lab dtype {dtype!r}; choose 'uint8' or 'float16'")
    out = np.empty((T, 3, H, W), dtype)
    for t in range(T):
        frame_to_stored(frames[t], method, dtype, out[t])
    return out


def scaled_size(height: int, width: int, size: tuple[int, int], policy: str) -> tuple[int, int]:
    """(width, height) a (height, width) frame is scaled to before the centre crop."""
    out_h, out_w = size
    if policy == "stretch":
        return out_w, out_h
    s = max(out_h / height, out_w / width)
    return max(out_w, round(width * s)), max(out_h, round(height * s))


def decoder_scales(height: int, width: int, size: tuple[int, int], policy: str) -> bool:
    """True when the frame shrinks to half its width or less: then FFmpeg's scaler (bicubic,
    with a support widened to the ratio, so no aliasing) resizes while it converts YUV to
    RGB, which costs less than converting the full frame and resizing with INTER_AREA
    (2.4x less decode + resize CPU for 1280x720 -> 256x256, bench/ingest.py). For milder
    scales OpenCV's bilinear resize after decoding is cheaper."""
    return scaled_size(height, width, size, policy)[0] * 2 <= width


def resize_frame(frame: np.ndarray, size: tuple[int, int], policy: str) -> np.ndarray:
    """(h, w, 3) -> (H, W, 3): "crop" scales the short side and centre-crops; "stretch".
    A frame the decoder already scaled (`decoder_scales`) is only cropped, as a view."""
    out_h, out_w = size
    h, w = frame.shape[:2]
    scaled = scaled_size(h, w, size, policy)
    if scaled == (w, h):  # already at size (scaled by the decoder): crop only
        top, left = (h - out_h) // 2, (w - out_w) // 2
        return frame[top : top + out_h, left : left + out_w]
    # INTER_AREA only pays for itself when shrinking by 2x or more (it averages whole pixel
    # blocks, avoiding aliasing; the threshold where the worker lets FFmpeg scale instead);
    # for milder scales bilinear looks the same at a third of the cost.
    interp = cv2.INTER_AREA if decoder_scales(h, w, size, policy) else cv2.INTER_LINEAR
    if policy == "crop":  # crop in source pixels first: only the kept region is resampled
        s = max(out_h / h, out_w / w)
        ch, cw = min(h, round(out_h / s)), min(w, round(out_w / s))
        top, left = (h - ch) // 2, (w - cw) // 2
        frame = frame[top : top + ch, left : left + cw]
    return cv2.resize(frame, (out_w, out_h), interpolation=interp)


# PNG goes through Pillow, not OpenCV: decord's bundled libpng/zlib, when decord is imported
# before cv2, breaks OpenCV's PNG codec in that process ("bad parameters to zlib").
def _png_encode(planes: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(planes).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _png_decode(data: bytes) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode != "L":
                return None
            return np.asarray(img).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def encode_clip(lab: np.ndarray, storage: str, quality: int = 95) -> tuple[str, bytes]:
    """(T, 3, H, W) stored Lab, uint8 (any storage) or float16 (raw) -> (extension, bytes)."""
    if lab.dtype not in STORED_DTYPES or lab.ndim != 4 or lab.shape[1] != 3:
        raise ValueError(f"expected (T, 3, H, W) uint8 or float16 Lab, got {lab.dtype} {lab.shape}")
    if lab.dtype != np.uint8 and storage != "raw":
        raise ValueError(f"{lab.dtype} Lab can only be stored raw, not as {storage}")
    T, _, H, W = lab.shape
    if storage == "raw":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(lab), allow_pickle=False)
        return EXTENSIONS["raw"], buf.getvalue()
    planes = np.ascontiguousarray(lab.reshape(T * 3 * H, W))  # frame-major stacked planes
    if storage == "jpeg":
        ok, data = cv2.imencode(".jpg", planes, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif storage == "png":
        return EXTENSIONS["png"], _png_encode(planes)
    else:
        raise ValueError(f"storage={storage!r}; choose one of {list(EXTENSIONS)}")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {planes.shape} {storage} image")
    return EXTENSIONS[storage], data.tobytes()


def _shared_header(parts: list[bytes]) -> int:
    """Bytes every JPEG of `parts` starts with up to its scan (SOI, APP0, DQT, SOF, DHT: the
    same for every frame of one size and quality), or 0 (PNG, raw, or frames that differ)."""
    if not parts or parts[0][:2] != b"\xff\xd8":
        return 0
    end = parts[0].find(b"\xff\xda")  # SOS: entropy-coded data follows
    header = parts[0][: max(end, 0)]
    return len(header) if end > 0 and all(p.startswith(header) for p in parts) else 0


def encode_run(
    lab: np.ndarray, storage: str, quality: int = 95
) -> tuple[str, bytes, int, list[int], list[str]]:
    """(T, 3, H, W) stored Lab of a run -> (extension, member bytes, shared header bytes,
    byte length and sha256 of each frame): module docstring. A frame's sha256 is that of its
    standalone image (the shared header, then its own bytes)."""
    parts = [encode_clip(lab[t : t + 1], storage, quality)[1] for t in range(len(lab))]
    digests = [hashlib.sha256(p).hexdigest() for p in parts]
    h = _shared_header(parts)
    body = b"".join([parts[0][:h], *(p[h:] for p in parts)])
    return RUN_EXTENSIONS[storage], body, h, [len(p) - h for p in parts], digests


def run_frame(data: bytes, header: int, starts: list[int], frame_bytes: list[int], t: int) -> bytes:
    """The standalone image of frame `t` of a run member: its `header` shared bytes, then the
    frame's own (`starts` = their offsets, `header` + cumulative `frame_bytes`;
    pipeline/records.py checks they tile the member)."""
    return data[:header] + data[starts[t] : starts[t] + frame_bytes[t]]


# JPEG frame headers (SOFn; C4, C8 and CC are DHT, JPG and DAC), and the markers without a
# length field (TEM, RSTn).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) of a JPEG's first frame header, the one libjpeg decodes;
    the segments before it (APPn, DQT, DHT, ...) are skipped by their lengths."""
    if data[:2] != b"\xff\xd8":
        raise ClipDecodeError("not a JPEG (no SOI marker)")
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:  # a fill byte, or no length field
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xD9, 0xDA) or length < 2:  # EOI or a scan before any frame header
            break
        if marker in _JPEG_SOF:
            if length < 8 or pos + 10 > len(data):
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            return height, int.from_bytes(data[pos + 7 : pos + 9], "big"), data[pos + 9]
        pos += 2 + length
    raise ClipDecodeError("JPEG without a readable frame header (SOF)")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the array data) of a .npy file, from its header alone."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version}; np.save writes (1, 0)")
    except (ValueError, TypeError, SyntaxError, EOFError) as e:
        raise ClipDecodeError(f"raw clip header does not read: {e}") from None
    return tuple(shape), dtype, f.tell()


def clip_header(ext: str, data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) that `decode_clip` allocates for a member, read from its header alone:
    the (rows, width) uint8 plane image of a JPEG or PNG, the (T, 3, H, W) array of a raw
    clip. Raises ClipDecodeError for a header that does not read, ClipSizeError for a format
    ingest does not write (a colour JPEG, a 16-bit PNG, a .npy of another dtype)."""
    if ext == EXTENSIONS["jpeg"]:
        height, width, components = _jpeg_header(data)
        if components != 1:
            raise ClipSizeError(f"a JPEG of {components} components; ingest writes grayscale")
        return (height, width), np.dtype(np.uint8)
    if ext == EXTENSIONS["png"]:
        if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 26:
            raise ClipDecodeError("not a PNG (no signature and IHDR chunk)")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if (data[24], data[25]) != (8, 0):
            raise ClipSizeError(f"a PNG of bit depth {data[24]}, colour type {data[25]}; "
                                "ingest writes 8-bit grayscale (8, 0)")  # fmt: skip
        return (height, width), np.dtype(np.uint8)
    if ext == EXTENSIONS["raw"]:
        shape, dtype, offset = _npy_header(data)
        if dtype not in STORED_DTYPES:
            raise ClipSizeError(f"a raw clip of dtype {dtype}; expected uint8 or float16")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(data) - offset != nbytes:  # np.load would allocate what the header says
            raise ClipSizeError(
                f"raw clip header declares {shape} {dtype} ({nbytes:,} bytes), the member "
                f"holds {len(data) - offset:,}"
            )
        return shape, dtype
    raise ClipDecodeError(f"unknown clip member extension {ext!r}; expected {CLIP_EXTENSIONS}")


def check_clip_size(
    ext: str, data: bytes, num_frames: int, size: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """The decoded shape from the member's header (`clip_header`), or ClipSizeError unless it
    is a (num_frames, 3, H, W) clip with (H, W) = `size` or, when `size` is empty (unknown),
    of at most MAX_CLIP_PIXELS values. Nothing is decoded or allocated."""
    shape, _ = clip_header(ext, data)
    T = num_frames
    if size:
        H, W = size
        expected = (T, 3, H, W) if ext == EXTENSIONS["raw"] else (T * 3 * H, W)
        if shape != expected:
            raise ClipSizeError(
                f"{ext} header declares {shape}; the manifest's layout ({T} frames of "
                f"{H}x{W}) says {expected}"
            )
        return shape
    if ext == EXTENSIONS["raw"]:
        planes_ok = len(shape) == 4 and shape[:2] == (T, 3)
    else:
        planes_ok = len(shape) == 2 and shape[0] % (3 * T) == 0
    if not planes_ok or min(shape) == 0:
        raise ClipSizeError(f"{ext} header declares {shape}: not {T} frames of 3 planes")
    if math.prod(shape) > MAX_CLIP_PIXELS:
        raise ClipSizeError(
            f"{ext} header declares {shape} ({math.prod(shape):,} values), over the "
            f"{MAX_CLIP_PIXELS:,} a clip may hold when the manifest's layout is unknown"
        )
    return shape


def decode_clip(ext: str, data: bytes, num_frames: int, size: tuple[int, ...] = ()) -> np.ndarray:
    """Member bytes -> (T, 3, H, W) stored Lab (uint8, or float16 from raw storage), (H, W) =
    `size` when given. The header is checked first (`check_clip_size`): ClipSizeError before
    any allocation; ClipDecodeError if corrupt."""
    check_clip_size(ext, data, num_frames, size)
    if ext == EXTENSIONS["raw"]:
        try:
            lab = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ClipDecodeError(f"raw clip does not load: {e}") from None
    else:
        if ext == EXTENSIONS["png"]:
            planes = _png_decode(data)
        else:
            planes = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if planes is None or planes.shape[0] % (3 * num_frames):
            raise ClipDecodeError(f"{ext} clip of {len(data)} bytes does not decode to planes")
        H = planes.shape[0] // (3 * num_frames)
        lab = planes.reshape(num_frames, 3, H, planes.shape[1])
    if lab.dtype not in STORED_DTYPES or lab.ndim != 4 or lab.shape[:2] != (num_frames, 3):
        raise ClipDecodeError(
            f"clip has shape {lab.shape} {lab.dtype}, expected ({num_frames}, 3, H, W)"
        )
    return lab
