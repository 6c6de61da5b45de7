"""The real-cluster harness: jobs submitted with the `ray job submit` CLI run on a local Ray head."""
from __future__ import annotations

import socket
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import ray_cluster
from ray_cluster import RayHead, free_ports, local_ray_head, submit_job

pytestmark = pytest.mark.slow

WRITE_MARKER_JOB = textwrap.dedent(
    """
    import os
    import sys

    import ray

    ray.init()  # the job's RAY_ADDRESS and auth token come from the cluster


    @ray.remote
    def write_marker(path, text):
        with open(path, "w") as handle:
            handle.write(text)
        return os.getpid()


    task_pid = ray.get(write_marker.remote(sys.argv[1], os.environ["MEDSR_GREETING"]))
    print(f"driver {os.getpid()} ran a task in {task_pid}; cwd holds", sorted(os.listdir(".")))
    """
)

FAILING_JOB = textwrap.dedent(
    """
    import ray

    ray.init()
    ray.get(ray.remote(lambda: 1 / 0).remote())
    """
)


S3_WRITING_JOB = textwrap.dedent(
    """
    import sys

    import ray

    from medsr_dist.config import StorageConfig
    from medsr_dist.storage import Storage

    ray.init()
    endpoint, uri = sys.argv[1], sys.argv[2]
    storage = Storage(StorageConfig(endpoint_url=endpoint))  # shipped to the task by pickling


    @ray.remote
    def write(storage, uri):
        storage.write_bytes(uri, b"written by a ray task")


    ray.get(write.remote(storage, uri))
    print("driver reads back:", storage.read_bytes(uri).decode())
    """
)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server) -> Iterator[RayHead]:
    """One head for this module, started after the S3 server so its workers inherit the S3 credentials."""
    with local_ray_head(tmp_path_factory.mktemp("ray-head"), num_cpus=2) as head:
        yield head


def _job_dir(tmp_path: Path, name: str, source: str) -> Path:
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    (working_dir / name).write_text(source)
    return working_dir


def _accepts_connections(address: str) -> bool:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def test_a_submitted_job_runs_remote_tasks_with_its_working_dir_and_env(ray_head, tmp_path):
    working_dir = _job_dir(tmp_path, "write_marker.py", WRITE_MARKER_JOB)
    marker = tmp_path / "marker.txt"

    status, logs = submit_job(
        ray_head,
        ["python", "write_marker.py", str(marker)],
        working_dir=working_dir,
        env_vars={"MEDSR_GREETING": "hello from a ray task"},
        timeout_s=180,
    )

    assert status == "SUCCEEDED", logs
    assert marker.read_text() == "hello from a ray task"
    assert "cwd holds ['write_marker.py']" in logs


def test_a_failing_job_reports_failed_with_its_traceback(ray_head, tmp_path):
    working_dir = _job_dir(tmp_path, "fail.py", FAILING_JOB)

    status, logs = submit_job(ray_head, [sys.executable, "fail.py"], working_dir=working_dir, timeout_s=180)

    assert status == "FAILED"
    assert "ZeroDivisionError" in logs


def test_a_job_ships_a_storage_to_its_tasks_and_reaches_s3(ray_head, s3_server, s3_bucket, storage_s3, tmp_path):
    working_dir = _job_dir(tmp_path, "write_s3.py", S3_WRITING_JOB)
    uri = f"{s3_bucket}/from-ray/out.bin"

    status, logs = submit_job(ray_head, ["python", "write_s3.py", s3_server, uri], working_dir, timeout_s=180)

    assert status == "SUCCEEDED", logs
    assert "driver reads back: written by a ray task" in logs
    assert storage_s3.read_bytes(uri) == b"written by a ray task"


def test_the_head_requires_its_token(ray_head):
    anonymous = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10)
    assert refused.value.code == 401


def test_stopping_a_head_frees_its_ports_and_leaves_other_clusters_running(ray_head, tmp_path):
    with local_ray_head(tmp_path, num_cpus=1) as other:
        assert _accepts_connections(other.address) and _accepts_connections(other.dashboard_url)

    assert not _accepts_connections(other.address)
    assert not _accepts_connections(other.dashboard_url)
    assert _accepts_connections(ray_head.address) and _accepts_connections(ray_head.dashboard_url)


def test_ports_chosen_together_are_distinct():
    ports = free_ports(64)
    assert len(set(ports)) == 64


def test_a_head_given_a_port_twice_is_started_again_on_fresh_ports(ray_head, tmp_path, monkeypatch):
    """What failed a CI run: the GCS and the dashboard agent got the same port and `ray start` exited."""
    chosen = []

    def first_with_a_repeated_port(count):
        ports = free_ports(count)
        if not chosen:
            ports[2] = ports[0]  # dashboard agent on the GCS port
        chosen.append(ports)
        return ports

    monkeypatch.setattr(ray_cluster, "free_ports", first_with_a_repeated_port)
    with local_ray_head(tmp_path, num_cpus=1) as other:
        assert _accepts_connections(other.address) and _accepts_connections(other.dashboard_url)
    # Retried only because `ray start` said a port was taken (see _PORT_TAKEN), and on the fresh ports.
    assert len(chosen) == 2
    assert other.address.endswith(f":{chosen[1][0]}")
