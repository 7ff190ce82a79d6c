"""The bad-input corpus (tests/bad_inputs/corpus.py) through the jobs a user runs.

For every kind: the job does not crash as a whole (a clear error, or the input recorded and
skipped), nothing from the corpus is executed (CANARY never appears), nothing is written
outside the job's outputs (the inputs are byte-identical afterwards, the working directory
stays empty), and the good inputs beside the bad ones are still ingested, trained on or
scored. The README's reliability table counts these kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from model import MAST
from tests.bad_inputs import corpus
from tests.jobs.conftest import make_davis_sample

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SHARDS = ROOT / "tests" / "fixtures" / "main_dc3dea1" / "shards"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class Sandbox:
    """The corpus root: inputs anywhere but `out/`, jobs run from an empty `cwd/`."""

    def __init__(self, root: Path) -> None:
        self.root, self.out, self.cwd = root, root / "out", root / "cwd"
        self.out.mkdir(parents=True)
        self.cwd.mkdir()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        env["MAST_RUNS_DIR"] = str(self.out / "runs")  # the embedded defaults land in out/
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=self.cwd, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    def inputs(self) -> dict[str, str]:
        """sha256 of every file outside out/ (and cwd/, which must stay empty)."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and self.out not in path.parents:
                found[str(path.relative_to(self.root))] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
        return found


def refused(done: subprocess.CompletedProcess, expect: str) -> None:
    """One clear line, no traceback, a non-zero exit."""
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert expect in text, text[-2000:]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def good_shards(sandbox):
    return shutil.copytree(FIXTURE_SHARDS, sandbox.root / "good-shards") / "manifest.json"


TRAIN = ["--config", str(ROOT / "configs/train/demo.yaml"), "--stages", "pretrain",
         "scaling.num_workers=0", "schedule.steps=2", "checkpoint.every_steps=2",
         "model.width=4", "model.feat_dim=8", "loader.crop_size=32", "loader.batch_size=2",
         "mlflow.system_metrics=false"]  # fmt: skip


def test_videos(sandbox):
    listing, kinds, good = corpus.videos(sandbox.root)
    before = sandbox.inputs()
    done = sandbox.run(
        "jobs.ingest", "--input", str(listing), "--output", str(sandbox.out / "shards"),
        "--no-progress", "size=[32,32]", "clip_len=2", "clips_per_video=2", "videos_per_shard=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((sandbox.out / "shards" / "manifest.json").read_text())
    problems = {os.path.basename(p["path"]): p for p in manifest["problems"]}
    for kind in kinds:
        assert kind.name in problems, (kind, sorted(problems))
        assert kind.expect in f"{problems[kind.name]['status']} {problems[kind.name]['message']}"
    assert not set(good) & set(problems)  # the good ones beside them: ingested
    assert manifest["num_samples"] >= len(good)  # a run (the default layout) from each
    assert manifest["videos"]["total"] == len(kinds) + len(good)
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_ingest_bookkeeping(sandbox):
    # After test_videos: damage what it wrote, rerun the same command with --verify.
    dst = sandbox.out / "shards"
    originals = {p.name: p.read_bytes() for p in dst.iterdir() if p.suffix in (".tar", ".json")}
    kinds = corpus.bookkeeping(dst)
    listing = sandbox.root / "videos.txt"
    before = sandbox.inputs()
    done = sandbox.run(
        "jobs.ingest", "--input", str(listing), "--output", str(dst), "--no-progress", "--verify",
        "size=[32,32]", "clip_len=2", "clips_per_video=2", "videos_per_shard=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "Traceback" not in text
    for kind in kinds:
        assert kind.expect in text, (kind, text[-3000:])
    # Healed: every file as the first run wrote it, the lock released; shard 2, whose videos
    # gave no clip, is written again without a tar.
    assert {n: (dst / n).read_bytes() for n in originals} == originals
    assert "shard-000002.stats.json" in originals and not (dst / "shard-000002.tar").exists()
    assert not (dst / ".ingest.lock").exists()
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_shard_members(sandbox, good_shards):
    manifest, kinds, num_samples = corpus.shard_members(sandbox.root, good_shards.parent)
    before = sandbox.inputs()
    steps = -(-num_samples // 2)  # one epoch in order: every member is read once
    done = sandbox.run(
        "jobs.train", *TRAIN[:-4], f"schedule.steps={steps}", f"checkpoint.every_steps={steps}",
        *TRAIN[-3:], "loader.resampled=false", "--data", str(manifest), "--run-name", "members",
        f"storage_path={sandbox.out / 'ray'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Each kind of bad sample is warned about once, naming the shard, the key and the fix.
    warned = [line for line in done.stderr.splitlines() if "WARNING" in line]
    for expect in (
        "frame_indices is None",
        "header declares",
        "do not match the clip_sha256",
        "allow_unverified_clips",
        "skipped unread",
        "shard-000003.tar skipped",
    ):
        assert any(expect in line for line in warned), (expect, warned)
    out = json.loads(done.stdout.strip().splitlines()[-1])["pretrain"]
    assert out["version"] == 1 and out["checkpoint"].endswith(f"checkpoint_{steps:08d}")
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_manifests(sandbox, good_shards):
    cases = corpus.manifests(sandbox.root, good_shards)
    before = sandbox.inputs()
    common = [*TRAIN, f"storage_path={sandbox.out / 'ray'}"]
    for kind, path in cases.items():
        refused(sandbox.run("jobs.train", *common, "--data", str(path), "--run-name", "bad"),
                kind.expect)  # fmt: skip
    # Nothing good lost: the real manifest beside them trains.
    done = sandbox.run("jobs.train", *common, "--data", str(good_shards), "--run-name", "good")
    assert done.returncode == 0, done.stderr[-3000:]
    version = json.loads(done.stdout.strip().splitlines()[-1])["pretrain"]["version"]
    # The module's store is shared (test_shard_members registered before): this run's version.
    store = f"sqlite:///{sandbox.out / 'runs' / 'mlflow' / 'mlflow.db'}"
    registered = MlflowClient(store, registry_uri=store).get_model_version("mast", str(version))
    assert registered.tags["run_name"] == "good" and registered.tags["step"] == "2"
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_davis_folders(sandbox, tmp_path_factory):
    names = ["bigbuckbunny-00", "bikes-01"]
    good = make_davis_sample(tmp_path_factory.mktemp("davis"), "num_sequences=2", "num_frames=5")
    root, kinds = corpus.davis_folder(sandbox.root, good, names)
    model = sandbox.root / "tiny.pt"
    torch.manual_seed(0)
    tiny = MAST(width=8, feat_dim=16, scale=20.0)
    torch.save({"model_args": tiny.model_args, "model": tiny.state_dict()}, model)
    before = sandbox.inputs()
    out = sandbox.out / "eval"
    done = sandbox.run(
        "jobs.evaluate", "--model", str(model), "--davis-root", str(root), "--output", str(out),
        "split=corpus", "ray.enabled=false", "mlflow.enabled=false", "protocol.radius=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    failed = {f["sequence"]: f["error"] for f in summary["failed"]}
    for kind in kinds:
        assert kind.expect in failed[kind.name], (kind, failed.get(kind.name))
    assert summary["scored"] == len(names)  # the good sequences beside them: scored
    assert not (sandbox.out / "escape").exists() and not (sandbox.root / "escape").exists()
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_configs(sandbox):
    cases = corpus.configs(sandbox.root)
    before = sandbox.inputs()
    for kind, args in cases:
        refused(sandbox.run(*args), kind.expect)
    assert sandbox.inputs() == before and not any(sandbox.cwd.iterdir())


def test_nothing_in_the_corpus_was_executed(sandbox):
    # Last in this module: every payload above had its chance.
    assert not (sandbox.root / corpus.CANARY).exists()
