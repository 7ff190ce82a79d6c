"""MLflow side of jobs.evaluate: the evaluation run, the model-version tags, alias promotion.

- One evaluation run per invocation (experiment `mlflow.experiment`), tagged with the model
  URI and, for registry URIs, the model name and version; metrics are also linked to the
  version's LoggedModel (MLflow 3 `model_id`) so they show next to the model.
- Artifacts: the two official CSVs, a per-sequence table (per object, with Recall/Decay and
  frame counts), failures.json, and one picture per sequence (GT over prediction).
- The version gets tags `davis.<split>.JF_mean`, `.J_mean`, `.F_mean`, `.scope`, `.run_id`.
  `scope` is "full" when every sequence of the split was scored, else "partial n/N".
- `--promote ALIAS` moves the alias only if this version's J&F on the split is strictly higher
  than the holder's (both full-scope); the decision and its reason are tagged on the run and
  the version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.config import flatten
from jobs.davis_metrics import ObjectScore

log = logging.getLogger(__name__)

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


def metric_key(measure: str) -> str:
    """MLflow names allow no '&': J&F-Mean -> JF-Mean."""
    return measure.replace("&", "")


def version_tag(split: str, what: str) -> str:
    return f"davis.{split}.{what}"


@dataclasses.dataclass(frozen=True)
class ModelRef:
    uri: str
    name: str = ""  # registered model name, "" for a checkpoint path or runs:/ URI
    version: str = ""
    model_id: str = ""  # MLflow 3 LoggedModel id of the version, if any


def resolve_model_ref(client, uri: str) -> ModelRef:
    """Name and version behind models:/name/N or models:/name@alias (else a bare ref)."""
    m = _MODEL_URI.match(uri)
    if m is None:
        return ModelRef(uri)
    name = m["name"]
    if m["alias"]:
        mv = client.get_model_version_by_alias(name, m["alias"])
    else:
        mv = client.get_model_version(name, m["version"])
    model_id = getattr(mv, "model_id", None) or ""
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source).removeprefix("models:/")  # MLflow 3 LoggedModel source
    return ModelRef(uri, name, str(mv.version), model_id)


def object_table(objects: list[ObjectScore]) -> pd.DataFrame:
    rows = []
    for o in objects:
        (jm, jr, jd), (fm, fr, fd) = o.j, o.f
        rows.append(
            {
                "Sequence": o.name,
                "J&F-Mean": (jm + fm) / 2,
                "J-Mean": jm,
                "J-Recall": jr,
                "J-Decay": jd,
                "F-Mean": fm,
                "F-Recall": fr,
                "F-Decay": fd,
                "frames": len(o.j_frames),
            }
        )
    return pd.DataFrame(rows)


def log_evaluation(
    *,
    tracking_uri: str,
    experiment: str,
    ref: ModelRef,
    cfg: Any,
    summary: dict[str, Any],
    scores: dict[str, float] | None,
    objects: list[ObjectScore],
    artifacts: list[Path],
    overlays: list[Path],
) -> str:
    """Create the evaluation run; returns its id."""
    import mlflow

    from jobs.tracking import ensure_experiment

    mlflow.set_tracking_uri(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    label = f"{ref.name}-v{ref.version}" if ref.name else Path(ref.uri).name
    tags = {
        "mast.role": "evaluation",
        "model_uri": ref.uri,
        "davis.split": summary["split"],
        "davis.scope": summary["scope"],
        "davis.failed_sequences": str(len(summary["failed"])),
    }
    if ref.name:
        tags |= {"model_name": ref.name, "model_version": ref.version}
    status = "FINISHED" if scores is not None else "FAILED"
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"eval-{label}-{summary['split']}", tags=tags
    ) as run:
        params = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
        params |= {"model_uri": ref.uri, "davis_root": summary["davis_root"]}
        mlflow.log_params(params)
        if scores is not None:
            metrics = {metric_key(k): v for k, v in scores.items()}
            metrics |= {"sequences_scored": summary["scored"], "objects": len(objects)}
            mlflow.log_metrics(metrics)
            if ref.model_id:  # shows the numbers on the model's own page (MLflow 3)
                try:
                    mlflow.log_metrics(
                        {f"davis_{summary['split']}/{metric_key(k)}": v for k, v in scores.items()},
                        model_id=ref.model_id,
                    )
                except Exception as e:  # noqa: BLE001 - optional link; the run has the numbers
                    log.warning("could not link metrics to model %s: %s", ref.model_id, e)
            mlflow.log_table(object_table(objects), artifact_file="per_sequence_table.json")
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for path in overlays:
            mlflow.log_artifact(str(path), artifact_path="overlays")
        with tempfile.TemporaryDirectory() as tmp:
            failures = Path(tmp) / "failures.json"
            failures.write_text(json.dumps(summary["failed"], indent=2))
            mlflow.log_artifact(str(failures))
        if summary["failed"]:
            mlflow.set_tag(
                "davis.failures",
                "; ".join(f"{f['sequence']}: {f['error']}"[:200] for f in summary["failed"])[:5000],
            )
        run_id = run.info.run_id
    if status == "FAILED":
        mlflow.tracking.MlflowClient(tracking_uri).set_terminated(run_id, "FAILED")
    return run_id


def log_failed_run(tracking_uri: str, experiment: str, model_uri: str, error: str) -> str:
    """An evaluation that could not start (e.g. unreadable model) is still on record."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking import ensure_experiment

    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    tags = {"mast.role": "evaluation", "model_uri": model_uri, "error": error[:5000]}
    run = client.create_run(exp_id, run_name="eval-failed", tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def tag_model_version(
    client, ref: ModelRef, split: str, scores: dict[str, float], scope: str, run_id: str
) -> None:
    values = {
        "JF_mean": f"{scores['J&F-Mean']:.6f}",
        "J_mean": f"{scores['J-Mean']:.6f}",
        "F_mean": f"{scores['F-Mean']:.6f}",
        "scope": scope,
        "run_id": run_id,
    }
    for what, value in values.items():
        client.set_model_version_tag(ref.name, ref.version, version_tag(split, what), value)


@dataclasses.dataclass(frozen=True)
class Promotion:
    alias: str
    promoted: bool
    reason: str


def decide_promotion(
    client, ref: ModelRef, alias: str, split: str, jf: float, scope: str
) -> Promotion:
    """Move `alias` to ref's version only if its J&F on `split` beats the current holder's."""
    from mlflow.exceptions import MlflowException

    if scope != "full":
        return Promotion(
            alias, False, f"not promoted: evaluation scope is {scope}, not the full {split} split"
        )
    try:
        holder = client.get_model_version_by_alias(ref.name, alias)
    except MlflowException:
        holder = None
    if holder is None:
        return Promotion(alias, True, f"promoted: alias {alias} was free; J&F {jf:.4f} on {split}")
    if str(holder.version) == ref.version:
        return Promotion(alias, False, f"unchanged: version {ref.version} already holds {alias}")
    held = holder.tags.get(version_tag(split, "JF_mean"))
    held_scope = holder.tags.get(version_tag(split, "scope"))
    if held is None or held_scope != "full":
        return Promotion(
            alias,
            False,
            f"not promoted: holder version {holder.version} has no full-{split} J&F "
            f"(evaluate it first: jobs.evaluate --model models:/{ref.name}/{holder.version})",
        )
    if jf > float(held):
        return Promotion(
            alias,
            True,
            f"promoted: J&F {jf:.4f} beats version {holder.version}'s {float(held):.4f} on {split}",
        )
    return Promotion(
        alias,
        False,
        f"not promoted: J&F {jf:.4f} does not beat version {holder.version}'s {float(held):.4f} on {split}",
    )


def promote(
    client, ref: ModelRef, alias: str, split: str, jf: float, scope: str, run_id: str
) -> Promotion:
    """Decide, move the alias if warranted, and record the decision on the run and version."""
    decision = decide_promotion(client, ref, alias, split, jf, scope)
    if decision.promoted:
        client.set_registered_model_alias(ref.name, alias, ref.version)
    client.set_tag(run_id, f"promotion.{alias}", decision.reason)
    client.set_model_version_tag(ref.name, ref.version, f"promotion.{alias}", decision.reason)
    log.info("%s", decision.reason)
    return decision
