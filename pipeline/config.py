"""Typed configs of the ingest job (`IngestConfig`) and the training loader (`LoaderConfig`).

Both are frozen dataclasses built with `typedconfig.load_config` (defaults < YAML < key=value),
validated before any work starts; errors name the bad key and the allowed values.

    cfg = load_config(IngestConfig, "configs/ingest/pretrain.yaml", ["videos_per_shard=8"])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from typedconfig import ConfigError, positive

# The training stages, in the order they run (each starts from the previous one's weights).
Stage = Literal["pretrain", "main", "dynamic"]
STAGES: tuple[str, ...] = get_args(Stage)
# Frames a run may hold (IngestConfig.run_len): at least a pretrain pair 2 apart; at most what
# one tar member may hold (pipeline/records.py MAX_CLIP_FRAMES).
MIN_RUN_LEN, MAX_RUN_LEN = 3, 1024


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """How videos become clips and clips become shards (see pipeline/worker.py)."""

    # Clip geometry in source frames: frames start + frame_offsets[i]. When frame_offsets is
    # empty it is range(0, clip_len * frame_step, frame_step).
    clip_len: int = 2
    frame_step: int = 1
    frame_offsets: tuple[int, ...] = ()
    # Clip starts: clips_per_video > 0 spreads that many clips evenly over the video;
    # otherwise one clip every clip_stride source frames (0 = the clip span: no overlap).
    clips_per_video: int = 0
    clip_stride: int = 0
    # run_len > 0: store runs of consecutive frames instead of clips (the layout keys above
    # are then unused): every source frame once, in runs of at most run_len frames (a video
    # of n frames is cut into ceil(n / run_len) runs of equal length, +-1), each frame coded
    # on its own so the loader decodes only the frames a sample uses and draws every stage's
    # layout anywhere in a run (configs/ingest/default.yaml; pipeline/codec.py).
    run_len: int = 0
    # Output size (height, width); "crop" scales the short side and centre-crops,
    # "stretch" resizes to the size regardless of aspect ratio.
    size: tuple[int, int] = (256, 256)
    resize: Literal["crop", "stretch"] = "crop"
    # Stored Lab codec: one grayscale image per clip holding all planes (see worker.py).
    storage: Literal["jpeg", "png", "raw"] = "jpeg"
    # RGB -> Lab: "float" (cv2 on float32, within 1 level of model.colour) or "uint8"
    # (OpenCV fixed point, within 2 levels, ~5x faster): see pipeline/codec.py.
    lab: Literal["float", "uint8"] = "float"
    # Stored Lab dtype: "uint8" (8-bit levels, OpenCV's layout; every storage format) or
    # "float16" (Lab units unquantised, L in [0, 100]: 40x finer than uint8, 6 bytes per
    # pixel; `storage: raw` and `lab: float` only). See pipeline/codec.py.
    dtype: Literal["uint8", "float16"] = "uint8"
    quality: int = 95  # JPEG quality (1..100); ignored for png/raw
    videos_per_shard: int = 16  # videos per shard task (one tar each, unless shard_mb splits it)
    # Target tar size in MB (0 = one tar per shard, its size set by videos_per_shard). A shard
    # task closes its tar once it holds this much, after the video that reached it (a video's
    # clips stay in one tar), and continues in the next part, shard-NNNNNN_001.tar, ...; so
    # with many videos per shard every tar but a shard's last is about this size, however
    # long the videos are.
    shard_mb: float = 0.0
    # Directory inputs keep only these extensions (lists and globs take every path).
    extensions: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg")
    # Frame rate of frame-folder inputs (folders of numbered images, pipeline/frame_folder.py),
    # which carry none: recorded as the video's fps in the stats and every clip record, where a
    # video file's own rate goes. YouTube-VOS 2018 train frames are 6 fps, DAVIS 24 fps.
    frame_folder_fps: float = 24.0
    # Ray: CPUs per shard task, decord threads per reader (and image-decoding threads per frame
    # folder; 0 = one per core), bounded fan-out, retries.
    task_cpus: float = 1.0
    decoder_threads: int = 1
    max_in_flight: int = 0  # 0 = 2 x (cluster CPUs / task_cpus)
    max_retries: int = 3  # Ray retries of a task whose worker died (system failures)
    retry_failed_shards: bool = True  # one more round for shards whose task raised
    task_timeout_s: float = 0.0  # cancel and retry a shard task running longer; 0 = never
    seed: int = 0  # recorded in the manifest; the clip layout itself is deterministic

    @property
    def offsets(self) -> tuple[int, ...]:
        """Source-frame offsets of a clip's frames from its start (sorted, first is 0)."""
        if self.frame_offsets:
            return tuple(self.frame_offsets)
        return tuple(range(0, self.clip_len * self.frame_step, self.frame_step))

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return self.offsets[-1] + 1

    def validate(self) -> None:
        positive(self.clip_len, "clip_len")
        positive(self.frame_step, "frame_step")
        if self.frame_offsets:
            offs = list(self.frame_offsets)
            if offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:])):
                raise ConfigError(
                    f"frame_offsets={offs} must start at 0 and strictly increase "
                    "(e.g. [0, 4, 8, 16, 18, 20, 21])"
                )
        positive(self.clips_per_video, "clips_per_video", allow_zero=True)
        if self.run_len and not MIN_RUN_LEN <= self.run_len <= MAX_RUN_LEN:
            raise ConfigError(
                f"run_len={self.run_len} must be 0 (clips) or in {MIN_RUN_LEN}..{MAX_RUN_LEN}"
            )
        positive(self.clip_stride, "clip_stride", allow_zero=True)
        if len(self.size) != 2 or not 8 <= min(self.size) <= max(self.size) <= 8192:
            raise ConfigError(f"size={list(self.size)} must be [height, width], each 8..8192")
        if self.dtype == "float16" and (self.storage != "raw" or self.lab != "float"):
            raise ConfigError(
                f"dtype=float16 (storage={self.storage}, lab={self.lab}): float16 Lab is "
                "stored uncompressed from the float conversion; set storage=raw and lab=float, "
                "or keep dtype=uint8 for jpeg/png"
            )
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality={self.quality} must be in 1..100")
        positive(self.videos_per_shard, "videos_per_shard")
        positive(self.shard_mb, "shard_mb", allow_zero=True)
        positive(self.task_cpus, "task_cpus")
        positive(self.decoder_threads, "decoder_threads", allow_zero=True)
        positive(self.max_in_flight, "max_in_flight", allow_zero=True)
        positive(self.max_retries, "max_retries", allow_zero=True)
        positive(self.task_timeout_s, "task_timeout_s", allow_zero=True)
        positive(self.frame_folder_fps, "frame_folder_fps")
        if not self.extensions:
            raise ConfigError("extensions must list at least one video extension (e.g. [mp4])")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Training loader: which frames of a stored clip form a sample, and batching."""

    stage: Stage = "pretrain"  # which layout a sample has: pairs, short-term or long-term memory
    batch_size: int = 12  # samples per step per worker (rank); global batch = x num_workers
    num_workers: int = 2  # DataLoader worker processes (0 = in the training process)
    crop_size: int = 256  # random square crop, same window for every frame; 0 = stored size
    # pretrain: one reference, source-frame gap drawn from pair_gaps with pair_probs.
    pair_gaps: tuple[int, ...] = (2, 5, 8)
    pair_probs: tuple[float, ...] = (0.4, 0.4, 0.2)
    # main/dynamic: short-term references (gap <= model.long_term_gap); dynamic adds long-term
    # ones, more than model.long_term_gap back.
    num_short_refs: int = 3
    num_long_refs: int = 2
    shuffle_buffer: int = 256  # compressed clips; 0 = no shuffling
    # Training samples drawn from each decoded clip (resampled mode only): k > 1 divides the
    # storage reads and clip decodes per sample by k (bench/loader.py: GPU feed budget).
    samples_per_clip: int = 1
    resampled: bool = True  # infinite stream drawn with replacement (training)
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead
    # False: frames stay stored uint8 Lab and the model normalises them on its device (4x
    # fewer bytes from the workers to the trainer); True: float32 network-space Lab,
    # ((L - 50) / 50, a / 127, b / 127) as model.colour.normalise_lab. The model takes both.
    normalise: bool = False
    # Shards written before ingest recorded each clip's sha256 (`clip_sha256` in its record):
    # False refuses their samples (counted in loader.stats["unverified_samples"]), as a
    # damaged JPEG still decodes (to garbage) and only the checksum tells; True reads them
    # unverified (the size checks before decoding still apply).
    allow_unverified_clips: bool = False

    @property
    def clip_frames(self) -> int:
        """Frames per training sample (references + target)."""
        if self.stage == "pretrain":
            return 2
        if self.stage == "main":
            return self.num_short_refs + 1
        return self.num_long_refs + self.num_short_refs + 1

    def validate(self) -> None:
        positive(self.batch_size, "loader.batch_size")
        positive(self.num_workers, "loader.num_workers", allow_zero=True)
        positive(self.crop_size, "loader.crop_size", allow_zero=True)
        positive(self.shuffle_buffer, "loader.shuffle_buffer", allow_zero=True)
        positive(self.samples_per_clip, "loader.samples_per_clip")
        positive(self.prefetch_factor, "loader.prefetch_factor")
        if not self.pair_gaps or len(self.pair_gaps) != len(self.pair_probs):
            raise ConfigError(
                f"loader.pair_gaps={list(self.pair_gaps)} and loader.pair_probs="
                f"{list(self.pair_probs)} must be non-empty and of equal length"
            )
        if min(self.pair_gaps) < 1 or min(self.pair_probs) < 0:
            raise ConfigError("loader.pair_gaps must be >= 1 and loader.pair_probs >= 0")
        if not math.isclose(sum(self.pair_probs), 1.0, abs_tol=1e-6):
            raise ConfigError(f"loader.pair_probs={list(self.pair_probs)} must sum to 1")
        positive(self.num_short_refs, "loader.num_short_refs", allow_zero=self.stage == "dynamic")
        if self.stage == "dynamic":
            positive(self.num_long_refs, "loader.num_long_refs")
