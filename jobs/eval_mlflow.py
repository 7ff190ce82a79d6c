"""MLflow side of jobs.evaluate: the evaluation run, the model-version tags, alias promotion.

- One evaluation run per invocation (experiment `mlflow.experiment`), tagged with the model
  URI, the DAVIS set id and, for registry URIs, the model name and version; metrics are also
  linked to the version's LoggedModel (MLflow 3 `model_id`) so they show next to the model.
- Artifacts: the two official CSVs, a per-sequence table (per object, with Recall/Decay and
  frame counts), failures.json, and one picture per sequence (GT over prediction).
- A J&F is comparable only with one measured on the same data under the same test protocol:
  the set id (`jobs.evaluate.davis_set_id`, a content hash of the sequences' ground truth and
  the scoring options) names the data, since paths move and every DAVIS-format folder has a
  `val` split; the protocol id (`jobs.eval_protocol`, `mast` by default) names the protocol.
  The run is tagged with both (`davis.set`, `davis.protocol`, `davis.protocol.spec` as JSON).
- Only a full evaluation (every sequence of the split scored) is tagged on the version:
  `davis.<split>.<set>.<protocol>.JF_mean`, `.J_mean`, `.F_mean`, `.run_id` (what promotion
  compares), and `davis.<split>.JF_mean`, `.J_mean`, `.F_mean`, `.scope`, `.run_id`, `.set`,
  `.protocol`, `.protocol_spec` for the latest full evaluation on the split (for people and the
  demo table; promotion never reads them). A partial evaluation ("partial n/N") stays in its
  run and never replaces a full result. Tags written before protocols were recorded
  (`davis.<split>.<set>.JF_mean`) are never compared: their protocol is unknown.
- `--promote ALIAS` moves the alias only if this full evaluation's J&F is strictly higher than
  the holder's on the same set under the same protocol. A holder without such a score keeps
  the alias (the reason names the command that evaluates it on this set under this protocol);
  a free alias is taken. The decision and its reason are tagged on the run and the version.
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

from davis.metrics import ObjectScore
from jobs import mlflow_keys as keys
from jobs.eval_protocol import Protocol
from jobs.eval_reuse import EVAL_KEY_TAG
from typedconfig import flatten

log = logging.getLogger(__name__)

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """What a J&F was measured on and under which protocol, and how much of it was scored."""

    split: str
    davis_set: str  # jobs.evaluate.davis_set_id: equal ids = the same data
    protocol: Protocol  # equal ids = the same test protocol (jobs.eval_protocol)
    scope: str  # "full" or "partial n/N"
    davis_root: str = ""  # where it was found this time (for messages only)


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


def what_exists(client, uri: str) -> str:
    """For an unknown models:/ URI: the registered models, or the given model's aliases and
    versions, so the user can pick one ("" when the store cannot say)."""
    m = _MODEL_URI.match(uri)
    if m is None:
        return ""
    try:
        names = sorted(rm.name for rm in client.search_registered_models())
        if m["name"] not in names:
            return f"registered models in this store: {', '.join(names) or 'none'}"
        aliases = client.get_registered_model(m["name"]).aliases
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name='{m['name']}'")
        )
    except Exception:  # noqa: BLE001 - only a hint; the original error is reported anyway
        return ""
    shown = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
    return f"aliases of {m['name']}: {shown}; versions: {', '.join(map(str, versions)) or 'none'}"


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
        "davis.set": summary["davis_set"],
        "davis.scope": summary["scope"],
        keys.RUN_PROTOCOL: summary["protocol"]["id"],
        keys.RUN_PROTOCOL_SPEC: json.dumps(summary["protocol"]),
        "davis.failed_sequences": str(len(summary["failed"])),
        EVAL_KEY_TAG: summary["eval_key"],  # what a later identical evaluation looks for
    }
    if ref.name:
        tags |= {"model_name": ref.name, "model_version": ref.version}
    tags[keys.RUN_DESCRIPTION] = (
        f"DAVIS {summary['split']} evaluation of {ref.uri} ({summary['scope']}, "
        f"{summary['scored']}/{summary['requested']} sequences scored, set {summary['davis_set']}, "
        f"protocol {summary['protocol']['id']})"
        + (f": {scores_line(scores)}" if scores else ": nothing scored")
    )
    status = "FINISHED" if scores is not None else "FAILED"
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"eval-{label}-{summary['split']}", tags=tags
    ) as run:
        params = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
        params |= {"model_uri": ref.uri, "davis_root": summary["davis_root"]}
        mlflow.log_params(params)
        if scores is not None:
            metrics = {keys.metric_key(k): v for k, v in scores.items()}
            metrics |= {"sequences_scored": summary["scored"], "objects": len(objects)}
            mlflow.log_metrics(metrics)
            if ref.model_id:  # shows the numbers on the model's own page (MLflow 3)
                try:
                    mlflow.log_metrics(
                        {
                            f"davis_{summary['split']}/{keys.metric_key(k)}": v
                            for k, v in scores.items()
                        },
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
    tags[keys.RUN_DESCRIPTION] = (
        f"DAVIS evaluation of {model_uri} that could not run: {error[:500]}"
    )
    run = client.create_run(exp_id, run_name="eval-failed", tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def tag_model_version(
    client, ref: ModelRef, ev: EvalSet, scores: dict[str, float], run_id: str
) -> None:
    """Record a full evaluation on the version; a partial one never replaces it."""
    if ev.scope != "full":
        log.info(
            "evaluation scope is %s: the tags of %s version %s are left as they are "
            "(the numbers are in run %s)", ev.scope, ref.name, ref.version, run_id,
        )  # fmt: skip
        return
    values = {
        "JF_mean": f"{scores['J&F-Mean']:.6f}",
        "J_mean": f"{scores['J-Mean']:.6f}",
        "F_mean": f"{scores['F-Mean']:.6f}",
        "run_id": run_id,
    }
    tags = {keys.set_tag(ev.split, ev.davis_set, ev.protocol.id, k): v for k, v in values.items()}
    tags |= {keys.version_tag(ev.split, k): v for k, v in values.items()}
    tags |= {
        keys.version_tag(ev.split, "scope"): "full",
        keys.version_tag(ev.split, "set"): ev.davis_set,
        keys.version_tag(ev.split, "protocol"): ev.protocol.id,
        keys.version_tag(ev.split, "protocol_spec"): json.dumps(ev.protocol.spec()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, value)
    # The version's description ends with its latest full result on this split.
    description = client.get_model_version(ref.name, ref.version).description or ""
    marker = f" | DAVIS {ev.split}"
    description = (
        description.split(marker)[0]
        + f"{marker} set {ev.davis_set} protocol {ev.protocol.id}: {scores_line(scores)}"
    )
    client.update_model_version(ref.name, ref.version, description=description.lstrip(" |"))


def scores_line(scores: dict[str, float]) -> str:
    return f"J&F {scores['J&F-Mean']:.3f} (J {scores['J-Mean']:.3f}, F {scores['F-Mean']:.3f})"


@dataclasses.dataclass(frozen=True)
class Promotion:
    alias: str
    promoted: bool
    reason: str


def scored_results(tags: dict[str, str], split: str) -> list[str]:
    """One `<set> (<protocol>)` per full J&F on `split` among a version's tags; a result
    tagged before protocols were recorded shows `(protocol not recorded)`."""
    # Set ids are 12 hex digits (davis_set_id): a split named "val.x" is not a set of "val".
    pattern = re.compile(
        rf"^davis\.{re.escape(split)}\.(?P<set>[0-9a-f]{{12}})(?:\.(?P<protocol>.+))?\.JF_mean$"
    )
    found = [m for m in map(pattern.match, tags) if m]
    return sorted(f"{m['set']} ({m['protocol'] or 'protocol not recorded'})" for m in found)


def decide_promotion(client, ref: ModelRef, alias: str, ev: EvalSet, jf: float) -> Promotion:
    """Move `alias` to ref's version only if its J&F beats the holder's on the same set."""
    from mlflow.exceptions import MlflowException

    on = f"{ev.split} set {ev.davis_set} under protocol {ev.protocol.id}"
    if ev.scope != "full":
        return Promotion(
            alias,
            False,
            f"not promoted: evaluation scope is {ev.scope}, not the full {ev.split} split",
        )
    try:
        holder = client.get_model_version_by_alias(ref.name, alias)
    except MlflowException:
        holder = None
    if holder is None:
        return Promotion(alias, True, f"promoted: alias {alias} was free; J&F {jf:.4f} on {on}")
    if str(holder.version) == ref.version:
        return Promotion(alias, False, f"unchanged: version {ref.version} already holds {alias}")
    held = holder.tags.get(keys.set_tag(ev.split, ev.davis_set, ev.protocol.id, "JF_mean"))
    if held is None:  # nothing comparable: the holder keeps the alias, as for other data
        others = ", ".join(scored_results(holder.tags, ev.split)) or "none"
        command = " ".join(
            [
                f"python -m jobs.evaluate --model models:/{ref.name}/{holder.version}",
                f"--davis-root {ev.davis_root or 'ROOT'} --split {ev.split}",
                *ev.protocol.overrides(),
            ]
        )
        return Promotion(
            alias,
            False,
            f"not promoted: holder version {holder.version} has no full J&F on {on} (its "
            f"{ev.split} results: {others}); scores on other data or under another protocol "
            f"are not comparable. Evaluate it on this set under this protocol first: {command}",
        )
    if jf > float(held):
        return Promotion(
            alias,
            True,
            f"promoted: J&F {jf:.4f} beats version {holder.version}'s {float(held):.4f} on {on}",
        )
    return Promotion(
        alias,
        False,
        f"not promoted: J&F {jf:.4f} does not beat version {holder.version}'s {float(held):.4f} on {on}",
    )


def promote(client, ref: ModelRef, alias: str, ev: EvalSet, jf: float, run_id: str) -> Promotion:
    """Decide, move the alias if warranted, and record the decision on the run and version."""
    decision = decide_promotion(client, ref, alias, ev, jf)
    if decision.promoted:
        client.set_registered_model_alias(ref.name, alias, ref.version)
    client.set_tag(run_id, keys.promotion_tag(alias), decision.reason)
    client.set_model_version_tag(ref.name, ref.version, keys.promotion_tag(alias), decision.reason)
    log.info("%s", decision.reason)
    return decision
