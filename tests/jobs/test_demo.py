"""`make demo` end to end at smoke size: the real job commands, Ray, MLflow on SQLite."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.object_store import free_port

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
    for row in ("trained", "colour (no network)", "copy first frame", "vs colour", "mlflow ui"):
        assert row in summary
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='mast'")
    assert sorted(v.tags["stage"] for v in versions) == ["dynamic", "main", "pretrain"]
    aliases = client.get_registered_model("mast").aliases
    assert {"pretrain-latest", "main-latest", "dynamic-latest"} <= set(aliases)
    assert (root / "eval" / "trained" / "global_results-val.csv").is_file()
    evaluations = client.search_runs(
        [client.get_experiment_by_name("mast-eval-demo").experiment_id],
        "tags.`mast.role` = 'evaluation'",
    )
    models = sorted(r.data.tags["model_uri"] for r in evaluations)
    assert models == ["baseline:colour", "baseline:copy-first", "models:/mast@dynamic-latest"]
    # A rerun reuses shards, finished stages and the evaluations: no new versions or runs;
    # also when the same videos and DAVIS folder are given as a user's own (--videos, --davis).
    own = ["--videos", str(root / "corpus"), "--davis", str(root / "davis")]
    again = subprocess.run(cmd + own, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr + again.stdout
    assert (
        again.stdout.count("reusing the evaluation") + again.stderr.count("reusing the evaluation")
        == 3  # the trained model, the colour baseline beside it, copy-first
    )
    assert len(client.search_model_versions("name='mast'")) == 3
    assert len(client.search_runs([evaluations[0].info.experiment_id])) == 3
    run_next_commands(first.stdout, root)


def run_next_commands(stdout: str, root) -> None:
    """The commands the summary prints after NEXT_HEADER, run as printed in one shell; the
    MLflow UI (a server) must answer its health check."""
    from jobs.demo import NEXT_HEADER

    lines = stdout[stdout.index(NEXT_HEADER) + len(NEXT_HEADER) :].splitlines()
    commands = [ln.strip() for ln in lines if ln.startswith("  ")]
    assert commands[0] == f"cd {ROOT}" and commands[1].startswith("export MLFLOW_TRACKING_URI=")
    *jobs, ui = commands
    assert ui.endswith("--port 5000")
    port = free_port()
    script = "\n".join(["set -e", *jobs, f"exec {ui.replace('--port 5000', f'--port {port}')}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    with subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(1)
            assert proc.poll() is None, proc.stdout.read()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the UI server and its workers
            output = proc.communicate(timeout=60)[0]
    # The evaluation of the champion was the demo's own, reused; the training was finished.
    assert "reusing the evaluation" in output and "already finished" in output, output[-3000:]
    assert (root / "eval" / "champion" / "global_results-val.csv").is_file()


@pytest.mark.parametrize("plan", ["demo.yaml", "cpu_hour.yaml"])
def test_every_plan_names_configs_that_load(plan):
    """`make demo` and `make recipe` run plans: each names job configs that load with its
    overrides, and the recipe trains what its README row says (48,000 pretrain clips)."""
    from davis.sample import SampleConfig
    from jobs.eval_config import EvalConfig
    from jobs.train_config import load_stage_configs
    from pipeline.config import IngestConfig
    from typedconfig import load_config

    spec = yaml.safe_load((ROOT / "configs" / plan).read_text())
    assert set(spec) == {"ingest", "train", "sample", "evaluate"}
    load_config(IngestConfig, ROOT / spec["ingest"]["config"], spec["ingest"]["overrides"])
    stages = load_stage_configs(
        ROOT / spec["train"]["config"], spec["train"]["stages"], spec["train"]["overrides"]
    )
    assert [c.loader.stage for c in stages] == ["pretrain", "main", "dynamic"]
    load_config(SampleConfig, None, spec["sample"]["overrides"])
    load_config(EvalConfig, ROOT / spec["evaluate"]["config"])
    if plan == "cpu_hour.yaml":
        pretrain = stages[0]
        assert pretrain.schedule.steps * pretrain.loader.batch_size == 48_000
        assert (pretrain.model.width, pretrain.loader.crop_size) == (16, 96)
