"""The bad-input corpus: every kind of broken input a user can hand a job, made for real.

    python -m tests.bad_inputs.corpus OUT      # writes OUT/<category>/... and lists the kinds

Each builder writes one category's inputs beside good ones (nothing good may be lost next to
them) and returns its kinds: the name, and what the job must say about it. tests/
test_bad_inputs.py runs the job a user would run on each category and checks every kind.
Pickle and YAML payloads would create CANARY in the corpus root if they were ever run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import storage
from tests.pipeline.ingest_media import write_video

CANARY = "CODE_WAS_EXECUTED"


@dataclasses.dataclass(frozen=True)
class Kind:
    category: str
    name: str  # the file, sequence or override that is bad
    expect: str  # what the job says (a substring of its output or of what it records)


class Payload:
    """A pickle that creates `path` when unpickled: planted where a job might unpickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def payload_bytes(root: Path) -> bytes:
    return pickle.dumps({"model": Payload(root / CANARY)})


# --- videos: one ingest run over a list file ----------------------------------------------
def videos(root: Path) -> tuple[Path, list[Kind], list[str]]:
    """(list file, kinds, good video names)."""
    d = root / "videos"
    d.mkdir(parents=True)
    real = storage.sample_video_dir() / "carphone_pristine.mp4"
    good = [write_video(d / "good.mp4", 12, 48, 64).name]
    utf = d / os.fsdecode(b"caf\xe9-good.mp4")  # a non-UTF-8 name is a name like any other
    write_video(utf, 12, 48, 64)
    good.append(utf.name)
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    (d / "random.mp4").write_bytes(random.Random(0).randbytes(50_000))
    (d / "truncated.mp4").write_bytes(real.read_bytes()[:3000])
    write_video(d / "short.mp4", 1, 48, 64)  # one frame: shorter than any clip
    data = bytearray((d / "good.mp4").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = random.Random(1).randbytes(2000)  # damaged in the middle
    (d / "damaged.mp4").write_bytes(bytes(data))
    (d / "folder.mp4").mkdir()
    kinds = [
        Kind("video", "empty.mp4", "empty file (0 bytes)"),
        Kind("video", "text.mp4", "not a readable video"),
        Kind("video", "random.mp4", "not a readable video"),
        Kind("video", "truncated.mp4", "not a readable video"),
        Kind("video", "short.mp4", "too short: 1 frames"),
        Kind("video", "damaged.mp4", ""),  # recorded, whatever its status: not a crash
        Kind("video", "folder.mp4", "failed"),
        Kind("video", "missing.mp4", "no such file"),
    ]
    listing = root / "videos.txt"
    names = [k.name for k in kinds] + good
    listing.write_bytes(b"".join(os.fsencode(str(d / n)) + b"\n" for n in names))
    return listing, kinds, good


# --- ingest bookkeeping: damage a finished output, rerun the same ingest --------------------
def bookkeeping(dst: Path) -> list[Kind]:
    """Damage the stats, assignment, lock and a tar of a finished ingest output in place.
    Shard 2 (text.mp4, truncated.mp4) gave no clip: its stats are all it has."""
    (dst / "shard-000002.stats.json").write_bytes(b'{"config_hash": "torn')
    (dst / "shard-000001.stats.json").write_text(json.dumps({"videos": []}))
    (dst / "assignment.json").write_bytes(b"\x00 not an assignment")
    tar = bytearray((dst / "shard-000000.tar").read_bytes())
    tar[520:560] = b"X" * 40  # inside the first member: same size, other bytes (--verify)
    (dst / "shard-000000.tar").write_bytes(bytes(tar))
    lock = dst / ".ingest.lock"
    lock.write_bytes(b"\xff garbage lock")
    os.utime(lock, (1, 1))  # left by a run long gone
    return [
        Kind("bookkeeping", "shard-000002.stats.json", "shard-000002.stats.json"),
        Kind("bookkeeping", "shard-000001.stats.json", "shard-000001.stats.json"),
        Kind("bookkeeping", "assignment.json", "assignment.json"),
        Kind("bookkeeping", "shard-000000.tar", "1 damaged"),
        Kind("bookkeeping", ".ingest.lock", ".ingest.lock"),
    ]


# --- shard members: one training run reads them all, in epoch order ----------------------
def shard_members(root: Path, good_shards: Path) -> tuple[Path, list[Kind], int]:
    """(manifest, kinds, samples the loader reads): the 3 good clips of `good_shards` in their own
    tar, one tar holding a bad sample of each kind, a gzip tar and a truncated tar."""
    import hashlib

    from pipeline.loader import iter_shard
    from tests.bad_inputs.craft import jpeg_declaring, npy_declaring, png_declaring, write_tar

    d = root / "shards"
    d.mkdir(parents=True)
    shutil.copy(good_shards / "shard-000000.tar", d / "shard-000000.tar")
    key0, record0, ext0, clip0 = next(iter_shard(str(good_shards / "shard-000000.tar")))

    def sample(name: str, clip: bytes | int = clip0, ext: str = ext0, **changes):
        record = {**record0, "key": name}
        if isinstance(clip, bytes):
            record["clip_sha256"] = hashlib.sha256(clip).hexdigest()
        record.update(changes)
        record = {k: v for k, v in record.items() if v is not DROP}
        return [(f"{name}.json", json.dumps(record).encode()), (f"{name}.{ext}", clip)]

    flipped = bytearray(clip0)
    flipped[len(flipped) // 2] ^= 0xFF
    bad = {
        "no-indices": (sample("no-indices", frame_indices=DROP), "frame_indices is None"),
        "null-record": ([("null-record.json", b"null"), (f"null-record.{ext0}", clip0)],
                        "not an object"),
        "not-json": ([("not-json.json", b"{oops"), (f"not-json.{ext0}", clip0)], "not JSON"),
        "npy-12tib": (sample("npy-12tib", npy_declaring((8, 3, 1 << 20, 1 << 19)), "lab.npy",
                             storage="raw"), "header declares"),
        "png-bomb": (sample("png-bomb", png_declaring(14000, 14000), "lab.png",
                            storage="png"), "header declares"),
        "jpeg-bomb": (sample("jpeg-bomb", jpeg_declaring(52500, 20000)), "header declares"),
        "flipped": (sample("flipped", bytes(flipped), clip_sha256=record0["clip_sha256"]),
                    "do not match the clip_sha256"),
        "unverified": (sample("unverified", clip_sha256=DROP), "allow_unverified_clips"),
        "oversized": (sample("oversized", 1 << 21), "skipped unread"),
    }  # fmt: skip
    members = [m for case, _ in bad.values() for m in case]
    write_tar(d / "shard-000001.tar", members)
    write_tar(d / "shard-000002.tar", [*sample("in-gzip"), *sample("gzip-zeros", 1 << 26)],
              "w:gz")  # fmt: skip
    (d / "shard-000003.tar").write_bytes((good_shards / "shard-000000.tar").read_bytes()[:700])
    manifest = json.loads((good_shards / "manifest.json").read_text())
    counts = [3, len(bad), 2, 3]
    manifest.update(shards=[f"shard-{i:06d}.tar" for i in range(4)],
                    samples_per_shard=counts, num_samples=sum(counts))  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    kinds = [Kind("shard member", name, expect) for name, (_, expect) in bad.items()]
    kinds += [Kind("shard member", "gzip-zeros", "skipped unread"),
              Kind("shard member", "truncated-tar", "corrupt shard")]  # fmt: skip
    # The driver leaves the truncated tar out before training (it is recorded on the run).
    return d / "manifest.json", kinds, sum(counts[:3])


DROP = object()


# --- manifests: one train run each, refused before any work --------------------------------
def manifests(root: Path, good_manifest: Path) -> dict[Kind, Path]:
    d = root / "manifests"
    good = json.loads(good_manifest.read_text())
    cases = {
        "not-json": ("{ this is not json", "is not valid JSON"),
        "json-list": ([good], "holds a JSON list, not an object"),
        "outside": ({**good, "shards": ["../other/shard-000000.tar"]}, "not a file name under"),
        "absolute": ({**good, "shards": ["/etc/passwd"]}, "not a file name under"),
        "url": ({**good, "shards": ["s3://elsewhere/x.tar"]}, "not a file name under"),
        "counts": ({**good, "samples_per_shard": [1, 2]}, "'samples_per_shard' is not one integer"),
        "newer": ({**good, "version": 99}, "newer than this code reads"),
        "empty": ({**good, "shards": [], "samples_per_shard": [], "num_samples": 0},
                  "nothing to train on"),
    }  # fmt: skip
    out = {}
    for name, (content, expect) in cases.items():
        path = d / name / "manifest.json"
        path.parent.mkdir(parents=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        out[Kind("manifest", name, expect)] = path
    return out


# --- DAVIS folders: one evaluation over a split that lists every bad sequence ------------
def davis_folder(root: Path, good: Path, good_names: list[str]) -> tuple[Path, list[Kind]]:
    d = shutil.copytree(good, root / "davis")
    img, ann = d / "JPEGImages" / "480p", d / "Annotations" / "480p"
    first = good_names[0]

    def clone(name: str) -> tuple[Path, Path]:
        return shutil.copytree(img / first, img / name), shutil.copytree(ann / first, ann / name)

    i, _ = clone("missing-frame")
    (i / "00002.jpg").unlink()
    i, _ = clone("unreadable-jpeg")
    (i / "00001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _, a = clone("mask-size")
    import numpy as np

    from davis.io import write_mask

    write_mask(a / "00002.png", np.zeros((10, 10), np.uint8))
    _, a = clone("no-objects")
    write_mask(a / "00000.png", np.zeros((48, 64), np.uint8))
    i, a = clone("two-frames")
    for f in sorted(i.glob("*.jpg"))[2:]:
        f.unlink()
    for f in sorted(a.glob("*.png"))[2:]:
        f.unlink()
    kinds = [
        Kind("davis", "missing-frame", "annotations without frames"),
        Kind("davis", "unreadable-jpeg", "unreadable image"),
        Kind("davis", "mask-size", "annotation is 10x10"),
        Kind("davis", "no-objects", "first annotation has no object"),
        Kind("davis", "two-frames", "DAVIS scoring needs >= 3"),
        Kind("davis", "not-there", "no frames in"),
        Kind("davis", "../escape", "is not a folder name"),
    ]
    split = d / "ImageSets" / "2017" / "corpus.txt"
    split.write_text("\n".join([*good_names, *(k.name for k in kinds)]) + "\n")
    return d, kinds


# --- configs: each job's --config / key=value, refused in one line ------------------------
def configs(root: Path) -> list[tuple[Kind, list[str]]]:
    """(kind, job arguments after `python -m`)."""
    d = root / "configs"
    d.mkdir(parents=True)
    (d / "broken.yaml").write_text("model: {width: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "code.yaml").write_text(
        f"model: !!python/object/apply:os.system ['touch {root / CANARY}']\n"
    )
    train = ["jobs.train", "--stages", "pretrain", "--data", str(root / "none" / "manifest.json")]
    ingest = ["jobs.ingest", "--input", str(root / "videos"), "--output", str(root / "cfg-out")]
    return [
        (Kind("config", "unknown-key", "unknown config key optim.lrr"), [*train, "optim.lrr=1"]),
        (Kind("config", "bad-type", "schedule.steps must be an integer"), [*train, "schedule.steps=abc"]),
        (Kind("config", "bad-choice", "is not allowed; choose one of"), [*ingest, "storage=gif"]),
        (Kind("config", "not-yaml", "is not valid YAML"), [*train, "--config", str(d / "broken.yaml")]),
        (Kind("config", "top-level-list", "must hold a mapping"), [*ingest, "--config", str(d / "list.yaml")]),
        (Kind("config", "python-tag", "is not valid YAML"), [*train, "--config", str(d / "code.yaml")]),
        (Kind("config", "missing-file", "does not exist"), ["jobs.evaluate", "--model", "x.pt", "--davis-root", str(root), "--config", str(d / "nope.yaml")]),
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    listing, video_kinds, _ = videos(root)
    kinds = [*video_kinds, *(k for k, _ in configs(root))]
    for k in kinds:
        print(f"{k.category:<10} {k.name}")
    print(
        f"{len(kinds)} kinds in {root} (manifests and DAVIS folders need good data: see the test)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
