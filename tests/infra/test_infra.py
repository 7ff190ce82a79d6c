"""infra/ is what an engineer deploys to GPU clusters; these tests check it without a cluster.

Each file is parsed and the fields we rely on are checked with the real tools' own parsers
where they exist: the Ray cluster launcher's JSON schema and config validation, `ray start`'s
and `mlflow server`'s command-line parsers, Ray's RuntimeEnv and its working_dir exclude
matcher, each job module's own `parse_args` and config loader for the RayJob entrypoints, and
MLflow's own auth-config reader for the tracking server's login settings. A scan proves that no
credential is written in any file; the logins the manifests reference come from Secrets.
(tests/infra/test_mlflow_auth.py runs that server for real.)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
IMAGE = "ghcr.io/example-org/mast-train:0.1.0-cu128"
MLFLOW_URI = "http://mlflow.mast.svc.cluster.local:5000"
RAYJOBS = {
    "ingest": "rayjob-ingest.yaml",
    "train": "rayjob-train.yaml",
    "evaluate": "rayjob-evaluate.yaml",
}
# What MLflow's client sends to an authenticating server (mlflow.environment_variables).
MLFLOW_LOGIN_VARS = {
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
}
# The Secret the Ray pods take their MLflow login from (infra/README.md creates it).
JOBS_SECRET = "mlflow-jobs"


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def load_one(path: Path) -> dict:
    (doc,) = load_all(path)
    return doc


def load_by_kind(path: Path) -> dict[str, dict]:
    """A multi-document manifest as {kind: document}; each kind appears once."""
    docs = load_all(path)
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{path}: several documents of one kind {kinds}"
    return dict(zip(kinds, docs))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def ray_cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in infra/k8s: the standalone one and each RayJob's own."""
    specs = {"raycluster.yaml": load_one(K8S / "raycluster.yaml")["spec"]}
    for name in RAYJOBS.values():
        specs[name] = load_one(K8S / name)["spec"]["rayClusterSpec"]
    return specs


def start_params_to_args(params: dict[str, str]) -> list[str]:
    """rayStartParams as KubeRay renders them into `ray start` (shell-quoted values)."""
    return shlex.split(" ".join(f"--{k}={v}" for k, v in params.items()))


def parse_ray_start(args: list[str]) -> dict:
    """Parse `ray start` arguments with Ray's own click command (unknown flags raise)."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(args)).params


# ---------------------------------------------------------------------------------------------
# Every file parses; images and versions agree everywhere.


def test_every_yaml_file_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {
        "runtime_env.yaml",
        "ray/cluster.yaml",
        "k8s/raycluster.yaml",
        "k8s/rayjob-ingest.yaml",
        "k8s/rayjob-train.yaml",
        "k8s/rayjob-evaluate.yaml",
        "k8s/mlflow.yaml",
        "k8s/postgres.yaml",
    } <= names
    for path in files:
        for doc in load_all(path):
            assert isinstance(doc, dict), path


def test_one_image_and_the_installed_ray_version_everywhere():
    images = {load_one(INFRA / "ray" / "cluster.yaml")["docker"]["image"]}
    for name, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images |= {c["image"] for g in groups for c in containers(g["template"])}
    mlflow_deploy = load_by_kind(K8S / "mlflow.yaml")["Deployment"]
    images |= {c["image"] for c in containers(mlflow_deploy["spec"]["template"])}
    assert images == {IMAGE}


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher.


def test_cluster_launcher_config_is_valid_for_ray():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_one(INFRA / "ray" / "cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # strict: unknown keys are rejected
    validate_config(prepare_config(cfg))  # Ray's own checks after filling in provider defaults

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and set(types) == {"head", "cpu_ingest", "gpu_train"}
    assert types["head"]["resources"] == {"CPU": 0, "head": 1}
    assert (
        types["cpu_ingest"]["resources"].get("GPU", 0) == 0
        and types["cpu_ingest"]["resources"]["ingest"] == 1
    )
    assert (
        types["gpu_train"]["resources"]["GPU"] == 8
        and types["gpu_train"]["resources"]["train"] == 1
    )
    assert types["gpu_train"]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8x H100
    for name in ("cpu_ingest", "gpu_train"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= cfg["max_workers"]
    # Checkpoints go to the object store: no host mounts a shared filesystem for them.
    assert cfg["initialization_commands"] == []
    assert not any(o.startswith("-v ") for o in cfg["docker"]["run_options"])
    assert "storage_path=s3://" in (INFRA / "ray" / "cluster.yaml").read_text()


def test_cluster_launcher_start_commands_parse_as_ray_start():
    cfg = load_one(INFRA / "ray" / "cluster.yaml")
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        (command,) = [c for c in cfg[key] if "ray start" in c]
        segment = next(s for s in command.split(";") if "ray start" in s)
        words = shlex.split(segment)
        env = dict(w.split("=", 1) for w in words[: words.index("ray")])
        assert env == {"RAY_AUTH_MODE": "token"}, "token auth must be on for every node"
        params = parse_ray_start(words[words.index("start") + 1 :])
        assert params["head"] is head
        if head:
            assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
        else:
            assert params["address"] == "$RAY_HEAD_IP:6379"
    # The token reaches every node from a local file, never inline.
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# ---------------------------------------------------------------------------------------------
# KubeRay RayCluster and RayJobs.


def test_raycluster_groups_resources_and_gpus():
    doc = load_one(K8S / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = doc["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-ingest", "gpu-train"}
    gpu = containers(groups["gpu-train"]["template"])[0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "8"
    cpu = containers(groups["cpu-ingest"]["template"])[0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"]
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # DAVIS and evaluation output are shared: every pod mounts the same ReadWriteMany claim.
    for g in [spec["headGroupSpec"], *groups.values()]:
        mounts = {m["mountPath"] for m in containers(g["template"])[0]["volumeMounts"]}
        assert "/mnt/runs" in mounts
        env = {e["name"]: e.get("value") for e in containers(g["template"])[0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == MLFLOW_URI


@pytest.mark.parametrize("name", ["raycluster.yaml", *RAYJOBS.values()])
def test_ray_start_params_parse_and_label_node_roles(name):
    spec = ray_cluster_specs()[name]
    head = parse_ray_start(start_params_to_args(spec["headGroupSpec"]["rayStartParams"]))
    assert head["num_cpus"] == 0 and json.loads(head["resources"]) == {"head": 1}
    for group in spec["workerGroupSpecs"]:
        params = parse_ray_start(start_params_to_args(group["rayStartParams"]))
        role = json.loads(params["resources"])
        limits = containers(group["template"])[0]["resources"]["limits"]
        has_gpu = int(limits.get("nvidia.com/gpu", 0)) > 0
        assert role == ({"train": 1} if has_gpu else {"ingest": 1}), group["groupName"]


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_entrypoint_is_a_real_job_with_valid_arguments(job):
    doc = load_one(K8S / RAYJOBS[job])
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", f"jobs.{job}"]
    module = importlib.import_module(f"jobs.{job}")  # the module exists and imports
    args = module.parse_args(words[3:])  # the job's own CLI accepts the arguments
    # ... and its own config loader accepts every key=value override.
    if job == "train":
        from jobs.train_config import load_stage_configs

        cfgs = load_stage_configs(args.config, args.stages.split(","), args.overrides)
        assert [c.scaling.num_workers for c in cfgs] == [16, 16, 16]
        assert {c.scaling.use_gpu for c in cfgs} == {"auto"}
        assert {c.storage_path for c in cfgs} == {"s3://mast-runs/ray"}
    elif job == "ingest":
        from pipeline.config import IngestConfig
        from typedconfig import load_config

        load_config(IngestConfig, ROOT / args.config, args.overrides)
    else:
        from jobs.eval_config import EvalConfig
        from typedconfig import load_config

        cfg = load_config(EvalConfig, args.config, args.overrides)
        assert cfg.device == "cuda" and cfg.ray.num_gpus > 0


def test_train_job_runs_on_gpu_workers_only():
    spec = load_one(K8S / RAYJOBS["train"])["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(containers(group["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
    # scaling.num_workers=16 on 2 pods x 8 GPUs: one GPU per Ray Train worker, nothing idle.
    assert "scaling.num_workers=16" in spec["entrypoint"] and group["replicas"] * gpus == 16
    # Checkpoints on the object store: no pod of the training job mounts a shared volume.
    for g in [spec["rayClusterSpec"]["headGroupSpec"], group]:
        volumes = g["template"]["spec"].get("volumes", [])
        assert not [v for v in volumes if "persistentVolumeClaim" in v], volumes


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_runtime_env_is_valid_for_ray(job):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load_one(K8S / RAYJOBS[job])["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    # The login never travels in the job spec (`ray job list` shows it): pods have it from a Secret.
    assert not MLFLOW_LOGIN_VARS & set(env["env_vars"])


# ---------------------------------------------------------------------------------------------
# runtime_env for `ray job submit`.


def test_runtime_env_is_valid_and_excludes_heavy_directories(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    cfg = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    RuntimeEnv(**cfg)  # raises on unknown keys or bad types
    assert set(cfg) == {"working_dir", "excludes", "env_vars"}
    assert all(isinstance(v, str) for v in cfg["env_vars"].values())
    assert cfg["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    assert not MLFLOW_LOGIN_VARS & set(cfg["env_vars"])

    # Ray's own matcher, on a tree shaped like the project: heavy directories are pruned as a
    # whole (matched by their bare path, so Ray never walks into them), code is kept.
    for rel in [
        ".venv/lib/x.py",
        ".git/HEAD",
        "runs/a/b.pt",
        "data/v.mp4",
        "jobs/__pycache__/t.pyc",
        "jobs/train.py",
        "configs/train/demo.yaml",
        "mast_train.egg-info/PKG-INFO",
        "shard-000000.tar",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    excluded = _get_excludes(tmp_path, cfg["excludes"])
    for rel in [
        ".venv",
        ".git",
        "runs",
        "data",
        "jobs/__pycache__",
        "mast_train.egg-info",
        "shard-000000.tar",
    ]:
        assert excluded(tmp_path / rel), rel
    for rel in ["jobs", "jobs/train.py", "configs/train/demo.yaml"]:
        assert not excluded(tmp_path / rel), rel


# ---------------------------------------------------------------------------------------------
# MLflow tracking server and its database.


def secret_ref(env: dict) -> dict:
    """{"name": ..., "key": ...} of an env entry that must come from a Secret."""
    assert "value" not in env, env["name"]
    return env["valueFrom"]["secretKeyRef"]


def test_mlflow_server_deployment_backends_auth_and_probe():
    from mlflow import environment_variables as mlflow_env
    from mlflow.cli import server

    docs = load_by_kind(K8S / "mlflow.yaml")
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"}
    deploy, service, account = docs["Deployment"], docs["Service"], docs["ServiceAccount"]
    (c,) = containers(deploy["spec"]["template"])
    assert c["command"] == ["mlflow", "server"]
    env = {e["name"]: e for e in c["env"]}
    # The backend URI (it holds the DB password) comes from a Secret, expanded by Kubernetes.
    assert secret_ref(env["MLFLOW_BACKEND_STORE_URI"]) == {"name": "mlflow-backend", "key": "uri"}
    args = [
        a.replace("$(MLFLOW_BACKEND_STORE_URI)", "postgresql://u@postgres:5432/mlflow")
        for a in c["args"]
    ]
    params = server.make_context("server", args).params  # MLflow's own CLI parser
    assert "$(MLFLOW_BACKEND_STORE_URI)" in " ".join(c["args"])
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"] is True
    # Every request is authenticated by MLflow's basic-auth app; the NetworkPolicy (below)
    # decides who may connect to the port that listens on all interfaces.
    assert params["app_name"] == "basic-auth"
    assert params["host"] == "0.0.0.0" and params["port"] == 5000
    assert "mlflow.mast.svc.cluster.local:5000" in params["allowed_hosts"].split(",")
    # The auth app's login settings, by the names MLflow reads them: admin login and the Flask
    # session key (the same in every worker of both replicas) from the Secret `mlflow-auth`.
    assert {
        name: secret_ref(env[name])
        for name in (
            mlflow_env.MLFLOW_AUTH_ADMIN_USERNAME.name,
            mlflow_env.MLFLOW_AUTH_ADMIN_PASSWORD.name,
            mlflow_env.MLFLOW_FLASK_SERVER_SECRET_KEY.name,
        )
    } == {
        "MLFLOW_AUTH_ADMIN_USERNAME": {"name": "mlflow-auth", "key": "admin-username"},
        "MLFLOW_AUTH_ADMIN_PASSWORD": {"name": "mlflow-auth", "key": "admin-password"},
        "MLFLOW_FLASK_SERVER_SECRET_KEY": {"name": "mlflow-auth", "key": "flask-secret-key"},
    }
    assert env[mlflow_env.MLFLOW_BASIC_AUTH_FAIL_CLOSED.name]["value"] == "true"
    # The auth config file is the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH points.
    config_path = Path(env[mlflow_env.MLFLOW_AUTH_CONFIG_PATH.name]["value"])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [
        v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert config_path.name in docs["ConfigMap"]["data"]
    for probe in ("readinessProbe", "livenessProbe"):
        # Exempt from MLflow's host check and from the login (the kubelet has none).
        assert c[probe]["httpGet"]["path"] == "/health"
    # Service -> pod wiring, and the in-cluster URI the jobs use.
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == c["ports"][0]["name"] and port["port"] == 5000
    assert (
        MLFLOW_URI == f"http://{service['metadata']['name']}.mast.svc.cluster.local:{port['port']}"
    )
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_mlflow_auth_config_as_mlflow_reads_it(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import get_permission
    from sqlalchemy.engine import make_url

    docs = load_by_kind(K8S / "mlflow.yaml")
    (ini_name, ini) = next(iter(docs["ConfigMap"]["data"].items()))
    (tmp_path / ini_name).write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / ini_name))
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    cfg = read_auth_config()  # MLflow's own reader: the settings exactly as the server sees them
    # Logged-in users read everything and change only what they own or were granted.
    default = get_permission(cfg.default_permission)
    assert default.can_read and not (default.can_update or default.can_delete or default.can_manage)
    assert cfg.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    # No admin login in the file: it comes from the Secret via env vars only.
    assert cfg.admin_username is None and cfg.admin_password is None
    # Users live in their own PostgreSQL database, shared by both replicas; the URI has no
    # password (libpq takes PGPASSWORD, from the same Secret as the database's own password).
    url = make_url(cfg.database_uri)
    assert url.get_backend_name() == "postgresql" and url.password is None
    postgres = load_by_kind(K8S / "postgres.yaml")
    stateful, pg_service = postgres["StatefulSet"], postgres["Service"]
    (pg,) = containers(stateful["spec"]["template"])
    pg_env = {e["name"]: e for e in pg["env"]}
    assert url.host == f"{pg_service['metadata']['name']}.mast.svc.cluster.local"
    assert url.port == pg_service["spec"]["ports"][0]["port"]
    assert url.username == pg_env["POSTGRES_USER"]["value"]
    assert url.database not in ("", pg_env["POSTGRES_DB"]["value"])  # not the runs' database
    (server,) = containers(docs["Deployment"]["spec"]["template"])
    server_env = {e["name"]: e for e in server["env"]}
    assert secret_ref(server_env["PGPASSWORD"]) == secret_ref(pg_env["POSTGRES_PASSWORD"])
    # ... and postgres.yaml creates that database when it initialises an empty volume.
    init = postgres["ConfigMap"]
    assert f"CREATE DATABASE {url.database};" in "".join(init["data"].values())
    (volume,) = [
        v
        for v in stateful["spec"]["template"]["spec"]["volumes"]
        if v.get("configMap", {}).get("name") == init["metadata"]["name"]
    ]
    (mount,) = [m for m in pg["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/docker-entrypoint-initdb.d"  # run by the postgres image


# Labels KubeRay itself puts on every head and worker pod, besides the template's own
# (ray-operator/controllers/ray/common/pod.go, labelPod); the submitter pod has none of them.
def kuberay_pod_labels(template: dict, cluster: str, node_type: str, group: str) -> dict:
    return {
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "app.kubernetes.io/created-by": "kuberay-operator",
    }


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels is modelled here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_mlflow_network_policy_admits_only_this_projects_ray_pods():
    docs = load_by_kind(K8S / "mlflow.yaml")
    policy, deploy = docs["NetworkPolicy"], docs["Deployment"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert selects(spec["podSelector"], deploy["spec"]["template"]["metadata"]["labels"])
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace only; no namespaceSelector / ipBlock
    (c,) = containers(deploy["spec"]["template"])
    assert rule["ports"] == [{"protocol": "TCP", "port": c["ports"][0]["containerPort"]}]
    # Every Ray pod of every manifest is admitted ...
    for name, ray_spec in ray_cluster_specs().items():
        groups = [("head", "headgroup", ray_spec["headGroupSpec"])]
        groups += [("worker", g["groupName"], g) for g in ray_spec["workerGroupSpecs"]]
        for node_type, group_name, group in groups:
            labels = kuberay_pod_labels(group["template"], "mast", node_type, group_name)
            assert selects(peer["podSelector"], labels), f"{name}: {group_name} is not admitted"
    # ... and nothing else: the server itself, PostgreSQL, another team's Ray cluster in the
    # namespace, or the RayJob submitter pod.
    postgres = load_by_kind(K8S / "postgres.yaml")["StatefulSet"]
    others = {
        "mlflow": deploy["spec"]["template"]["metadata"]["labels"],
        "postgres": postgres["spec"]["template"]["metadata"]["labels"],
        "foreign ray pod": kuberay_pod_labels({}, "other", "worker", "w"),
        "submitter": {"batch.kubernetes.io/job-name": "mast-train"},
    }
    for what, labels in others.items():
        assert not selects(peer["podSelector"], labels), what


@pytest.mark.parametrize("name", ["raycluster.yaml", *RAYJOBS.values()])
def test_every_ray_container_logs_in_to_mlflow_from_the_jobs_secret(name):
    spec = ray_cluster_specs()[name]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in containers(group["template"]):
            env = {e["name"]: e for e in c.get("env", [])}
            # Drivers and Ray workers inherit the container's environment, so every process
            # that calls MLflow (rank 0, the registry, evaluation) sends this login.
            assert secret_ref(env["MLFLOW_TRACKING_USERNAME"]) == {
                "name": JOBS_SECRET,
                "key": "username",
            }
            assert secret_ref(env["MLFLOW_TRACKING_PASSWORD"]) == {
                "name": JOBS_SECRET,
                "key": "password",
            }


def test_the_image_installs_the_mlflow_auth_app():
    # `mlflow server --app-name basic-auth` imports Flask-WTF (mlflow's `auth` extra); the
    # image installs the project with its cuda and cloud extras, so one of those (or the
    # base dependencies) must pull it in, or the server pods crash-loop on an ImportError.
    import tomllib
    from packaging.requirements import Requirement

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shipped = [
        Requirement(r)
        for r in meta["dependencies"]
        + [r for x in ("cuda", "cloud") for r in meta["optional-dependencies"][x]]
    ]
    assert any(
        (r.name == "mlflow" and "auth" in r.extras) or r.name.lower() == "flask-wtf"
        for r in shipped
    ), "add mlflow[auth] to the project's dependencies: the MLflow server image needs it"


def test_postgres_password_comes_from_a_secret():
    docs = load_by_kind(K8S / "postgres.yaml")
    stateful, service = docs["StatefulSet"], docs["Service"]
    (c,) = containers(stateful["spec"]["template"])
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    assert service["spec"]["ports"][0]["port"] == 5432


# ---------------------------------------------------------------------------------------------
# Container image definition.


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """[(FROM line, instruction lines of that stage)], continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "docker" / "Dockerfile").read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_builds_the_extension_then_ships_a_slim_runtime():
    (build_from, build), (runtime_from, runtime) = dockerfile_stages()
    assert "cudnn-devel" in build_from and build_from.endswith(" AS build")
    assert "cudnn-runtime" in runtime_from and runtime_from.endswith(" AS runtime")
    assert "ARG TORCH_CUDA_ARCH_LIST" in " ".join(build)
    runs = [i for i, line in enumerate(build) if line.startswith("RUN ")]
    torch_at = next(i for i in runs if 'pip install "torch==${TORCH_VERSION}"' in build[i])
    scs_at = next(i for i in runs if "spatial-correlation-sampler" in build[i])
    project_at = next(i for i in runs if '".[cuda,cloud]"' in build[i])
    assert torch_at < scs_at < project_at, "torch first, then the extension, then the project"
    assert "--no-build-isolation" in build[scs_at] and "PIP_CONSTRAINT" in " ".join(build)
    assert any(line.startswith("COPY --from=build /opt/venv") for line in runtime)
    # The torch pin matches the version `make setup` installs (CPU wheel, same release).
    makefile_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={makefile_pin}" in build
    # Every COPY source of the build stage exists in the project (the build context).
    for line in build:
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_dockerfile_cxx_standard_patch_rewrites_the_packages_flag():
    """The sed expression from the Dockerfile, run by real sed on setup.py's flag line."""
    build = dockerfile_stages()[0][1]
    (scs,) = [line for line in build if "spatial-correlation-sampler" in line and "sed -i" in line]
    expr = re.search(r'sed -i "([^"]+)"', scs).group(1).replace("${SCS_CXX_STD}", "c++20")
    line = "cxx_args = ['-std=c++17', '-fopenmp']\n"  # spatial-correlation-sampler 0.5.0 setup.py
    out = subprocess.run(
        ["sed", expr], input=line, capture_output=True, text=True, check=True
    ).stdout
    assert out == "cxx_args = ['-std=c++20', '-fopenmp']\n"
    assert "ARG SCS_CXX_STD=c++20" in build and "ARG SCS_VERSION=0.5.0" in build


# ---------------------------------------------------------------------------------------------
# No credentials anywhere in infra/.

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub / Slack token": re.compile(r"\b(ghp_[A-Za-z0-9]{30,}|xox[abp]-[A-Za-z0-9-]{10,})"),
    "password in a URI": re.compile(r"://[^/\s:@'\"]+:(?!<)[^@\s'\"/]+@"),
    "literal password": re.compile(
        r"(?i)\b(password|passwd|secret|token)\s*[:=]\s*['\"]?(?![<$({'\"\s])\w{6,}"
    ),
}


def find_secrets(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_scanner_catches_known_bad_samples():
    bad = [
        "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "uri: postgresql://mlflow:hunter22@postgres:5432/mlflow",
        "password: hunter22secret",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ]
    assert all(find_secrets(b) for b in bad)
    assert not find_secrets(
        "--from-literal=uri='postgresql://mlflow:<password>@postgres:5432/mlflow'"
    )


def test_no_credentials_in_infra():
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not find_secrets(text), f"{path}: {find_secrets(text)}"
    # Kubernetes env vars that look secret are never given inline values.
    for path in K8S.glob("*.yaml"):
        for line in re.findall(r"-\s*\{?name:\s*(\w+),?\s*value:", path.read_text()):
            assert not re.search(r"(?i)password|secret|token|key", line), f"{path}: {line}"
        for doc in load_all(path):
            for env in _all_env_entries(doc):
                if re.search(r"(?i)password|secret|token|access_key", env["name"]):
                    assert "valueFrom" in env and "value" not in env, f"{path}: {env['name']}"


def _all_env_entries(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            found += [e for e in node["env"] if isinstance(e, dict) and "name" in e]
        for value in node.values():
            found += _all_env_entries(value)
    elif isinstance(node, list):
        for value in node:
            found += _all_env_entries(value)
    return found


def test_infra_readme_covers_every_file():
    readme = (INFRA / "README.md").read_text()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(INFRA).as_posix() in readme, (
                f"README.md does not mention {path}"
            )
    assert os.path.getsize(INFRA / "README.md") > 1000


def test_every_module_the_jobs_import_is_installed_by_the_project():
    # The image installs the project with its cuda and cloud extras, not dev: a module that
    # only dev pulls in (as PyAV once was: the ingest probe of every video) breaks every job
    # there while every test passes here.
    import ast
    import importlib.metadata as md
    import sys

    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shipped = meta["dependencies"] + [
        r for x in ("cuda", "cloud") for r in meta["optional-dependencies"][x]
    ]
    names = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in shipped}
    for dist in list(names):  # what they pull in (one level) is installed too
        try:
            names |= {
                re.split(r"[<>=\[ ;(]", r, maxsplit=1)[0].lower() for r in md.requires(dist) or []
            }
        except md.PackageNotFoundError:
            pass
    imported = set()
    ours = {"typedconfig", "storage", "model", "davis", "pipeline", "jobs"}
    for package in sorted(ours):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    dists = md.packages_distributions()
    for module in sorted(imported - set(sys.stdlib_module_names) - ours):
        provided = {d.lower() for d in dists.get(module, [module.replace("_", "-")])}
        assert provided & names, f"{module} ({provided}) is imported but not a dependency"
    assert {"s3fs", "gcsfs"} <= names  # fsspec loads them by URL scheme, never imported by name
