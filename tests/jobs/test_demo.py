"""`make demo` end to end at smoke size: the real job commands, Ray, MLflow on SQLite."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_runs_end_to_end_and_reruns_from_what_is_done(tmp_path):
    plan = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    plan["ingest"]["overrides"] = ["clips_per_video=2"]
    plan["train"]["overrides"] = ["schedule.steps=4", "checkpoint.every_steps=2"]
    plan["sample"]["overrides"] = ["num_sequences=2", "num_frames=6"]
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    root = tmp_path / "demo"
    cmd = [sys.executable, "-m", "jobs.demo", "--root", str(root), "--plan", str(plan_file)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = first.stdout[first.stdout.index("== Demo summary") :]
    for row in ("trained", "untrained", "copy first frame", "mlflow ui --backend-store-uri"):
        assert row in summary
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='mast'")
    assert sorted(v.tags["stage"] for v in versions) == ["dynamic", "main", "pretrain"]
    aliases = client.get_registered_model("mast").aliases
    assert {"pretrain-latest", "main-latest", "dynamic-latest"} <= set(aliases)
    assert (root / "eval" / "trained" / "global_results-val.csv").is_file()
    # A rerun reuses shards and finished stages: no new model versions.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr + again.stdout
    assert len(client.search_model_versions("name='mast'")) == 3
