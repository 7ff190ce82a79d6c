"""Train MAST with Ray Train (DDP) through one or more stages, tracked and registered in MLflow.

    python -m jobs.train --config configs/train/pretrain.yaml --data runs/shards/manifest.json
    python -m jobs.train --config configs/train/demo.yaml --stages pretrain,main,dynamic \\
        --data runs/shards/manifest.json --run-name demo scaling.num_workers=2
    ray job submit --working-dir . -- python -m jobs.train --stages pretrain,main,dynamic \\
        --data s3://bucket/shards/manifest.json --run-name mast-v1 storage_path=s3://bucket/runs \\
        mlflow.tracking_uri=http://mlflow:5000

Everything that can be checked is checked before Ray workers start: the config (typos name
the allowed keys; stages in the order pretrain -> main -> dynamic), the data (a missing,
empty or malformed manifest is an error; unreadable shards are skipped and recorded in the
MLflow runs), the tracking store (reachable, writable) and any checkpoint to resume or start
from (same model config). Each stage is a Ray Train run named `<run_name>-<stage>` under
`storage_path` (a path, or an object-store URL: no shared filesystem needed,
`jobs.stage_dir`); rerunning the same command resumes it from its latest readable checkpoint
(none readable: the stage starts afresh), and a stage that already finished
(`stage_done.json`) is skipped, both only on the data the stage started on (`stage_data.json`:
the manifest's content hash, combined with the names of skipped shards) and, for the model,
the same model config. Each stage starts from the previous stage's final checkpoint (if that
is corrupt, the newest readable one beside it) and ends with a registered model version and
the alias `<stage>-latest`. When the job stops with an error, its MLflow runs end FAILED.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from jobs import mlflow_keys as keys
from jobs.checkpoint import CheckpointError
from jobs.ray_fit import TrainingError, start_ray
from jobs.stage_dir import StageDir
from jobs.stages import check_finished_stages, check_same_data, train_stages
from jobs.tracking import (
    TrackingError,
    check_reachable,
    finish_run,
    resolve_tracking_uri,
    setup_runs,
)
from jobs.train_config import TrainConfig, load_stage_configs
from jobs.train_data import check_layouts, describe_data
from typedconfig import ConfigError, config_help, flatten

log = logging.getLogger("jobs.train")


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
    start_ray([c for c in cfgs if not StageDir.of(c, run_name).is_done()])
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


def summary_table(out: dict[str, Any]) -> str:
    """The stages this run trained, as a person reads them at the end of the job."""
    rows = [("stage", "version", "alias", "final checkpoint")]
    rows += [
        (stage, str(v["version"] or "-"), keys.latest_alias(stage) if v["version"] else "-",
         str(v["checkpoint"]))
        for stage, v in out.items()
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    last = next(reversed(out)) if out else ""
    evaluate = (
        f"python -m jobs.evaluate --model models:/{keys.MODEL_NAME}@{keys.latest_alias(last)} "
        "--davis-root DAVIS"
    )
    return "\n".join(["", "trained:", *lines, "", f"next: {evaluate}"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description=__doc__,
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
    import os

    # No MLflow flavour may unpickle a model in this job; workers of the local Ray it starts
    # inherit this (a cluster's get it from infra/runtime_env.yaml).
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        out = main(parse_args())
    except (ConfigError, CheckpointError, TrackingError, TrainingError) as e:
        raise SystemExit(f"error: {e}") from None
    # Scripts read the JSON line on stdout; a person reads the table after it, on stderr.
    print(
        json.dumps(
            {k: {"version": v["version"], "checkpoint": v["checkpoint"]} for k, v in out.items()}
        ),
        flush=True,
    )
    print(summary_table(out), file=sys.stderr)
