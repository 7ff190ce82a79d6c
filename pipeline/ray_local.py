"""Connecting a job to Ray: the cluster it names, or a local instance of its own that keeps to
itself and keeps the log readable.

Every job calls `init_ray()` instead of `ray.init()`:
- RAY_ADDRESS set, or a cluster started on this machine with `ray start`: joined, as
  `ray.init()` would.
- Otherwise the job starts its own local instance. Ray Train's internal actors (the
  placement-group cleaner) look their cluster up with Ray's state API, which, given no address,
  scans the machine for Ray processes: with another job's instance running beside this one it
  found several, and logged a ConnectionError traceback per stage ("Found multiple active Ray
  instances"). The local instance gets a dashboard port chosen here, and every worker of the job
  is told it (RAY_API_SERVER_ADDRESS), so nothing in it looks for another instance.
- Output that is not a terminal gets no colour codes from Ray's log prefixes
  (RAY_COLOR_PREFIX=0), and Ray's start-up lines (the token-authentication notice a local
  instance prints every time, the dashboard URL in ANSI bold) are left out; errors still show.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)

# Ray's loggers whose INFO/WARNING lines at start-up say nothing actionable about a local run.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray._private.worker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def joins_cluster() -> bool:
    """Whether `ray.init()` would join a cluster (RAY_ADDRESS, or `ray start` on this machine)
    rather than start a local instance."""
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own decision

    return canonicalize_bootstrap_address(None) is not None


def init_ray(
    address: str | None = None,
    *,
    dashboard: bool = True,
    log_to_driver: bool = True,
    **kwargs: Any,
) -> bool:
    """Connect this process to Ray (see module docstring): the cluster at `address` if one is
    given, else as `ray.init()` decides; returns True when it started a local instance of its
    own. A no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return False
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if address or joins_cluster():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver,
                 **kwargs)  # fmt: skip
        return False
    # One machine is never preempted: Ray Train's preemption watcher only logged an error-level
    # line per stage (its actor's constructor arguments, ray-project/ray#53727).
    env = {PREEMPTION_WATCHER: "0"}
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    local: dict[str, Any] = {"include_dashboard": dashboard}
    if dashboard:
        port = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        local["dashboard_port"] = port
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    ray.init(
        address="local", log_to_driver=log_to_driver, runtime_env=runtime_env, **local, **kwargs
    )
    return True
