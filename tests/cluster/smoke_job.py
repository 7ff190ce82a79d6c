"""A trivial Ray job for the cluster smoke test: one task per node, results logged to MLflow.

Submitted by tests/cluster/test_cluster_smoke.py as

    ray job submit --address http://127.0.0.1:<dashboard> --working-dir . \
        -- python -m tests.cluster.smoke_job --experiment cluster-smoke

It runs as the job's driver on the head node. Each task is pinned to one node through a custom
resource (`head` / `worker_node`, declared by `ray start --resources`), reports the node it ran
on, and logs a metric to the tracking server named by MLFLOW_TRACKING_URI (set through the
runtime_env), so the test can check that both nodes reached the server. The driver logs the
node ids as run params and a JSON artifact through the server's artifact proxy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile

import mlflow
import ray

log = logging.getLogger("smoke_job")


@ray.remote(num_cpus=0.1, max_retries=2)
def where_am_i(run_id: str, label: str) -> dict:
    """Runs on the node the resource label picks; logs one metric to the shared run."""
    ctx = ray.get_runtime_context()
    client = mlflow.MlflowClient()  # tracking URI from the runtime_env's env_vars
    client.log_metric(run_id, f"task_{label}_pid", float(os.getpid()))
    return {"label": label, "node_id": ctx.get_node_id(), "pid": os.getpid(), "cwd": os.getcwd()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--experiment", default="cluster-smoke", help="MLflow experiment (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init()  # RAY_ADDRESS is set by the job supervisor
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="two-node-smoke") as run:
        refs = [
            where_am_i.options(resources={"head": 0.01}).remote(run.info.run_id, "head"),
            where_am_i.options(resources={"worker_node": 0.01}).remote(run.info.run_id, "worker"),
        ]
        results = ray.get(refs, timeout=300)
        for r in results:
            mlflow.log_param(f"{r['label']}_node_id", r["node_id"])
        mlflow.log_param("driver_host", socket.gethostname())
        mlflow.log_param("num_alive_nodes", sum(n["Alive"] for n in ray.nodes()))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "placement.json")
            with open(path, "w") as f:
                json.dump(results, f)
            mlflow.log_artifact(path)
        # A job joins the cluster: jobs.train and jobs.ingest only warn about resources
        # it lacks now (nodes may join), where they refuse on an instance they started.
        from pipeline.distributor import ray_may_grow

        summary = {"run_id": run.info.run_id, "tasks": results, "may_grow": ray_may_grow()}
    log.info("placement: %s", summary)
    print("SMOKE_RESULT " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(parse_args())
