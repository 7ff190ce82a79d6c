"""Evaluate a MAST model on DAVIS-2017 (semi-supervised) with the official J&F protocol.

    python -m jobs.evaluate --model models:/mast@champion --davis-root /data/DAVIS \
        [--split val] [--sequences bear,bmx-trees] [--output runs/eval] [--promote champion]
    ray job submit --working-dir . -- python -m jobs.evaluate \
        --model models:/mast/3 --davis-root /data/DAVIS --config configs/eval/default.yaml

Shape of the job (img2dataset-style): the driver resolves the model once (a checkpoint dict in
Ray's object store), then runs one Ray task per sequence with a bounded number in flight; each
task predicts, writes `<output>/<seq>/<frame>.png` (indexed, DAVIS palette, frame 0 = the
ground truth), scores and draws a picture, and returns a small result. Failed sequences are
recorded with their reason and the rest are still scored. The driver then recomputes both
official CSVs (never reuses stale ones), logs an MLflow evaluation run linked to the model
version, tags the version, optionally promotes an alias, and writes `summary.json` last as
the completion marker. With `ray.enabled=false` the same per-sequence function runs in this
process: the numbers are identical.

Every result records its test protocol (the `protocol` section resolved against the model,
jobs/eval_protocol.py: `mast` by default) beside the CSVs, in summary.json, on the run and on
the model version.

MLflow: `mlflow.tracking_uri` (else $MLFLOW_TRACKING_URI, else the project's SQLite store) is
where models:/ and runs:/ URIs are read from, also with `mlflow.enabled=false`, which only
turns off logging the evaluation. Scores are tagged per DAVIS set (`davis_set_id`: a content
hash of the scored sequences' ground truth and the scoring options) and protocol, and
`--promote` compares only full evaluations on the same set under the same protocol: if the
alias holder has no such score, the alias stays and the log says which command evaluates the
holder on it (jobs/eval_mlflow.py).

Exit codes: 0 scored, 1 nothing could be scored, 2 could not run (a one-line `error: ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import storage
from davis.io import DavisError, check_sequence_name, read_split, write_results_csvs
from davis.metrics import global_scores
from jobs.eval_baselines import BASELINE_PREFIX
from jobs.eval_config import EvalConfig
from jobs.eval_fanout import run_sequences
from jobs.eval_finish import finish
from jobs.eval_protocol import Protocol, protocol_file, write_protocol_file
from jobs.eval_reuse import SUMMARY_FILE, eval_key, find_reusable, model_digest
from jobs.eval_sequence import SequenceResult, baseline_state, model_test_radius
from typedconfig import ConfigError, config_help, load_config

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The whole evaluation cannot run (unreadable model, no DAVIS root); says how to fix it."""


def reads_registry(model_uri: str) -> bool:
    return model_uri.startswith(("models:/", "runs:/"))


def open_store(configured: str, model_uri: str) -> tuple[str, Any]:
    """(tracking URI, MlflowClient) to read the model from and log to, checked before any
    work."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from jobs.tracking import TrackingError, check_reachable, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(configured)
    db = sqlite_path(uri)
    if db is not None and db.is_absolute() and not db.is_file() and reads_registry(model_uri):
        # Opening it would create an empty store and report "model not found" in it.
        raise EvalError(
            f"cannot load model {model_uri!r}: no MLflow store at {db} ({uri}); set "
            "mlflow.tracking_uri=... or MLFLOW_TRACKING_URI to the store it was registered in"
        )
    try:
        check_reachable(uri)
        client = MlflowClient(uri, registry_uri=uri)  # refuses a scheme with no MLflow store
    except TrackingError as e:
        raise EvalError(str(e)) from e
    except MlflowException as e:
        raise EvalError(
            f"MLflow tracking URI {uri!r} is not a store MLflow can open; use "
            "sqlite:////absolute/path/mlflow.db, http(s)://host:port or a database URL "
            "(postgresql://, mysql://)"
        ) from e
    return uri, client


def load_model_state(uri: str, tracking_uri: str = "", cfg: EvalConfig | None = None) -> dict:
    """The checkpoint dict behind a models:/, runs:/ URI or a local checkpoint path, or what
    stands for a baseline (`baseline:colour`, `baseline:copy-first`)."""
    from jobs.registry import load_state
    from jobs.tensor_files import CheckpointError
    from model import BASELINES

    if uri.startswith(BASELINE_PREFIX):
        name = uri.removeprefix(BASELINE_PREFIX)
        if name not in BASELINES:
            raise EvalError(
                f"unknown baseline {uri!r}; choose one of "
                f"{[BASELINE_PREFIX + b for b in BASELINES]}"
            )
        return baseline_state(name, (cfg or EvalConfig()).colour_temperature)

    where = f" from the MLflow store {tracking_uri}" if reads_registry(uri) else ""
    try:
        return load_state(uri, tracking_uri or None)
    except CheckpointError as e:  # names the file and its fix (e.g. may hold code: convert)
        raise EvalError(f"cannot load model {uri!r}{where}: {e}") from e
    except Exception as e:  # noqa: BLE001 - registry and download errors alike
        if reads_registry(uri) and tracking_uri:
            from mlflow.tracking import MlflowClient

            from jobs.eval_mlflow import what_exists

            hint = what_exists(MlflowClient(tracking_uri, registry_uri=tracking_uri), uri)
            where += f" ({hint})" if hint else ""
        raise EvalError(
            f"cannot load model {uri!r}{where} ({type(e).__name__}: {e}); pass "
            "models:/name@alias, models:/name/N, runs:/<run_id>/model or a checkpoint path "
            "written by jobs.train"
        ) from e


def resolve_sequences(root: str | Path, cfg: EvalConfig) -> tuple[list[str], int]:
    """Names to evaluate (cfg.sequences, else the split file) and the split's size."""
    if not Path(root).is_dir():
        raise EvalError(f"--davis-root {root} is not a directory")
    try:
        split = read_split(root, cfg.split)
    except DavisError as e:
        if not cfg.sequences:
            raise EvalError(str(e)) from e
        split = []
    names = list(cfg.sequences) or split
    if not names:
        raise EvalError(f"no sequences to evaluate in {root} (split {cfg.split})")
    return names, len(split)


def davis_set_id(root: str | Path, names: list[str], cfg: EvalConfig) -> str:
    """12 hex digits naming what a J&F is measured on: the sequences, their ground-truth files
    and the scoring options. Split names repeat across folders and paths move, so only scores
    with equal ids are compared."""
    digest = hashlib.sha256(f"ignore_void={cfg.ignore_void} bound_th={cfg.bound_th}\n".encode())
    for name in sorted(names):
        digest.update(f"{name}\n".encode())
        try:
            check_sequence_name(name)
        except DavisError:
            continue  # never read; its task reports it failed
        for png in sorted((Path(root) / "Annotations" / cfg.resolution / name).glob("*.png")):
            digest.update(png.name.encode() + hashlib.sha256(png.read_bytes()).digest())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Driver


def summarise(
    results: list[SequenceResult],
    cfg: EvalConfig,
    root,
    split_size: int,
    davis_set: str,
    protocol: Protocol,
) -> dict:
    scored = [r for r in results if r.ok]
    full = not cfg.sequences and len(scored) == split_size and split_size > 0
    return {
        "split": cfg.split,
        "davis_root": str(Path(root).absolute()),
        "davis_set": davis_set,
        "protocol": protocol.spec(),
        "scored": len(scored),
        "requested": len(results),
        "scope": "full" if full else f"partial {len(scored)}/{split_size}",
        "failed": [{"sequence": r.name, "error": r.error} for r in results if not r.ok],
        "sequences": [
            {
                "sequence": r.name,
                "status": r.status,
                "frames": r.num_frames,
                "objects": len(r.objects),
                "seconds": round(r.seconds, 3),
            }
            for r in results
        ],
    }


def evaluate(
    model_uri: str, davis_root: str | Path, cfg: EvalConfig, promote: str = "", force: bool = False
) -> dict:
    """Run the whole evaluation, or reuse a finished one of the same model, DAVIS set, protocol
    and scoring options (`jobs.eval_reuse`) unless `force`; returns the summary (also written
    to <output>/summary.json)."""
    output = Path(cfg.output).absolute()
    problem = storage.not_a_directory(str(output))
    if problem:
        raise EvalError(f"--output {output} {problem}; give a directory path for the results")
    names, split_size = resolve_sequences(davis_root, cfg)
    tracking_uri, store = "", None
    if cfg.mlflow.enabled or reads_registry(model_uri):  # fail before the work, not after it
        tracking_uri, store = open_store(cfg.mlflow.tracking_uri, model_uri)
    client = ref = None
    try:
        if cfg.mlflow.enabled:
            from jobs.eval_mlflow import resolve_model_ref, what_exists

            client = store
            try:
                ref = resolve_model_ref(client, model_uri)
            except Exception as e:  # noqa: BLE001 - unknown name/alias/version
                hint = what_exists(client, model_uri)
                raise EvalError(
                    f"cannot resolve model {model_uri!r} in {tracking_uri}: {e}"
                    + (f" ({hint})" if hint else "")
                ) from e
        if promote and (ref is None or not ref.name):
            raise EvalError(
                f"--promote {promote} needs a registered model URI (models:/name/N or "
                f"models:/name@alias) and MLflow enabled, got {model_uri!r}"
            )
        state = load_model_state(model_uri, tracking_uri, cfg)
    except EvalError as e:
        if cfg.mlflow.enabled:
            from jobs.eval_mlflow import log_failed_run

            log_failed_run(tracking_uri, cfg.mlflow.experiment, model_uri, str(e))
        raise
    # The protocol as it runs (radius None -> the model's own): every task, the evaluation key,
    # the logged config and the colour baseline beside the model see this one.
    protocol = Protocol.resolve(cfg.protocol, model_test_radius(state))
    cfg = dataclasses.replace(cfg, protocol=protocol.config())
    davis_set = davis_set_id(davis_root, names, cfg)
    key = eval_key(model_digest(state), davis_set, cfg)
    if not force:
        reused, where = find_reusable(store if cfg.mlflow.enabled else None,
                                      cfg.mlflow.experiment, key, output)  # fmt: skip
        if reused is not None:
            log.info("reusing the evaluation in %s (same model, data and options; --force "
                     "evaluates again)", where)  # fmt: skip
            reused["reused"] = where
            reused["model_uri"] = model_uri
            return finish(reused, cfg, protocol, client, ref, promote, output)
    log.info(
        "evaluating %s on %d sequences of %s (%s) under protocol %s",
        model_uri, len(names), davis_root, cfg.split, protocol.id,
    )  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / SUMMARY_FILE).unlink(missing_ok=True)  # the marker goes last
    results = run_sequences(state, Path(davis_root).absolute(), names, output, cfg)
    summary = summarise(results, cfg, davis_root, split_size, davis_set, protocol)
    summary["eval_key"] = key
    summary["model_uri"] = model_uri
    objects = [o for r in results if r.ok for o in r.objects]
    scores = global_scores(objects) if objects else None
    artifacts = []
    if objects:  # the official CSVs, and beside them the protocol they were measured under
        artifacts += write_results_csvs(output, cfg.split, objects)
        artifacts.append(write_protocol_file(output, cfg.split, protocol))
    else:  # never leave stale numbers beside a run that scored nothing
        for name in (
            f"global_results-{cfg.split}.csv",
            f"per-sequence_results-{cfg.split}.csv",
            protocol_file(cfg.split),
        ):
            (output / name).unlink(missing_ok=True)
    summary["scores"] = scores
    if cfg.mlflow.enabled:
        from jobs.eval_mlflow import log_evaluation

        overlays = [Path(r.overlay) for r in results if r.overlay]
        run_id = log_evaluation(
            tracking_uri=tracking_uri, experiment=cfg.mlflow.experiment, ref=ref, cfg=cfg,
            summary=summary, scores=scores, objects=objects, artifacts=artifacts, overlays=overlays,
        )  # fmt: skip
        summary["mlflow_run_id"] = run_id
    return finish(summary, cfg, protocol, client, ref, promote, output, force=force)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Score a MAST model on DAVIS-2017 with the official J&F protocol.",
        epilog="config keys (override with key=value, e.g. ray.max_in_flight=4):\n"
        + config_help(EvalConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/name@alias, models:/name/N, runs:/... or a checkpoint path",
    )
    parser.add_argument(
        "--davis-root", required=True, help="folder with JPEGImages/, Annotations/, ImageSets/"
    )
    parser.add_argument("--split", default=None, help="ImageSets/2017/<split>.txt (default: val)")
    parser.add_argument(
        "--sequences", default=None, help="comma-separated subset (default: the whole split)"
    )
    parser.add_argument("--output", default=None, help="results folder (default: runs/eval)")
    parser.add_argument(
        "--promote",
        default="",
        help="move this alias to the model if its J&F beats the holder's (same set and protocol)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML of EvalConfig keys, e.g. configs/eval/default.yaml"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="evaluate even if this model was scored on this DAVIS set, protocol and options",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: `key=value` overrides may come before or after the options.
    return parser.parse_intermixed_args(argv)


def main(args: argparse.Namespace) -> dict:
    import os

    # No MLflow flavour may unpickle a model in this job (ours load tensors only).
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    overrides = list(args.overrides)
    if args.split:
        overrides.append(f"split={args.split}")
    if args.sequences:
        overrides.append(f"sequences=[{args.sequences}]")
    if args.output:
        overrides.append(f"output={args.output}")
    cfg = load_config(EvalConfig, args.config, overrides)
    return evaluate(args.model, args.davis_root, cfg, promote=args.promote, force=args.force)


def cli(argv: list[str] | None = None) -> int:
    """The command line's exit code; a job that cannot run prints one `error:` line."""
    try:
        result = main(parse_args(argv))
    except (ConfigError, EvalError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # causes may wrap
        return 2
    return 0 if result["scores"] is not None else 1


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(cli())
