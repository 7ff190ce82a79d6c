"""The colour baseline beside every evaluated model (MAST_NOTES: "did the model learn more
than colour?"): `--model baseline:colour` scores raw Lab colour matching through the same memory
read (model/baselines.py); every evaluation of a model also scores it on the same DAVIS set,
under the same protocol (`cfg.protocol` as resolved for the model: the same radius, top-k,
frames; `protocol.temperature`, when set, replaces colour_temperature too) and options (reused
once scored, `jobs.eval_reuse`) and reports the model's margin over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.eval_config import EvalConfig

BASELINE_PREFIX = "baseline:"  # --model baseline:colour / baseline:copy-first
COLOUR_BASELINE = BASELINE_PREFIX + "colour"
COLOUR_DIR = "_baseline_colour"  # the colour baseline's results, beside the model's


def compare_colour(
    model_uri: str,
    davis_root: Any,
    cfg: EvalConfig,
    output: Path,
    summary: dict,
    force: bool = False,
) -> dict | None:
    """The colour baseline's J&F on the same set, protocol and options (scored once, then
    reused; scored again with `force`, as the model was) and the model's margin over it; None
    for a baseline or a run that scored nothing."""
    if not cfg.compare_colour or model_uri.startswith(BASELINE_PREFIX) or not summary["scores"]:
        return None
    base_cfg = dataclasses.replace(
        cfg, output=str(output / COLOUR_DIR), compare_colour=False, overlay="none"
    )
    from jobs.evaluate import evaluate  # the same job, for the baseline

    baseline = evaluate(COLOUR_BASELINE, davis_root, base_cfg, force=force)
    same = (baseline["davis_set"], baseline["protocol"]) == (
        summary["davis_set"],
        summary["protocol"],
    )
    if not baseline["scores"] or not same:
        return None
    jf = baseline["scores"]["J&F-Mean"]
    return {
        "J&F-Mean": jf,
        "J-Mean": baseline["scores"]["J-Mean"],
        "F-Mean": baseline["scores"]["F-Mean"],
        "difference": summary["scores"]["J&F-Mean"] - jf,
        "mlflow_run_id": baseline.get("mlflow_run_id"),
    }
