"""Connecting to Ray, starting a local head, and the runtime env of submitted jobs.

* :func:`ensure_ray` connects to ``RAY_ADDRESS`` or starts a local Ray sized so reads are never
  starved: on a 2-core machine two train workers holding one CPU each leave nothing for Ray
  Data's read tasks and the job hangs, so a local cluster advertises enough *logical* CPUs for
  the workers plus reads plus a driver; the OS shares the real cores.
* :func:`start_head` / :func:`stop_head` (``make cluster-up`` / ``make cluster-down``) run a
  local head with token authentication on, under its own temp dir, as one blocking
  ``ray start --head --block`` process. Stopping signals that process only, so it never takes
  down another Ray on the machine (``ray stop`` would stop every Ray process of the host).
* :func:`check_job_server` is the pre-flight of ``make submit-*``: an unreachable address or
  a missing/wrong token is one clear line, not a traceback from deep inside the client.
* :func:`job_runtime_env` is the runtime env of every submitted job: ``platform`` on the
  ``PYTHONPATH`` (the job's working dir is a temporary copy with nothing installed), data, the
  venv and the MLflow store excluded, and the tracking URI passed through.

Token authentication (Ray >= 2.59): with ``RAY_AUTH_MODE=token`` every client sends the token
from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data

from mirror.storage import is_remote

DEFAULT_TEMP_DIR = "/tmp/ray-mirror"  # not /tmp/ray: `ray.init()` elsewhere won't attach to it
PID_FILE = "head.pid"
LOG_FILE = "head.log"
# Paths never uploaded with a job: datasets, the venv, MLflow stores, run outputs, caches.
# Patterns are gitignore-style; the leading "/" anchors them at the repository root, so that
# "/data/" drops the datasets but not the package's own ``mirror/data``.
RUNTIME_ENV_EXCLUDES = [
    "/data/", "/.venv/", "/mlruns/", "/mlartifacts/", "/mlflow.db", "*.db", "/ray_results/",
    ".git/", "__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/",
]  # fmt: skip


class ClusterConnectionError(RuntimeError):
    """A one-line, actionable error for an unreachable cluster or missing auth token."""


def quiet_progress() -> None:
    """Jobs log to files and MLflow; per-operator progress bars and Ray Data's per-dataset
    execution lines only flood a user's console. Ray Data keeps its full log in the session's
    ``logs/ray-data`` file either way."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:  # the console one, not the file's
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"


def ensure_ray(min_logical_cpus: float = 4) -> None:
    quiet_progress()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ClusterConnectionError(
            f"RAY_ADDRESS={address} is a job-submission (dashboard) address: submit the job with "
            "`ray job submit` (make submit-train / submit-sweep), or set RAY_ADDRESS to the "
            "head's GCS address (host:6379) to run this driver against the cluster"
        )
    if address and not _tcp_reachable(address):  # ray.init would retry for minutes
        raise ClusterConnectionError(
            f"cannot reach the Ray cluster at {address!r}; is it running (make cluster-up) and "
            "is RAY_ADDRESS right?"
        )
    if address and not _speaks_grpc(address):  # e.g. a web server: not an auth problem
        raise ClusterConnectionError(
            f"cannot reach the Ray cluster at {address!r}: something listens there but it is not "
            "a Ray head (no gRPC answer); is RAY_ADDRESS the head's GCS address (host:6379)?"
        )
    if address and _is_loopback(address):
        _use_loopback_node_ip()
    # Workers' and Ray's own logs stay in Ray's log files (session_*/logs); the driver prints
    # what the user asked for, e.g. the training loop's one line per epoch.
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = max(int(min_logical_cpus + 0.999), os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except ConnectionError:
        if address and _tcp_reachable(address):  # it answers, but not to us: authentication
            raise ClusterConnectionError(
                f"the Ray cluster at {address} is up but refused this driver: {_auth_hint()}"
            ) from None
        raise ClusterConnectionError(
            f"cannot reach the Ray cluster at {address!r}; is it running (make cluster-up) and "
            "is RAY_ADDRESS right?"
        ) from None
    except Exception as err:  # Ray raises several types for auth failures
        if "token" not in str(err).lower() and "auth" not in str(err).lower():
            raise
        raise ClusterConnectionError(
            f"the Ray cluster at {address!r} needs token authentication: {_auth_hint()}"
        ) from None


def _auth_hint(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    token, source = auth_token(env)
    if env.get("RAY_AUTH_MODE") != "token":
        return "set RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token"
    if token is None:
        return f"no token found ({source}); copy the cluster's token there (`ray get-auth-token` on the head)"
    return f"the token from {source} is not this cluster's token"


def _tcp_reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection (``auto`` and ``ray://`` are not checked)."""
    if address == "auto" or is_remote(address):
        return True
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _use_loopback_node_ip() -> None:
    """A head started by :func:`start_head` lives on 127.0.0.1 only; a driver on the same host
    must then call itself 127.0.0.1 too, or it waits forever for a node at the host's address.
    This is the driver-side half of ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-host
    mode), which Ray reads once at import."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# An HTTP/2 client preface plus an empty SETTINGS frame: a gRPC server (every Ray head) answers
# with its own SETTINGS frame, whatever its authentication; a web or database server does not.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _speaks_grpc(address: str, timeout_s: float = 3.0) -> bool:
    """Whether ``host:port`` answers an HTTP/2 preface with a SETTINGS frame, as gRPC does."""
    if address == "auto" or is_remote(address):
        return True
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.sendall(_H2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    return False
                reply += chunk
    except (OSError, ValueError):
        return False
    return reply[3] == 0x04  # frame type SETTINGS


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    When Tune stops a trial (ASHA) it kills the trial actor, and with it the Ray Train
    controller, before the controller can release its workers' placement group. Ray keeps a
    placement group until its creator actor *and* its job are dead, so in a long sweep the
    reservations pile up until no trial can start. Train V2 ships a cleaner for this, but it
    finds the cluster through the State API, which fails without a dashboard or when several
    Ray instances share a host. The sweep driver calls this every few seconds instead: it only
    touches placement groups created by actors of its own job, never live ones.
    """
    from ray._private.state import state  # the GCS table with creator fields (no public API)
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = pg.creator_actor_id and pg.creator_actor_id != b"\xff" * len(
            pg.creator_actor_id
        )
        if (
            pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and created_by_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job_id
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# A local head for job submission.


@dataclass(frozen=True)
class Head:
    pid: int
    gcs_address: str  # host:port, for drivers (ray.init)
    dashboard_url: str  # http://host:port, for `ray job submit --address`
    temp_dir: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_head(
    *,
    num_cpus: int,
    port: int = 6379,
    dashboard_port: int = 8265,
    temp_dir: str = DEFAULT_TEMP_DIR,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    expose: bool = False,
) -> Head:
    """Start ``ray start --head --block`` with token auth and wait until its job server
    answers. The token is created if missing. Ports Ray would otherwise fix (dashboard agent,
    Ray client) are picked free, so this head can coexist with another local Ray.

    By default every socket of the head listens on 127.0.0.1 only: GCS, raylet and agent gRPC,
    Ray client, runtime-env agent, metrics export and dashboard. ``ray start`` turns
    ``--node-ip-address=127.0.0.1`` into the host's address (and GCS and raylets then listen
    on all interfaces), unless Ray's single-host mode is on
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which keeps the node IP, and with it every
    bind address, on loopback. ``expose=True`` is for multi-node clusters: Ray's defaults (the
    host's address, reachable by other nodes, which must hold the same token) and the
    dashboard on all interfaces."""
    temp = Path(temp_dir)
    temp.mkdir(parents=True, exist_ok=True)
    pid_file = temp / PID_FILE
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        raise ClusterConnectionError(
            f"a head started from {temp} is already running (pid {pid_file.read_text().strip()}); make cluster-down first"
        )
    for name, value in (("port", port), ("dashboard port", dashboard_port)):
        if not _port_free(value):
            raise ClusterConnectionError(
                f"{name} {value} on 127.0.0.1 is in use (another Ray?); choose another"
            )
    # No drain on SIGTERM: a local head serves no traffic, and draining delays stop by ~30 s.
    env = {
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        **os.environ,
        **(env or {}),
        "RAY_AUTH_MODE": "token",
    }
    if not expose:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single host: node IP stays 127.0.0.1
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
    ray_cli = str(Path(bin_dir) / "ray")
    ensure_token(env)
    cmd = [
        ray_cli, "start", "--head", "--block", "--disable-usage-stats",
        *([] if expose else ["--node-ip-address=127.0.0.1"]), f"--port={port}",
        f"--dashboard-host={'0.0.0.0' if expose else '127.0.0.1'}", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--num-cpus={num_cpus}", f"--temp-dir={temp}",
    ]  # fmt: skip
    with (temp / LOG_FILE).open("w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid_file.write_text(str(proc.pid))
    head = Head(proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", str(temp))
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            tail = (temp / LOG_FILE).read_text().strip().splitlines()[-5:]
            raise ClusterConnectionError(
                f"ray start exited with {proc.returncode}: {' | '.join(tail)}"
            )
        try:
            check_job_server(head.dashboard_url, env=env, timeout_s=2.0)
            return head
        except ClusterConnectionError:
            if time.monotonic() > deadline:
                stop_head(str(temp))
                raise ClusterConnectionError(
                    f"the head did not answer within {timeout_s:.0f}s; see {temp / LOG_FILE}"
                ) from None
            time.sleep(1.0)


def stop_head(temp_dir: str = DEFAULT_TEMP_DIR, timeout_s: float = 60.0) -> bool:
    """SIGTERM the head started from ``temp_dir`` (its processes go with it); SIGKILL the
    process group if it has not exited after ``timeout_s``. False if none was running."""
    pid_file = Path(temp_dir) / PID_FILE
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)  # the head's own session (start_new_session=True)
    return True


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# Job submission: pre-flight and runtime env.


def auth_token(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """``(token, where it came from)`` in Ray's own order of precedence."""
    env = dict(os.environ if env is None else env)
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.exists():
        return path.read_text().strip(), str(path)
    return None, str(path)


def ensure_token(env: dict[str, str] | None = None) -> str:
    """The token a head started with ``env`` will use, created (``0600``) if there is none."""
    token, source = auth_token(env)
    if token:
        return source
    path = Path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    return source


def check_job_server(
    address: str, env: dict[str, str] | None = None, timeout_s: float = 10.0
) -> None:
    """Raise :class:`ClusterConnectionError` unless ``address`` (``http://host:8265``) answers
    an authenticated request the way ``ray job submit`` will make it."""
    env = dict(os.environ if env is None else env)
    url = address.rstrip("/") + "/api/jobs/"
    token, source = auth_token(env)
    headers = (
        {"Authorization": f"Bearer {token}"}
        if token and env.get("RAY_AUTH_MODE") == "token"
        else {}
    )
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        ):
            return
    except urllib.error.HTTPError as err:
        if err.code == 401 and env.get("RAY_AUTH_MODE") != "token":
            raise ClusterConnectionError(
                f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
                f"and put its token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)"
            ) from None
        if err.code == 401:
            raise ClusterConnectionError(
                f"the Ray cluster at {address} requires a token and none was found ({source}); copy the "
                "head's token there (`ray get-auth-token` on the head)"
            ) from None
        if err.code == 403:
            raise ClusterConnectionError(
                f"the Ray cluster at {address} rejected the token from {source}: it is not this cluster's token"
            ) from None
        raise ClusterConnectionError(
            f"the Ray job server at {address} answered HTTP {err.code}: {err.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClusterConnectionError(
            f"cannot reach the Ray job server at {address} ({reason}); is the cluster up "
            "(make cluster-up) and is RAY_ADDRESS right?"
        ) from None


def job_runtime_env(tracking_uri: str | None = None) -> dict[str, Any]:
    """Runtime env for ``ray job submit --working-dir .``. The job runs in a temporary copy
    of the repository with nothing installed, so ``platform`` goes on ``PYTHONPATH``: Ray starts
    every worker of the job inside that copy and Python makes the entry absolute at start-up,
    so it survives Tune moving trials into their own directories. Heavy paths are excluded and
    the tracking URI is passed through (absolute: a relative sqlite path would land in the copy)."""
    env_vars = {"PYTHONPATH": "platform", "PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = _absolute_uri(tracking_uri)
    return {"excludes": list(RUNTIME_ENV_EXCLUDES), "env_vars": env_vars}


def _absolute_uri(uri: str) -> str:
    """A relative sqlite path would resolve inside the job's temporary working dir."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def main(argv: list[str] | None = None) -> int:
    """``python -m mirror.cluster up|down|check|runtime-env``: the Makefile's cluster targets."""
    parser = argparse.ArgumentParser(prog="python -m mirror.cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local head (token auth on)")
    up.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1))
    up.add_argument("--port", type=int, default=6379)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    up.add_argument(
        "--expose",
        action="store_true",
        help="listen on the host's address, not only 127.0.0.1 (multi-node; token auth stays on)",
    )
    down = sub.add_parser("down", help="stop the head started by `up`")
    down.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    check = sub.add_parser("check", help="pre-flight for ray job submit")
    check.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    renv = sub.add_parser("runtime-env", help="print the job runtime env as JSON")
    renv.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            head = start_head(
                num_cpus=args.num_cpus,
                port=args.port,
                dashboard_port=args.dashboard_port,
                temp_dir=args.temp_dir,
                expose=args.expose,
            )
            where = "on the host's address (--expose)" if args.expose else "on 127.0.0.1 only"
            print(f"Ray head up {where} (pid {head.pid}, {args.num_cpus} logical CPUs, token auth on)")
            print(
                f"  submit jobs:  RAY_ADDRESS={head.dashboard_url}  (make submit-train / submit-sweep)"
            )
            print(f"  run drivers:  RAY_ADDRESS={head.gcs_address} RAY_AUTH_MODE=token")
            if args.expose:
                print(
                    f"  add nodes:    RAY_AUTH_MODE=token ray start --address=<this host's IP>:{args.port} "
                    f"(copy {ensure_token()} to the node first)"
                )
            print(f"  logs: {Path(args.temp_dir) / LOG_FILE}; stop with make cluster-down")
        elif args.command == "down":
            print(
                "Ray head stopped"
                if stop_head(args.temp_dir)
                else f"no head running from {args.temp_dir}"
            )
        elif args.command == "check":
            check_job_server(args.address)
        else:
            print(json.dumps(job_runtime_env(args.tracking_uri)))
    except ClusterConnectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
