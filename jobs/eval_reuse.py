"""When an evaluation has already been done: the evaluation key, and finding its result again.

A DAVIS evaluation of a few sequences costs minutes and of the full val set hours, and the
same command is often run again (a rerun of `make demo`, a script that evaluates every new
version). Its result depends only on
- the model's weights and constructor arguments (`model_digest`: a content hash, so a
  checkpoint path and the registered version made from it are the same model),
- what was scored (`jobs.evaluate.davis_set_id`: the sequences' ground truth and the scoring
  options),
- the test protocol (`protocol.*`, as resolved for the model by jobs.evaluate: a radius left
  to the model and the model's own radius spelled out are one protocol, jobs.eval_protocol)
  and the other options that change a number (`SCORING_KEYS`; Ray resources, the output
  folder, pictures and MLflow settings do not).
`eval_key` hashes the three, and the label grid's version (`model.grid.LABEL_GRID`: the same
weights score differently on another grid). `jobs.evaluate` looks for a finished result with
that key before any work (`find_reusable`): an MLflow evaluation run tagged with it (when
logging is on), else the output folder's `summary.json`. `--force` evaluates again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from jobs.eval_protocol import is_protocol_file
from model.grid import LABEL_GRID
from typedconfig import flatten

log = logging.getLogger(__name__)

EVAL_KEY_TAG = "davis.eval_key"  # on every evaluation run
SUMMARY_FILE = "summary.json"  # <output>/summary.json, also logged with the run

# Config keys that change a score (prefixes end with "."); everything else does not.
SCORING_KEYS = ("split", "sequences", "resolution", "device", "ignore_void", "bound_th")
SCORING_PREFIXES = ("protocol.", "propagation.")
NOT_SCORING = ("propagation.torch_threads",)  # the same numbers with any thread count


def model_digest(state: dict[str, Any]) -> str:
    """sha256 of a loaded model (`jobs.registry.load_state`): its constructor arguments and
    its weights (`jobs.registry.weights_digest`, what registration compares too)."""
    from jobs.registry import weights_digest

    if "model" not in state:  # a baseline (jobs.eval_sequence.baseline_state): its settings
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    model_args = json.dumps(state.get("model_args", {}), sort_keys=True)
    return hashlib.sha256(f"{model_args}\n{weights_digest(state)}".encode()).hexdigest()


def scoring_options(cfg: Any) -> dict[str, Any]:
    """The config entries an evaluation's numbers depend on."""
    return {
        k: v
        for k, v in flatten(cfg).items()
        if (k in SCORING_KEYS or k.startswith(SCORING_PREFIXES)) and k not in NOT_SCORING
    }


def eval_key(model: str, davis_set: str, cfg: Any) -> str:
    """24 hex digits naming one evaluation: model digest, DAVIS set and scoring options."""
    payload = json.dumps(
        {
            "model": model,
            "davis_set": davis_set,
            "options": scoring_options(cfg),
            "label_grid": LABEL_GRID,
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def read_local_summary(output: Path, key: str) -> dict[str, Any] | None:
    """<output>/summary.json if it is a scored result of this evaluation, else None."""
    path = output / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("eval_key") != key:
        return None
    return summary if summary.get("scores") else None


def find_run(client, experiment: str, key: str):
    """The newest FINISHED evaluation run tagged with `key` in `experiment`, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{EVAL_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def restore_from_run(client, run, output: Path) -> dict[str, Any] | None:
    """The run's logged summary, CSVs and protocol record, copied into `output`; None when the
    run lacks them (logged before summaries were): then it is evaluated again."""
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if SUMMARY_FILE not in names:
        return None
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(names):
            if name == SUMMARY_FILE or name.endswith(".csv") or is_protocol_file(name):
                local = Path(client.download_artifacts(run.info.run_id, name, tmp))
                (output / name).write_bytes(local.read_bytes())
        summary = json.loads((output / SUMMARY_FILE).read_text())
    return summary if summary.get("scores") else None


def find_reusable(
    client, experiment: str, key: str, output: Path
) -> tuple[dict[str, Any] | None, str]:
    """(summary, where it came from) of a finished evaluation with this key, or (None, "")."""
    if client is not None:
        run = find_run(client, experiment, key)
        if run is not None:
            local = read_local_summary(output, key)
            if local is not None and local.get("mlflow_run_id") == run.info.run_id:
                return local, f"MLflow run {run.info.run_id} (results in {output})"
            restored = restore_from_run(client, run, output)
            if restored is not None:
                return restored, f"MLflow run {run.info.run_id} (results copied to {output})"
        return None, ""  # logging on: a result not on record in this store is not reused
    local = read_local_summary(output, key)
    return (local, str(output / SUMMARY_FILE)) if local is not None else (None, "")
