"""The tracking server of infra/k8s/mlflow.yaml for real: MLflow's basic-auth app, logins by env.

One `mlflow server --app-name basic-auth` on 127.0.0.1 (a free port), configured as the
Deployment is: its auth config file is the ConfigMap's basic_auth.ini with `database_uri`
pointed at a temporary SQLite file (PostgreSQL in the cluster), the admin login and the Flask
secret key are env vars exactly as the Secret `mlflow-auth` provides them, the Deployment's
literal MLFLOW_* settings are copied, and artifacts are proxied (--serve-artifacts) to a
temporary directory. Users are created with the REST call infra/README.md gives; the jobs then
log in as the cluster's pods do, through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import base64
import configparser
import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster.local_cluster import MlflowServer
from tests.infra.test_infra import K8S, containers, load_by_kind

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Written by requests without credentials; none of them may exist afterwards.
ANONYMOUS_WRITES = [
    ("/api/2.0/mlflow/experiments/create", {"name": "anonymous"}),
    ("/api/2.0/mlflow/registered-models/create", {"name": "anonymous-model"}),
    (
        "/api/2.0/mlflow/registered-models/alias",
        {"name": "mast", "alias": "champion", "version": "1"},
    ),
    ("/api/2.0/mlflow/users/create", {"username": "intruder", "password": "intruder-password"}),
]


def deployment_settings() -> tuple[str, dict[str, str]]:
    """(basic_auth.ini text, literal MLFLOW_* env values) of the Deployment in mlflow.yaml."""
    docs = load_by_kind(K8S / "mlflow.yaml")
    (ini,) = docs["ConfigMap"]["data"].values()
    (c,) = containers(docs["Deployment"]["spec"]["template"])
    literal = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    literal.pop("MLFLOW_AUTH_CONFIG_PATH")  # points at the ConfigMap mount; replaced below
    return ini, {k: v for k, v in literal.items() if k.startswith("MLFLOW_")}


@dataclass
class BasicAuthMlflowServer(MlflowServer):
    """MlflowServer (tests/cluster/local_cluster.py) running the basic-auth app.

    start() writes the Deployment's auth config with a temporary auth DB and gives the server
    the env vars the Secret would (the base class passes no MLFLOW_* variable of this process).
    """

    admin_username: str = "admin"
    # As `kubectl create secret` would hold it: random, never written to a file.
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))

    @property
    def auth_db(self) -> Path:
        return self.root / "basic_auth.db"

    def start(self, timeout_s: float = 120) -> BasicAuthMlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        ini_text, literal_env = deployment_settings()
        ini = configparser.ConfigParser()
        ini.read_string(ini_text)
        ini["mlflow"]["database_uri"] = f"sqlite:///{self.auth_db}"
        with open(self.root / "basic_auth.ini", "w") as f:
            ini.write(f)
        env = literal_env | {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        }
        args = ("--app-name=basic-auth", "--serve-artifacts")
        super().start(timeout_s, extra_args=args, extra_env=env)  # /health is open: no login
        return self


def rest(
    server: MlflowServer,
    method: str,
    path: str,
    body: dict | None = None,
    login: tuple[str, str] | None = None,
) -> tuple[int, str]:
    """(HTTP status, body) of one request; connection errors count as status 0."""
    request = urllib.request.Request(
        server.uri + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    if login is not None:
        basic = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = BasicAuthMlflowServer(tmp_path_factory.mktemp("mlflow-auth")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server) -> tuple[str, str]:
    return server.admin_username, server.admin_password


def create_user(server, admin, username: str) -> tuple[str, str]:
    """A non-admin user, created by the admin exactly as infra/README.md shows."""
    password = secrets.token_urlsafe(18)
    status, body = rest(
        server,
        "POST",
        "/api/2.0/mlflow/users/create",
        {"username": username, "password": password},
        login=admin,
    )
    assert status == 200, body
    user = json.loads(body)["user"]
    assert user["username"] == username and user["is_admin"] is False
    return username, password


@pytest.fixture
def login_env(monkeypatch):
    """Set (or, with None, remove) the login MLflow's client and check_reachable read."""
    # Bounded: a refused or broken call fails at once instead of retrying with backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)

    def use(login: tuple[str, str] | None) -> None:
        for name, value in zip(
            ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), login or (None, None)
        ):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return use


def test_only_health_static_and_server_info_answer_without_credentials(server):
    # MLflow exempts these from the login (mlflow/server/auth/__init__.py:
    # _UNPROTECTED_PATH_PREFIXES, _PUBLIC_ROUTE_SUFFIXES); the probes rely on /health.
    assert rest(server, "GET", "/health") == (200, "OK")
    status, body = rest(server, "GET", "/api/3.0/mlflow/server-info")
    assert status == 200 and "store_type" in json.loads(body)
    assert rest(server, "GET", "/static-files/index.html")[0] == 200  # the UI's shell, no data
    for path in [
        "/",
        "/version",
        "/api/2.0/mlflow/experiments/search?max_results=1",
        "/ajax-api/2.0/mlflow/experiments/search?max_results=1",
        "/api/2.0/mlflow/registered-models/search",
        "/api/2.0/mlflow-artifacts/artifacts",
        "/api/2.0/mlflow/users/list",
        "/graphql",
    ]:
        status, body = rest(server, "GET", path)
        assert status == 401 and "not authenticated" in body, path


def test_writes_without_a_valid_login_are_refused(server, admin):
    wrong = (admin[0], admin[1] + "x")
    for path, body in ANONYMOUS_WRITES:
        assert rest(server, "POST", path, body)[0] == 401, path
        assert rest(server, "POST", path, body, login=wrong)[0] == 401, path
    # ... and none of them took effect.
    status, body = rest(
        server, "GET", "/api/2.0/mlflow/experiments/search?max_results=100", login=admin
    )
    assert status == 200
    assert "anonymous" not in {e["name"] for e in json.loads(body).get("experiments", [])}
    status, _ = rest(
        server, "GET", "/api/2.0/mlflow/registered-models/get?name=anonymous-model", login=admin
    )
    assert status == 404
    status, _ = rest(server, "GET", "/api/2.0/mlflow/users/get?username=intruder", login=admin)
    assert status == 404


def test_the_admin_login_from_the_environment_can_write(server, admin):
    status, body = rest(
        server, "POST", "/api/2.0/mlflow/experiments/create", {"name": "by-admin"}, login=admin
    )
    assert status == 200 and json.loads(body)["experiment_id"]
    status, body = rest(
        server,
        "POST",
        "/api/2.0/mlflow/registered-models/create",
        {"name": "by-admin"},
        login=admin,
    )
    assert status == 200 and json.loads(body)["registered_model"]["name"] == "by-admin"
    status, body = rest(server, "GET", "/api/2.0/mlflow/users/current", login=admin)
    assert status == 200 and json.loads(body)["user"]["is_admin"] is True


def test_check_reachable_needs_the_login_from_the_environment(server, admin, login_env):
    from jobs.tracking import TrackingError, check_reachable

    # /health is open (test above), so the probe's authenticated read is what decides.
    login_env(None)
    with pytest.raises(
        TrackingError,
        match=r"refused a request without credentials .*HTTP 401.*"
        r"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    ):
        check_reachable(server.uri, timeout_s=30)
    login_env((admin[0], admin[1] + "x"))
    with pytest.raises(
        TrackingError, match=r"refused user 'admin' \(HTTP 401.*MLFLOW_TRACKING_USERNAME"
    ):
        check_reachable(server.uri, timeout_s=30)
    login_env(admin)
    check_reachable(server.uri, timeout_s=30)


def test_the_jobs_user_trains_registers_and_promotes_a_read_only_user_cannot(
    server, admin, login_env
):
    import torch
    from mlflow.exceptions import MlflowException

    from jobs.registry import compute_example, register_stage_model
    from jobs.tracking import check_reachable, mlflow_client, setup_runs
    from model import MAST

    jobs_login = create_user(server, admin, "mast-jobs")
    viewer_login = create_user(server, admin, "viewer")

    # As a Ray pod: the jobs Secret's login in the environment, nothing else.
    login_env(jobs_login)
    check_reachable(server.uri, timeout_s=30)
    runs = setup_runs(server.uri, "mast-auth", "r1", {"pretrain": {"optim.lr": 1e-3}})
    run_id = runs.child_run_ids["pretrain"]
    client = mlflow_client(server.uri)
    client.log_metric(run_id, "loss", 0.5, step=1)
    torch.manual_seed(0)
    model = MAST(width=8, feat_dim=8).eval()
    frames = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    example = compute_example(model, frames, torch.tensor([[2]]), seed=0)
    state = {"model_args": model.model_args, "model": model.state_dict()}
    version = register_stage_model(
        uri=server.uri,
        run_id=run_id,
        model_name="mast-auth",
        stage="pretrain",
        state=state,
        example=example,
        tags={"stage": "pretrain"},
    )
    client.set_registered_model_alias("mast-auth", "champion", str(version))  # jobs.evaluate
    assert client.get_run(run_id).data.metrics["loss"] == 0.5
    assert int(client.get_model_version_by_alias("mast-auth", "champion").version) == version
    # The model went through the server's artifact proxy into its artifact root.
    assert any(p.name == "mast_state.pt" for p in server.artifact_root.rglob("*"))

    # A read-only user (default_permission READ) reads everything and changes nothing it did
    # not create: not the alias, not the run.
    login_env(viewer_login)
    check_reachable(server.uri, timeout_s=30)
    viewer = mlflow_client(server.uri)
    assert int(viewer.get_model_version_by_alias("mast-auth", "champion").version) == version
    assert viewer.get_run(run_id).data.metrics["loss"] == 0.5
    with pytest.raises(MlflowException, match="403"):
        viewer.set_registered_model_alias("mast-auth", "champion", str(version))
    with pytest.raises(MlflowException, match="403"):
        viewer.log_metric(run_id, "loss", 9.0, step=2)
    with pytest.raises(MlflowException, match="403"):
        viewer.delete_registered_model("mast-auth")

    # The admin's grant from infra/README.md lets it move the alias.
    status, body = rest(
        server,
        "POST",
        "/api/3.0/mlflow/users/permissions/grant",
        {
            "username": viewer_login[0],
            "resource_type": "registered_model",
            "resource_id": "mast-auth",
            "permission": "EDIT",
        },
        login=admin,
    )
    assert status == 200, body
    viewer.set_registered_model_alias("mast-auth", "reviewed", str(version))
    assert int(viewer.get_model_version_by_alias("mast-auth", "reviewed").version) == version
    assert viewer.get_run(run_id).data.metrics["loss"] == 0.5  # the run is still read-only
    with pytest.raises(MlflowException, match="403"):
        viewer.log_metric(run_id, "loss", 9.0, step=2)
