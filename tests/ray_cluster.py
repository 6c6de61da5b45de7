"""Test harness: a real single-node Ray head on 127.0.0.1, and the real ``ray job submit`` CLI against it.

Used by slow end-to-end tests that must exercise what a user does on a cluster (upload a working dir,
run an entrypoint as a Ray job) rather than a ``ray.init()`` inside the test process.

Token authentication is done the documented way (https://docs.ray.io/en/latest/ray-security/token-auth.html):
every head gets its own random token in a file; the head and every client get ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH=<that file>`` in their environment (``RayHead.env``). The job driver inherits both
from the head's processes, so ``ray.init()`` inside a job authenticates without help. Nothing touches the
user's ``~/.ray/auth_token``.

Each head runs as ``ray start --head --block`` in its own process group, so it can be stopped alone:
SIGTERM makes ``ray start`` shut down the processes it started; whatever is left in the group is then
killed. ``ray stop`` is never used, because it stops every Ray instance of the user on the machine
(including other tests' clusters).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY_BIN = str(Path(sys.executable).with_name("ray"))

TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# `ray job status` speaks prose, one sentence per state (ray/dashboard/modules/job/cli.py:_log_job_status).
_STATUS_SENTENCES = {
    "SUCCEEDED": re.compile(r"Job '[^']+' succeeded"),
    "FAILED": re.compile(r"Job '[^']+' failed"),
    "STOPPED": re.compile(r"Job '[^']+' was stopped"),
}
_OTHER_STATUS = re.compile(r"Status for job '[^']+': (?:JobStatus\.)?([A-Z]+)")
# How `ray start` says one of the ports it was given is not free (then the head is started again).
_PORT_TAKEN = re.compile(r"trying to use a port number|[Aa]ddress already in use|[Ff]ailed to bind")
_LAUNCH_ATTEMPTS = 3


@dataclass(frozen=True)
class RayHead:
    """A running local head.

    address: GCS address ``127.0.0.1:<port>`` (for ``ray.init(address=...)`` / ``RAY_ADDRESS``).
    dashboard_url: ``http://127.0.0.1:<port>``, the Jobs API (``ray job ... --address``).
    env: environment for client subprocesses: this environment plus the head's auth settings,
        ``RAY_ADDRESS`` and ``RAY_API_SERVER_ADDRESS``.
    temp_dir: Ray's temp/log root for this head (session logs under ``session_latest/logs``); removed
        when the head stops unless something failed.
    log_path: stdout/stderr of the ``ray start`` process.
    """

    address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: str
    log_path: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    All sockets stay bound until every port is chosen: closing each before asking for the next lets the
    kernel hand out the same port twice (a CI run got one port for both the GCS and the dashboard agent).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


def _short_temp_dir(tmp_path: Path) -> str:
    """A fresh Ray temp dir with a short path, linked from ``tmp_path/ray``.

    Ray puts unix sockets at ``<temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/<name>`` and fails
    (e.g. its dashboard modules) when one exceeds 107 bytes, so pytest's long tmp_path cannot host it.
    """
    short = tempfile.mkdtemp(prefix="medsr-ray-", dir="/tmp")
    with contextlib.suppress(OSError):
        (tmp_path / "ray").symlink_to(short, target_is_directory=True)
    return short


def _auth_env(tmp_path: Path) -> dict[str, str]:
    token_path = tmp_path / "ray_auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _tail(path: str, chars: int = 4000) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as handle:
        return handle.read()[-chars:]
    return ""


def _wait_until_ready(
    head: RayHead, agent_port: int, process: subprocess.Popen, timeout_s: float
) -> None:
    """Poll until the Jobs API answers an authenticated request and the head node's dashboard agent (which
    runs submitted jobs; the head gives up on it after 10 s) is healthy. Raise if the head dies or time
    runs out."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    probes = [
        urllib.request.Request(f"{head.dashboard_url}/api/jobs/", headers=auth),
        urllib.request.Request(f"http://127.0.0.1:{agent_port}/api/healthz", headers=auth),
    ]
    deadline = time.monotonic() + timeout_s
    while probes and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{_tail(head.log_path)}")
        with contextlib.suppress(OSError):  # refused, reset, HTTP 5xx while starting
            with urllib.request.urlopen(probes[0], timeout=5) as response:
                if response.status == 200:
                    probes.pop(0)
                    continue
        time.sleep(0.5)
    if probes:
        raise TimeoutError(
            f"Ray head not ready after {timeout_s:.0f}s ({probes[0].full_url}):\n{_tail(head.log_path)}"
        )


def _stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the ``ray start --block`` process (it stops what it started), then kill its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The group is this head's alone (start_new_session=True): take down anything that outlived it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _head_env(tmp_path: Path) -> dict[str, str]:
    """Environment of the head's processes: ours, minus any other cluster's address/token, plus this
    head's token auth settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(_auth_env(tmp_path))
    env.update(
        # `python` in job entrypoints means this interpreter.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
        # SIGTERM would otherwise first drain the node for up to 30 s (meant for Serve replicas).
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    return env


def _launch(
    tmp_path: Path, temp_dir: str, num_cpus: int, startup_timeout_s: float
) -> tuple[RayHead, subprocess.Popen]:
    """Start ``ray start --head --block`` on fresh free ports and wait until it is ready; stop it and
    raise if it is not."""
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    head_env = _head_env(tmp_path)
    head = RayHead(
        address=f"127.0.0.1:{gcs_port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env={
            **head_env,
            "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        },
        temp_dir=temp_dir,
        log_path=str(tmp_path / "ray_head.log"),
    )
    command = [
        RAY_BIN, "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        # Fixed defaults (10001, 52365) would collide with any other Ray on this machine.
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--num-cpus", str(num_cpus),
        "--num-gpus", "0",
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(head.log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_ready(head, agent_port, process, startup_timeout_s)
    except BaseException:
        _stop(process)
        raise
    return head, process


@contextlib.contextmanager
def local_ray_head(tmp_path: Path, num_cpus: int = 2, startup_timeout_s: float = 180.0) -> Iterator[RayHead]:
    """Start a Ray head on 127.0.0.1 with free ports and token auth; yield it; always stop it (only it).

    Raises RuntimeError/TimeoutError with the tail of the head's log if it does not come up; Ray's own
    logs then stay in ``tmp_path/ray`` for a post-mortem.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    temp_dir = _short_temp_dir(tmp_path)
    for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
        try:
            head, process = _launch(tmp_path, temp_dir, num_cpus, startup_timeout_s)
            break
        except RuntimeError as error:
            # A port chosen free can be taken by another process before Ray binds it: try fresh ports.
            if attempt == _LAUNCH_ATTEMPTS or not _PORT_TAKEN.search(str(error)):
                raise
    try:
        yield head
    finally:
        _stop(process)
    shutil.rmtree(temp_dir, ignore_errors=True)  # kept, like the logs above, when the body raised


def _ray_cli(head: RayHead, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``ray <args>`` with the head's client environment; RuntimeError (with its output) if it fails."""
    result = subprocess.run(
        [RAY_BIN, *args], env=head.env, capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`ray {' '.join(args)}` failed with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def job_status(head: RayHead, submission_id: str) -> str:
    """The job's status as told by ``ray job status``: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    result = _ray_cli(
        head, "job", "status", submission_id, "--address", head.dashboard_url, "--log-color", "false"
    )
    output = result.stdout + result.stderr
    for status, sentence in _STATUS_SENTENCES.items():
        if sentence.search(output):
            return status
    match = _OTHER_STATUS.search(output)
    if match is None:
        raise RuntimeError(f"no status in `ray job status` output:\n{output}")
    return match.group(1)


def job_logs(head: RayHead, submission_id: str) -> str:
    """The job's driver output so far, from ``ray job logs``."""
    return _ray_cli(head, "job", "logs", submission_id, "--address", head.dashboard_url).stdout


def start_job(
    head: RayHead,
    entrypoint: list[str],
    working_dir: str | os.PathLike,
    env_vars: dict[str, str] | None = None,
) -> str:
    """Submit ``entrypoint`` with the real ``ray job submit --no-wait`` CLI; return its submission id.

    ``working_dir`` is uploaded and becomes the job's current directory; ``env_vars`` go into the job's
    runtime_env."""
    submission_id = f"medsr-test-{uuid.uuid4().hex[:10]}"
    submit = [
        "job", "submit",
        "--address", head.dashboard_url,
        "--submission-id", submission_id,
        "--working-dir", str(working_dir),
        "--no-wait",
    ]  # fmt: skip
    if env_vars:
        submit += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    _ray_cli(head, *submit, "--", *entrypoint)
    return submission_id


def job_info(head: RayHead, submission_id: str) -> dict:
    """The Jobs API's record of a job (``status``, ``message``, ``driver_exit_code``, ...), over HTTP with the
    head's token: cheaper to poll than the ``ray job status`` CLI (a Python start-up per call)."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_for_job(
    head: RayHead, submission_id: str, timeout_s: float = 300.0, poll_interval_s: float = 1.0
) -> tuple[str, str]:
    """Wait for a job started with :func:`start_job` to end; return (SUCCEEDED | FAILED | STOPPED, its logs from
    ``ray job logs``). If it has not ended after ``timeout_s`` it is stopped and TimeoutError (with its logs so
    far) is raised."""
    deadline = time.monotonic() + timeout_s
    while (status := job_info(head, submission_id)["status"]) not in TERMINAL_JOB_STATES:
        if time.monotonic() > deadline:
            with contextlib.suppress(RuntimeError):
                _ray_cli(head, "job", "stop", submission_id, "--address", head.dashboard_url)
            logs = job_logs(head, submission_id)
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s; logs:\n{logs}")
        time.sleep(poll_interval_s)
    return status, job_logs(head, submission_id)


def submit_job(
    head: RayHead,
    entrypoint: list[str],
    working_dir: str | os.PathLike,
    env_vars: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    poll_interval_s: float = 1.0,
) -> tuple[str, str]:
    """Submit ``entrypoint`` with the real ``ray job submit --no-wait`` CLI and wait for it to end.

    ``working_dir`` is uploaded and becomes the job's current directory; ``env_vars`` go into the job's
    runtime_env. Returns (final status: SUCCEEDED | FAILED | STOPPED, the job's logs). If the job has
    not ended after ``timeout_s`` it is stopped and TimeoutError (with its logs so far) is raised.
    """
    submission_id = start_job(head, entrypoint, working_dir, env_vars)

    deadline = time.monotonic() + timeout_s
    status = job_status(head, submission_id)
    while status not in TERMINAL_JOB_STATES:
        if time.monotonic() > deadline:
            with contextlib.suppress(RuntimeError):
                _ray_cli(head, "job", "stop", submission_id, "--address", head.dashboard_url)
            logs = job_logs(head, submission_id)
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s; logs:\n{logs}")
        time.sleep(poll_interval_s)
        status = job_status(head, submission_id)
    return status, job_logs(head, submission_id)


# ------------------------------------------------------------------------------------------------------
# Worker nodes: more `ray start` processes on 127.0.0.1 joining a head, as KubeRay's worker pods do.
# ------------------------------------------------------------------------------------------------------
NODE_LABEL = "medsr-node"  # every worker node started here carries its name in this Ray node label


@dataclass
class RayWorkerNode:
    """A worker node started by :func:`start_worker_node`: ``ray start --address <head> --block`` in its own
    process group (stopped alone, like a head). ``name`` is its ``medsr-node`` label; ``node_id`` Ray's id."""

    name: str
    node_id: str
    process: subprocess.Popen
    temp_dir: str
    log_path: str

    def raylet_pid(self) -> int:
        """Process id of this node's raylet (a child of its ``ray start``); LookupError when it has none."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "raylet":
                    return child.pid
        raise LookupError(f"worker node {self.name} has no raylet process")

    def kill_raylet(self) -> None:
        """SIGKILL the raylet, as a lost machine or a deleted pod takes it; its workers then exit too."""
        os.kill(self.raylet_pid(), signal.SIGKILL)

    def stop(self) -> None:
        """Stop this node (SIGTERM, then SIGKILL of its whole process group); its temp dir is removed."""
        _stop(self.process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def state_api(head: RayHead, resource: str, timeout_s: float = 30.0, **filters: str) -> list[dict]:
    """Rows of Ray's state API (``/api/v0/<resource>``: nodes, actors, ...) with ``detail``; ``filters`` are
    equality filters (``class_name="RayTrainWorker"``). Authenticated with the head's token."""
    import urllib.parse

    params = [("detail", "true"), ("limit", "10000"), ("timeout", str(int(timeout_s)))]
    for key, value in filters.items():
        params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(params)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout_s + 5) as response:
        body = json.load(response)
    if not body.get("result"):
        raise RuntimeError(f"state API /api/v0/{resource} failed: {body.get('msg')}")
    return body["data"]["result"]["result"]


def start_worker_node(
    head: RayHead, tmp_path: Path, name: str, num_cpus: int, resources: dict[str, float] | None = None,
    object_store_mib: int = 256, startup_timeout_s: float = 120.0,
) -> RayWorkerNode:
    """Start a worker node joining ``head`` with ``num_cpus`` logical CPUs, no GPU, custom ``resources``, an object
    store of ``object_store_mib`` and the label ``medsr-node=<name>``; return once the head lists it ALIVE. The
    caller must ``stop()`` it.

    It authenticates with the head's token (``head.env``) and gets its own temp dir and dashboard agent port (the
    fixed default would collide with the head's). Raises RuntimeError/TimeoutError with its log's tail (after
    stopping it) if it does not come up."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=f"medsr-ray-{name}-", dir="/tmp")  # short: unix socket paths (see above)
    log_path = str(tmp_path / f"ray_worker_{name}.log")
    agent_port, metrics_port = free_ports(2)
    env = {k: v for k, v in head.env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    command = [
        RAY_BIN, "start", "--block",
        "--address", head.address,
        "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(num_cpus),
        "--num-gpus", "0",
        "--resources", json.dumps(resources or {}),
        "--labels", f"{NODE_LABEL}={name}",
        "--object-store-memory", str(object_store_mib * 1024 * 1024),
        "--dashboard-agent-listen-port", str(agent_port),
        "--metrics-export-port", str(metrics_port),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start (worker {name}) exited with {process.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError, RuntimeError):
                alive = [n for n in state_api(head, "nodes", state="ALIVE")
                         if (n.get("labels") or {}).get(NODE_LABEL) == name]
                if alive:
                    return RayWorkerNode(name, alive[0]["node_id"], process, temp_dir, log_path)
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker node {name} not ALIVE after {startup_timeout_s:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:
        _stop(process)
        raise


def own_train_workers() -> list:
    """The Ray Train worker processes of the Ray instance this test process started (``ray.init(address="local")``
    makes the raylet a child of this process, and the workers its children): a Ray Train run elsewhere on the
    machine (another test session, a benchmark) is never touched."""
    import psutil

    me = os.getpid()
    return [p for p in psutil.process_iter(["cmdline"])
            if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
            and any(parent.pid == me for parent in p.parents())]


def init_local_ray(**kwargs):
    """``ray.init(address="local", **kwargs)``, tried a second time when Ray's GCS did not publish its port in time.

    On this 2-core machine a CI rehearsal once failed a whole module's fixture with Ray's own start-up error
    ``RuntimeError: Timed out waiting for file .../gcs_server_port_...`` (the GCS left no log; the same module passed
    in the rehearsal before, with the same code). That is Ray starting, not what the tests check; any other error,
    or a second timeout, is raised.
    """
    import ray

    try:
        return ray.init(address="local", **kwargs)
    except RuntimeError as exc:
        if "Timed out waiting for file" not in str(exc):
            raise
        ray.shutdown()
        time.sleep(5)
        return ray.init(address="local", **kwargs)
