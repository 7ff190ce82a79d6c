"""After an evaluation has scores (new or reused): compare with the colour baseline, tag the
model version, decide a promotion, report, and write `summary.json` last, the completion marker
`jobs.eval_reuse` finds again (jobs/evaluate.py runs the rest)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from jobs.eval_baselines import compare_colour
from jobs.eval_config import EvalConfig
from jobs.eval_protocol import Protocol
from jobs.eval_reuse import SUMMARY_FILE
from storage import atomic_path

log = logging.getLogger("jobs.evaluate")


def finish(
    summary: dict,
    cfg: EvalConfig,
    protocol: Protocol,
    client,
    ref,
    promote: str,
    output: Path,
    force: bool = False,
) -> dict:
    """Compare with the colour baseline, tag the model version, decide a promotion, report,
    write summary.json last (and log it with the run, where a later identical evaluation
    finds it); for a new result and a reused one alike."""
    scores, run_id = summary["scores"], summary.get("mlflow_run_id")
    summary.pop("promotion", None)  # a reused summary's decision was about another holder
    summary["colour_baseline"] = compare_colour(
        summary["model_uri"], summary["davis_root"], cfg, output, summary, force=force
    )
    if run_id and summary["colour_baseline"] and cfg.mlflow.enabled and "reused" not in summary:
        client.log_metric(run_id, "JF-Mean_minus_colour", summary["colour_baseline"]["difference"])
    if cfg.mlflow.enabled and run_id:
        from jobs.eval_mlflow import EvalSet, tag_model_version
        from jobs.eval_mlflow import promote as promote_alias

        ev = EvalSet(
            cfg.split, summary["davis_set"], protocol, summary["scope"], summary["davis_root"]
        )
        if ref.name and scores is not None:
            tag_model_version(client, ref, ev, scores, run_id)
        if promote:
            jf = scores["J&F-Mean"] if scores else float("-inf")
            decision = promote_alias(client, ref, promote, ev, jf, run_id)
            summary["promotion"] = dataclasses.asdict(decision)
    report(summary)
    with atomic_path(output / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    if cfg.mlflow.enabled and run_id and "reused" not in summary:
        client.log_artifact(run_id, str(output / SUMMARY_FILE))
    return summary


def report(summary: dict) -> None:
    scores = summary["scores"]
    if scores:
        log.info(
            "J&F %.3f  J %.3f  F %.3f  (%d/%d sequences, protocol %s)",
            scores["J&F-Mean"],
            scores["J-Mean"],
            scores["F-Mean"],
            summary["scored"],
            summary["requested"],
            summary["protocol"]["id"],
        )
    colour = summary.get("colour_baseline")
    if colour:
        log.info(
            "colour baseline (no network) J&F %.3f: the model is %+.3f J&F %s it",
            colour["J&F-Mean"], colour["difference"],
            "above" if colour["difference"] > 0 else "at or below",
        )  # fmt: skip
    if summary["failed"]:
        log.error("%d sequence(s) FAILED:", len(summary["failed"]))
        for f in summary["failed"]:
            log.error("  %s: %s", f["sequence"], f["error"])
