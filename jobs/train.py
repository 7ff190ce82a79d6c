"""Train MAST with Ray Train (DDP) through one or more stages, tracked and registered in MLflow.

    python -m jobs.train --config configs/train/pretrain.yaml --data runs/shards/manifest.json
    python -m jobs.train --config configs/train/demo.yaml --stages pretrain,main,dynamic \\
        --data runs/shards/manifest.json --run-name demo scaling.num_workers=2
    ray job submit --working-dir . -- python -m jobs.train --stages pretrain,main,dynamic \\
        --data s3://bucket/shards/manifest.json --run-name mast-v1 mlflow.tracking_uri=http://mlflow:5000

Everything that can be checked is checked before Ray workers start: the config (typos name
the allowed keys; stages in the order pretrain -> main -> dynamic), the data (a missing,
empty or malformed manifest is an error; unreadable shards are skipped and recorded in the
MLflow runs), the tracking store (reachable, writable) and any checkpoint to resume or start
from (same model config). Each stage is a Ray Train run named `<run_name>-<stage>` under
`storage_path`; rerunning the same command resumes it from its latest readable checkpoint
(none readable: the stage starts afresh), and a stage that already finished
(`stage_done.json`) is skipped, both only on the data the stage started on (`stage_data.json`:
the manifest's content hash, combined with the names of skipped shards) and, for the model,
the same model config. Each stage starts from the previous stage's final checkpoint (if that
is corrupt, the newest readable one beside it) and ends with a registered model version and
the alias `<stage>-latest`. When the job stops with an error, its MLflow runs end FAILED.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

import storage
from jobs.checkpoint import (
    CheckpointError,
    NoReadableCheckpoint,
    check_compatible,
    checkpoint_step,
    load_latest_valid,
)
from jobs.tracking import (
    StageRuns,
    TrackingError,
    check_reachable,
    compute_example,
    finish_run,
    git_commit,
    load_state,
    log_dataset,
    register_stage_model,
    resolve_tracking_uri,
    set_tag,
    setup_runs,
)
from jobs.train_config import TrainConfig, load_stage_configs
from jobs.train_loop import EXAMPLE_INPUT_FILE, train_loop_per_worker
from pipeline.distributor import placeable, ray_may_grow
from pipeline.loader import check_layout
from pipeline.samples import UnusableClip
from storage import atomic_write_bytes
from typedconfig import ConfigError, config_help, flatten, to_dict

log = logging.getLogger("jobs.train")
DONE_FILE = "stage_done.json"
DATA_FILE = "stage_data.json"  # the data a stage trains on, written when it starts


class TrainingError(RuntimeError):
    """A stage could not finish; the message names the cause (the last checkpoint stays)."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
    uri: str  # what the user gave (manifest or shards)
    shards: list[str]  # readable shard URLs
    # What the loader gets: the manifest, {"manifest", "exclude"} when shards were skipped, or
    # the readable shard URLs.
    source: str | list[str] | dict[str, Any]
    # Of what is trained on: the manifest's content hash, or with skipped shards a hash of it
    # and their names (lineage and the same-data resume check see the difference).
    content_hash: str
    num_samples: int  # in the readable shards; -1 when shard URLs were given (unknown)
    skipped: list[str]  # "shard: reason" of corrupt shards, recorded
    manifest_hash: str  # the manifest's own content hash
    # What a sample holds, from the manifest (frame_offsets, size): {} for shard URLs.
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)


def data_tags(data: DataInfo) -> dict[str, str]:
    """MLflow tags that record the shards skipped (the loader never sees them)."""
    tags = {"data.num_shards_skipped": str(len(data.skipped))}
    if data.skipped:
        tags["data.shards_skipped"] = "; ".join(data.skipped)[:5000]
        tags["data.manifest_hash"] = data.manifest_hash
    return tags


def _tar_ok(path: str) -> str:
    """'' if `path` is a readable tar with at least one member, else the reason."""
    try:
        with tarfile.open(path) as tf:
            if tf.next() is None:
                return "empty tar"
            for _ in tf:  # walks every header: a truncated or garbled shard fails here
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def describe_data(data: str) -> DataInfo:
    """Resolve --data into readable shards; clear errors for missing or empty data."""
    if not data:
        raise ConfigError(
            "no training data: pass --data path/to/manifest.json (written by jobs.ingest)"
        )
    remote = "://" in data and not data.startswith("file://")
    path = data.removeprefix("file://")
    if not remote:  # Ray workers change directory: only absolute paths survive the trip
        path = os.path.abspath(path)
    if not remote and os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    per_shard: list[int] | None = None
    layout: dict[str, Any] = {}  # what a sample holds, from a manifest
    if path.endswith(".json"):
        manifest = _read_manifest(path, remote)
        layout = {k: manifest[k] for k in ("frame_offsets", "size") if k in manifest}
        base = path.rsplit("/", 1)[0]
        shards = [
            s if ("://" in s or s.startswith("/")) else f"{base}/{s}" for s in manifest["shards"]
        ]
        num_samples = manifest["num_samples"]
        per_shard = manifest.get("samples_per_shard")
        content_hash = str(manifest.get("content_hash", ""))
        if not shards or num_samples <= 0:
            raise ConfigError(
                f"data manifest {path} lists {len(shards)} shards and {num_samples} samples: "
                "nothing to train on (did ingest find any videos?)"
            )
    else:
        shards = [s.strip() for s in data.split(",") if s.strip()]
        num_samples = -1
        content_hash = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()
        path = data
    skipped: list[str] = []
    skipped_names: list[str] = []
    if not remote:
        missing = [
            s for s in shards if "{" not in s and not os.path.isfile(s.removeprefix("file://"))
        ]
        if missing and missing == shards and len(shards) == 1:
            raise ConfigError(
                f"data {path} does not exist; give a manifest.json written by jobs.ingest, "
                "its directory, or .tar shard paths"
            )
        if missing:
            raise ConfigError(
                f"data {path}: {len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}; "
                "rerun jobs.ingest on the same output to finish them"
            )
        good = []
        for i, s in enumerate(shards):
            reason = _tar_ok(s.removeprefix("file://")) if "{" not in s else ""
            if reason:
                log.warning("corrupt shard %s skipped: %s", s, reason)
                skipped.append(f"{s}: {reason}")
                skipped_names.append(s.rsplit("/", 1)[-1])
                if per_shard is not None:
                    num_samples -= per_shard[i]
            else:
                good.append(s)
        if not good:
            raise ConfigError(f"data {path}: every shard is unreadable: {skipped}")
        shards = good
    manifest_hash = content_hash or "unknown"
    if skipped:  # names, not paths: the same data copied elsewhere keeps its hash
        text = "\n".join([manifest_hash, *sorted(skipped_names)])
        content_hash = hashlib.sha256(text.encode()).hexdigest()
    # The manifest (less any corrupt shards): the loader then weights shards by their counts.
    source: str | list[str] | dict[str, Any] = shards
    if path.endswith(".json"):
        source = {"manifest": path, "exclude": skipped_names} if skipped else path
    return DataInfo(
        data, shards, source, content_hash or "unknown", num_samples, skipped, manifest_hash, layout
    )


def _read_manifest(path: str, remote: bool) -> dict[str, Any]:
    """The manifest at `path`, checked to be what jobs.ingest writes (clear errors if not)."""
    if not remote and not os.path.isfile(path):
        raise ConfigError(
            f"data manifest {path} does not exist; run jobs.ingest first, or give the absolute "
            "path (a job submitted to Ray runs in a copy of its --working-dir)"
        )
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"data manifest {path} is not valid JSON ({e}); rerun jobs.ingest") from e
    problem = ""
    if not isinstance(manifest, dict):
        problem = f"it holds a JSON {type(manifest).__name__}, not an object"
    elif not isinstance(manifest.get("shards"), list) or not all(
        isinstance(s, str) for s in manifest["shards"]
    ):
        problem = f"'shards' is {str(manifest.get('shards'))[:80]}, not a list of shard names"
    elif type(manifest.get("num_samples")) is not int:  # bool is no count either
        problem = f"'num_samples' is {manifest.get('num_samples')!r}, not an integer"
    elif manifest["shards"] and (
        not isinstance(manifest.get("samples_per_shard"), list)
        or len(manifest["samples_per_shard"]) != len(manifest["shards"])
        or not all(type(n) is int for n in manifest["samples_per_shard"])
    ):
        problem = "'samples_per_shard' is not one integer per shard"
    if problem:
        raise ConfigError(
            f"data manifest {path} is not a manifest written by jobs.ingest ({problem}); give "
            "the manifest.json that jobs.ingest writes (or its directory), or rerun jobs.ingest"
        )
    return manifest


def _stage_dir(cfg: TrainConfig, run_name: str) -> Path:
    return Path(cfg.storage_path) / f"{run_name}-{cfg.stage}"


def check_layouts(cfgs: list[TrainConfig], data: DataInfo) -> None:
    """Every stage can draw its samples from the data's clips (the manifest says how they are
    laid out): a stage that cannot would otherwise fail only when it starts, maybe days in."""
    for cfg in cfgs:
        try:
            check_layout(data.layout, cfg.loader, data.uri, cfg.model.long_term_gap)
        except UnusableClip as e:
            raise ConfigError(str(e)) from None


def check_same_data(cfgs: list[TrainConfig], run_name: str, data: DataInfo) -> None:
    """Refuse to resume, or to skip as finished, a stage of `run_name` that started on other
    data: its checkpoints and registered model say which data they learnt from."""
    for cfg in cfgs:
        path = _stage_dir(cfg, run_name) / DATA_FILE
        if not path.exists():
            continue
        recorded = json.loads(path.read_text())
        if recorded["data_hash"] != data.content_hash:
            latest = _latest_checkpoint(path.parent)
            skipped = (
                f" with {len(data.skipped)} corrupt shards skipped: {data.skipped}"
                if data.skipped
                else ""
            )
            raise ConfigError(
                f"run {run_name!r} stage {cfg.stage} started on data {recorded['data']} "
                f"(content hash {recorded['data_hash'][:12]}, {path}), not on --data "
                f"{data.uri} ({data.content_hash[:12]}{skipped}): give that data to resume it, "
                "or a new --run-name to train on this data"
                + (f" (checkpoint.init_from={latest} starts from its weights)" if latest else "")
            )


def check_finished_stages(cfgs: list[TrainConfig], run_name: str) -> None:
    """A finished stage is reused as it is: refuse it under another model config, as a resume
    is refused, before any MLflow run is touched. Other changes (schedule, optim, ...) leave
    it finished (setup_runs warns about each changed param)."""
    for cfg in cfgs:
        done_file = _stage_dir(cfg, run_name) / DONE_FILE
        if not done_file.exists():
            continue
        final = json.loads(done_file.read_text())["checkpoint"]
        try:
            state, used, _ = load_latest_valid(final)
        except NoReadableCheckpoint:
            continue  # nothing to compare; chaining from it names the fix
        check_compatible(
            state,
            cfg.model.as_args(),
            f"{used} (stage {cfg.stage} of run {run_name!r}, finished: {done_file})",
        )


def _latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return dirs[-1] if dirs else None


def preflight_checkpoints(cfg: TrainConfig, run_dir: Path, tracking_uri: str) -> None:
    """Refuse a resume or init checkpoint from another model config before workers start."""
    model_args = cfg.model.as_args()
    latest = _latest_checkpoint(run_dir)
    if latest is not None:
        try:
            state, used, _ = load_latest_valid(latest)
        except NoReadableCheckpoint as e:  # e.g. killed while writing the first checkpoint
            start = cfg.checkpoint.init_from or "scratch"
            log.warning("stage %s: %s; it starts afresh from %s", cfg.stage, e, start)
        else:
            check_compatible(state, model_args, str(used))
            return
    if cfg.checkpoint.init_from:
        from mlflow.exceptions import MlflowException

        try:
            state = load_state(cfg.checkpoint.init_from, tracking_uri)
        except (OSError, CheckpointError, MlflowException) as e:  # the registry's: no such model
            raise CheckpointError(
                f"checkpoint.init_from={cfg.checkpoint.init_from!r}: {e}; give a readable "
                "checkpoint directory or a models:/ URI"
            ) from e
        check_compatible(state, model_args, cfg.checkpoint.init_from)


def readable_final(previous: str, stage: str, run_name: str) -> tuple[str, list[str]]:
    """The previous stage's final checkpoint, or the newest readable one beside it if that is
    corrupt (recorded); returns (path, [corrupt paths skipped])."""
    try:
        _, used, skipped = load_latest_valid(previous)
    except NoReadableCheckpoint as e:
        done_file = Path(previous).parent / DONE_FILE
        raise CheckpointError(
            f"stage {stage} of run {run_name!r} left nothing to start the next stage from: {e}. "
            f"Rerun {stage} (delete {done_file}) or pass checkpoint.init_from=<checkpoint dir "
            "or models:/ URI>"
        ) from e
    if skipped:
        log.warning("stage %s: final checkpoint %s is corrupt; using %s", stage, previous, used)
    return str(used), skipped


def run_stage(cfg: TrainConfig, run_name: str, data: DataInfo, tracking_uri: str, run_id: str):
    """One Ray Train fit; returns (final checkpoint dir, final metrics)."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = _stage_dir(cfg, run_name)
    local_mode = cfg.scaling.num_workers == 0
    if cfg.scaling.use_gpu == "auto":
        gpus = torch.cuda.device_count() if local_mode else ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0
    else:
        use_gpu = cfg.scaling.use_gpu == "true"
    latest = _latest_checkpoint(run_dir)
    loop_config = {
        "train": to_dict(cfg),
        "source": data.source,
        "run_dir": str(run_dir),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "local_mode": local_mode,
        # The newest checkpoint on disk. Local mode (num_workers=0) resumes from it; Ray
        # restores its own runs by name, from it when its record of the run is older.
        "resume_from": str(latest) if latest else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(
            f"stage {cfg.stage} failed after {cfg.scaling.max_failures} retries: {e}\n"
            f"checkpoints stay in {run_dir}; rerun the same command (same --run-name) to resume"
        ) from e
    if result.error is not None:
        raise TrainingError(f"stage {cfg.stage} failed: {result.error}") from result.error
    metrics = result.metrics or {}
    if metrics.get("error"):
        raise TrainingError(
            f"stage {cfg.stage} stopped: {metrics['error']}; the last good checkpoint stays in "
            f"{run_dir} (lower optim.lr or set optim.grad_clip, then rerun the same command)"
        )
    final = _latest_checkpoint(run_dir)
    if result.checkpoint is not None and not local_mode:
        reported = Path(result.checkpoint.path)
        if final is None or checkpoint_step(final) <= checkpoint_step(reported):
            final = reported
        else:  # newer on disk than in Ray's record: a job killed after the stage's last
            # checkpoint landed, before Ray recorded it. The rerun's workers resumed from it at
            # the last step and reported nothing, so Ray's is the older one. Taken if it reads
            # (else the newest one below it that does: Ray's, beside it in run_dir).
            try:
                final = load_latest_valid(final)[1]
            except NoReadableCheckpoint:
                final = reported
    if final is None:
        raise TrainingError(f"stage {cfg.stage} ended without a checkpoint in {run_dir}")
    return final, metrics


def register(cfg: TrainConfig, final: Path, run_name: str, data: DataInfo, uri: str, run_id: str):
    state, _, _ = load_latest_valid(final)
    example_input = torch.load(final / EXAMPLE_INPUT_FILE, map_location="cpu", weights_only=True)
    from model import MAST

    example = compute_example(
        MAST.from_state(state), example_input["frames"], example_input["gaps"], cfg.seed
    )
    tags = {
        "stage": cfg.stage,
        "git_commit": git_commit(),
        "data_hash": data.content_hash,
        "final_loss": f"{state.get('metrics', {}).get('loss', float('nan')):.6g}",
        "run_name": run_name,
        "step": str(state["step"]),
    }
    return register_stage_model(
        uri=uri,
        run_id=run_id,
        model_name=cfg.mlflow.registered_model,
        stage=cfg.stage,
        state=state,
        example=example,
        tags=tags,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested stages; returns {stage: {"checkpoint", "version", "metrics"}}."""
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data={args.data}")
    if args.run_name:
        overrides.insert(0, f"run_name={args.run_name}")
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfgs = load_stage_configs(args.config, stages, overrides)
    first = cfgs[0]
    data = describe_data(first.data)
    check_layouts(cfgs, data)
    uri = resolve_tracking_uri(first.mlflow.tracking_uri)
    check_reachable(uri)
    run_name = first.run_name or time.strftime("mast-%Y%m%d-%H%M%S")
    check_same_data(cfgs, run_name, data)
    check_finished_stages(cfgs, run_name)
    start_ray([c for c in cfgs if not (_stage_dir(c, run_name) / DONE_FILE).exists()])
    runs = setup_runs(uri, first.mlflow.experiment, run_name, {c.stage: flatten(c) for c in cfgs})
    ended: set[str] = set()  # child runs that have their final status
    try:
        outputs = train_stages(cfgs, run_name, data, uri, runs, ended)
    except BaseException as e:
        # Whatever stopped the job (a checkpoint refused before a stage, a failed stage,
        # Ctrl-C), its runs must not stay RUNNING forever.
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for run_id in [*runs.child_run_ids.values(), runs.parent_run_id]:
            if run_id not in ended:
                try:
                    finish_run(uri, run_id, status)
                except Exception as end_error:  # noqa: BLE001 - keep the original error
                    log.warning("could not mark MLflow run %s %s: %s", run_id, status, end_error)
        raise
    finish_run(uri, runs.parent_run_id)
    return outputs


def start_ray(cfgs: list[TrainConfig]) -> None:
    """Join the cluster named by RAY_ADDRESS (or one started on this machine with `ray
    start`), or start a local instance, when a stage to run needs Ray (local mode, 0
    workers, does not); then `check_fits` every such stage."""
    if not any(c.scaling.num_workers > 0 for c in cfgs):
        return
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    may_grow = ray_may_grow()
    for cfg in cfgs:
        if cfg.scaling.num_workers > 0:
            check_fits(cfg, ray.nodes(), may_grow)


def check_fits(cfg: TrainConfig, nodes: list[dict[str, Any]], may_grow: bool) -> None:
    """Ray waits forever for workers that no node can place, and says so only in its logs
    (the stage configs ask for 8 workers of 4 CPUs, one 8-GPU node). Refused when the
    cluster cannot grow (the local instance this job started), else a warning. A worker
    takes `cpus_per_worker` CPUs, and a GPU when use_gpu is true (or auto, on a cluster
    with GPUs), all on one node."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    total_gpus = sum(r.get("GPU", 0) for r in alive)
    sc = cfg.scaling
    gpu = sc.use_gpu == "true" or (sc.use_gpu == "auto" and total_gpus > 0)
    if placeable(alive, sc.cpus_per_worker, gpu) >= sc.num_workers:
        return
    total_cpus = sum(r.get("CPU", 0) for r in alive)
    message = (
        f"stage {cfg.stage}: scaling.num_workers={sc.num_workers} workers of "
        f"scaling.cpus_per_worker={sc.cpus_per_worker:g} CPUs{' and 1 GPU' if gpu else ''} "
        f"do not fit the Ray cluster ({len(alive)} node(s), {total_cpus:g} CPUs, "
        f"{total_gpus:g} GPUs)"
    )
    if may_grow:
        log.warning("%s: the stage waits until nodes join the cluster", message)
        return
    if gpu and not total_gpus:
        raise ConfigError(f"{message}; pass scaling.use_gpu=auto (or false) on a CPU machine")
    cpus = min(sc.cpus_per_worker, 1.0)
    fit = min(placeable(alive, cpus, gpu), sc.num_workers)
    if not fit:
        raise ConfigError(f"{message}; start Ray with CPUs for at least one worker")
    raise ConfigError(
        f"{message}; on this machine pass scaling.num_workers={fit} "
        f"scaling.cpus_per_worker={cpus:g}, or use configs/train/demo.yaml (sized for one machine)"
    )


def train_stages(
    cfgs: list[TrainConfig],
    run_name: str,
    data: DataInfo,
    uri: str,
    runs: StageRuns,
    ended: set[str],
) -> dict[str, Any]:
    """Each stage in turn, from the previous one's final checkpoint; finished ones skipped."""
    for c in cfgs:
        child = runs.child_run_ids[c.stage]
        log_dataset(uri, child, data.uri, data.content_hash, data.num_samples, data_tags(data))
    outputs: dict[str, Any] = {}
    previous: str | None = None
    previous_stage = ""
    for cfg in cfgs:
        run_dir = _stage_dir(cfg, run_name)
        done_file = run_dir / DONE_FILE
        child = runs.child_run_ids[cfg.stage]
        if done_file.exists():
            outputs[cfg.stage] = json.loads(done_file.read_text())
            previous, previous_stage = outputs[cfg.stage]["checkpoint"], cfg.stage
            ended.add(child)
            log.info("stage %s already finished (%s); skipping", cfg.stage, done_file)
            continue
        if previous and not cfg.checkpoint.init_from:
            init_from, skipped = readable_final(previous, previous_stage, run_name)
            if skipped:
                set_tag(uri, child, "init_from_corrupt_skipped", ",".join(skipped))
            cfg = dataclasses.replace(
                cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=init_from)
            )
        preflight_checkpoints(cfg, run_dir, uri)
        if not (run_dir / DATA_FILE).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "data": data.uri,
                "data_hash": data.content_hash,
                "skipped_shards": data.skipped,
            }
            atomic_write_bytes(str(run_dir / DATA_FILE), json.dumps(record).encode())
        log.info(
            "stage %s: %d steps on %d workers -> %s",
            cfg.stage,
            cfg.schedule.steps,
            cfg.scaling.num_workers,
            run_dir,
        )
        final, metrics = run_stage(cfg, run_name, data, uri, child)
        version = register(cfg, final, run_name, data, uri, child) if cfg.mlflow.register else None
        finish_run(uri, child)
        ended.add(child)
        outputs[cfg.stage] = {
            "checkpoint": str(final),
            "version": version,
            "metrics": metrics,
            "run_id": child,
        }
        done_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(str(done_file), json.dumps(outputs[cfg.stage], default=str).encode())
        previous, previous_stage = str(final), cfg.stage
    return outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train MAST with Ray Train through one or more stages (see module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=value overrides, defaults shown):\n" + config_help(TrainConfig),
    )
    parser.add_argument(
        "--config",
        default=None,
        help="stage or multi-stage YAML (default: configs/train/<stage>.yaml)",
    )
    parser.add_argument("--data", default="", help="manifest.json (or its directory) or shard URLs")
    parser.add_argument("--stages", default="", help="comma list, e.g. pretrain,main,dynamic")
    parser.add_argument("--run-name", default="", help="the same name resumes an interrupted run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: `key=value` overrides may come before or after the options.
    return parser.parse_intermixed_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        out = main(parse_args())
    except (ConfigError, CheckpointError, TrackingError, TrainingError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        json.dumps(
            {k: {"version": v["version"], "checkpoint": v["checkpoint"]} for k, v in out.items()}
        )
    )
