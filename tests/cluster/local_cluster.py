"""A real multi-node Ray cluster and a real MLflow server on this machine, for tests.

`LocalRayCluster` runs `ray start --head` and `ray start --address=...` as separate processes,
exactly as an engineer does on two machines, only with every port chosen free and every node in
its own `--temp-dir`. (Ray maps `--node-ip-address=127.0.0.1` to the machine's primary address,
services.resolve_ip_for_localhost, so GCS and raylets listen there; the dashboard and job server
bind 127.0.0.1. Both nodes share one IP, so Ray Train reports them as one "node" in
local_rank/node_rank; placement by node id, which the tests check, is still per node.) `MlflowServer` runs `mlflow server` with a SQLite backend
store and a separate artifact root. Both only ever stop processes they started:

- `ray stop` is never used: it kills *every* Ray process on the machine, including the local
  Ray instances of other test sessions running in parallel. Instead a node's processes are
  found as (a) processes whose command line names the node's temp dir or the head's GCS port
  (gcs_server, raylet, dashboard, monitors; they are daemonised and re-parented to PID 1, so a
  process group or parent PID does not find them) plus (b) all their descendants (workers,
  agents, job drivers: the job supervisor starts each driver in a new session, so again only
  the parent chain finds it). SIGTERM first, SIGKILL after a grace period.
- Ray 2.60 token authentication: `ray start --head` turns token auth on when a token exists in
  ~/.ray/auth_token (which any local `ray.init()` may have created), and then every CLI call
  (`ray start --address`, `ray status`, `ray job submit`) needs the same token. We make this
  explicit and private: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH pointing at a fresh token
  file in the cluster's directory, set in the environment of every subprocess and never in
  the test process itself (that would change the behaviour of other tests' `ray.init()`).
- The job server starts drivers with a plain `python`, resolved through the PATH of the
  node's `ray start`; PATH therefore starts with this venv's bin/ directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MLFLOW = str(VENV_BIN / "mlflow")


def free_port() -> int:
    """A TCP port free on every interface right now (the usual small race is accepted)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Process bookkeeping through /proc (Linux): find a set of processes and everything below them.


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (
            int(fields[1]),
            fields[0],
            raw.replace(b"\0", b" ").decode(errors="replace"),
        )
    return table


def processes_matching(markers: list[str]) -> set[int]:
    """Live processes whose command line contains any marker, plus all their descendants."""
    table = _process_table()
    own = {os.getpid(), os.getppid()}
    selected = {
        pid
        for pid, (_, state, cmd) in table.items()
        if pid not in own and state not in "ZX" and any(m in cmd for m in markers)
    }
    grew = True
    while grew:
        children = {
            pid for pid, (ppid, state, _) in table.items() if ppid in selected and state not in "ZX"
        }
        grew = not children <= selected
        selected |= children
    return selected - own


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"  # zombies re-parented to a non-reaping PID 1 count as gone


def terminate(pids: set[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM `pids`, wait up to `grace_s`, SIGKILL what is left. Returns the SIGKILLed pids."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


# ---------------------------------------------------------------------------------------------


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    resources: dict[str, float]


@dataclass
class LocalRayCluster:
    """Head + worker nodes started with `ray start` on loopback. Use `start()` / `stop()`."""

    root: Path
    num_cpus: int = 2
    object_store_mb: int = 200  # small: several nodes share /dev/shm with other test sessions
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @classmethod
    def create(cls, **kwargs) -> LocalRayCluster:
        # Short root under /tmp: Ray's unix sockets live in the temp dir and AF_UNIX paths are
        # limited to 107 bytes; pytest's tmp_path is often too long.
        root = Path(tempfile.mkdtemp(prefix="raycl-", dir="/tmp"))
        return cls(root=root, **kwargs)

    # -- environment shared by every subprocess talking to this cluster --------------------
    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job server address for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster and return the completed process."""
        proc = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`ray {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, workers: tuple[str, ...] = ("worker",)) -> LocalRayCluster:
        self.token_path.write_text(uuid.uuid4().hex)
        self.token_path.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self._start_node(
            "head",
            {"head": 1},
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        for name in workers:
            self.add_worker(name)
        self.wait_for_nodes(1 + len(workers))
        return self

    def add_worker(self, name: str, resources: dict[str, float] | None = None) -> RayNode:
        return self._start_node(
            name, resources or {"worker_node": 1}, [f"--address={self.gcs_address}"]
        )

    def _start_node(self, name: str, resources: dict[str, float], extra: list[str]) -> RayNode:
        temp_dir = self.root / name
        args = [
            "start",
            *extra,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={temp_dir}",
            # Defaults are fixed ports (52365 for the agent): two nodes on one machine, and
            # other test sessions, would collide.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        started = time.monotonic()
        self.ray(*args, timeout=180)
        node = RayNode(name, temp_dir, resources)
        self.nodes[name] = node
        log.info(
            "ray node %s started in %.1fs (temp dir %s)", name, time.monotonic() - started, temp_dir
        )
        return node

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> list[dict]:
        """Wait until exactly `count` nodes are ALIVE; return them (from `ray list nodes`)."""
        deadline = time.monotonic() + timeout_s
        alive: list[dict] = []
        while time.monotonic() < deadline:
            alive = [n for n in self.list_nodes() if n.get("state") == "ALIVE"]
            if len(alive) == count:
                return alive
            time.sleep(0.5)
        raise TimeoutError(f"expected {count} alive Ray nodes, have {len(alive)}: {alive}")

    def list_nodes(self) -> list[dict]:
        out = self.ray(
            "list",
            "nodes",
            "--detail",
            "--format=json",
            f"--address={self.dashboard_url}",
            check=False,
        )
        if out.returncode != 0:
            return []
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            return []

    def node_pids(self, name: str) -> set[int]:
        markers = [str(self.nodes[name].temp_dir)]
        if name == "head":
            markers.append(f":{self.gcs_port} ")  # ray client server names only the GCS address
        return processes_matching(markers)

    def kill_node(self, name: str) -> int:
        """Hard-kill one node (raylet, agents, its workers): a machine failure. Returns #procs."""
        pids = self.node_pids(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.pop(name)
        return len(pids)

    def stop(self) -> None:
        """Stop only this cluster's processes (never `ray stop`) and delete its directory."""
        pids: set[int] = set()
        for name in self.nodes:
            pids |= self.node_pids(name)
        pids |= processes_matching([str(self.root)])
        killed = terminate(pids)
        if killed:
            log.info("ray cluster: %d of %d processes needed SIGKILL", len(killed), len(pids))
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs --------------------------------------------------------------------------------
    def submit(
        self,
        entrypoint: list[str],
        *,
        runtime_env: dict,
        submission_id: str | None = None,
        timeout: float = 600,
    ) -> tuple[str, subprocess.CompletedProcess]:
        """`ray job submit` (blocking, logs tailed) and return (submission id, process)."""
        submission_id = submission_id or f"test-{uuid.uuid4().hex[:8]}"
        env_file = self.root / f"{submission_id}.runtime_env.json"
        env_file.write_text(json.dumps(runtime_env))
        proc = self.ray(
            "job",
            "submit",
            f"--address={self.dashboard_url}",
            f"--submission-id={submission_id}",
            f"--runtime-env-json={env_file.read_text()}",
            "--",
            *entrypoint,
            timeout=timeout,
            check=False,
        )
        return submission_id, proc

    def submit_nowait(self, entrypoint: list[str], *, runtime_env: dict, submission_id: str) -> str:
        """`ray job submit --no-wait`: returns the submission id once the job is accepted."""
        self.ray(
            "job",
            "submit",
            "--no-wait",
            f"--address={self.dashboard_url}",
            f"--submission-id={submission_id}",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--",
            *entrypoint,
        )
        return submission_id

    def wait_job(self, submission_id: str, timeout_s: float = 600) -> str:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.job_status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1.0)
        raise TimeoutError(f"job {submission_id} still {status} after {timeout_s}s")

    def job_logs(self, submission_id: str) -> str:
        return self.ray(
            "job", "logs", f"--address={self.dashboard_url}", submission_id, check=False
        ).stdout

    def list_state(self, kind: str, submission_id: str, *filters: str) -> list[dict]:
        """`ray list <kind>` (tasks, actors) of one job, with node ids (Ray's state API)."""
        job_id = self.job_info(submission_id)["job_id"]
        args = ["list", kind, f"--address={self.dashboard_url}", "--detail", "--format=json"]
        args += ["--limit=10000", f"--filter=job_id={job_id}"]
        for f in filters:
            args.append(f"--filter={f}")
        return json.loads(self.ray(*args).stdout)

    def job_info(self, submission_id: str) -> dict:
        """The job server's record of a job (GET /api/jobs/<id>, bearer token auth)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/{submission_id}",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def job_status(self, submission_id: str) -> str:
        """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING."""
        return self.job_info(submission_id)["status"]


# ---------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """`mlflow server` on loopback: SQLite backend store, artifacts proxied to a local root."""

    root: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"

    def start(
        self,
        timeout_s: float = 90,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> MlflowServer:
        """Start on a free loopback port; the server sees no MLFLOW_* variable of this process,
        only `extra_env` (how e.g. the basic-auth app is configured)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env |= extra_env or {}
        self._log = open(self.root / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                MLFLOW,
                "server",
                f"--backend-store-uri=sqlite:///{self.backend_store}",
                f"--artifacts-destination={self.artifact_root}",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--workers=1",
                *extra_args,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills exactly this server
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout_s}s")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log.close()
        self.process = None
