"""Multi-node rehearsal on one machine: what KubeRay gives a job, minus Kubernetes.

A Ray head with no CPUs (as KubeRay's head, ``num-cpus: "0"``) and two worker nodes, all started with ``ray start``
on 127.0.0.1 with Ray token auth: ``gpu-0`` advertises the custom resource ``medsr_gpu`` (standing in for the GPU
worker group's ``nvidia.com/gpu``: a real ``GPU`` resource would make the jobs put torch on CUDA), ``cpu-0`` only
CPUs; 4 logical CPUs each. Jobs go in with the real ``ray job submit`` CLI and keep all their state on the suite's S3
server (``run.root`` on ``s3://``), as multi-node runs must (no node's disk is shared).

1. Training (``jobs/train.py``): 2 Ray Train workers of 3 CPUs each, so one per worker node. Once Ray Train has
   registered a checkpoint on S3, ``gpu-0``'s raylet is SIGKILLed (a lost node). A replacement node with the same
   resources is started, as KubeRay's operator recreates a deleted worker pod (the surviving 4-CPU node cannot host
   both 3-CPU workers, so running on the remaining capacity is not an option for this job shape). Ray Train's
   FailureConfig (``train.max_failures``) restarts the worker group, which restores the latest checkpoint; the job
   finishes, and its checkpoint metadata says from which iteration it resumed.
2. Nightly enhancement (``jobs/enhance.py``): 2 model replicas of 3 CPUs, one per worker node; every input gets one
   output, and a second submission redoes nothing.

The cluster lives for the module; every process it started is stopped by the fixture, also when a test fails.
"""
from __future__ import annotations

import io
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import write_tiny_model
from medsr_dist.config import StorageConfig, load_config
from medsr_dist.data.prepare import to_training_png
from medsr_dist.data.synthetic import make_radiograph, write_sample_archive
from medsr_dist.enhance.identity import MANIFEST_DIR
from medsr_dist.enhance.manifest import read_manifest
from medsr_dist.storage import Storage
from ray_cluster import (
    RayHead,
    RayWorkerNode,
    TERMINAL_JOB_STATES,
    job_info,
    local_ray_head,
    start_job,
    start_worker_node,
    state_api,
    wait_for_job,
)

REPO = Path(__file__).resolve().parent.parent

CPUS_PER_NODE = 4
GPU_STANDIN = {"medsr_gpu": 1}
# The GCS declares a node dead after this many failed health checks, one a second (defaults: 5 every 3 s): a lost
# node is noticed in ~5 s instead of ~20 s.
HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                    "RAY_health_check_failure_threshold": "4"}

# 50 iterations after the first checkpoint: time enough (seconds) for the kill to land before the run ends
ITERATIONS = 60
CHECKPOINT_EVERY = 10


@dataclass
class Rehearsal:
    head: RayHead
    tmp: Path
    nodes: dict[str, RayWorkerNode] = field(default_factory=dict)

    def add_node(self, name: str, resources: dict[str, float] | None = None) -> RayWorkerNode:
        node = start_worker_node(self.head, self.tmp, name, CPUS_PER_NODE, resources)
        self.nodes[name] = node
        return node

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory) -> Iterator[Rehearsal]:
    """Head (0 CPUs) + ``gpu-0`` (4 CPUs, ``medsr_gpu``) + ``cpu-0`` (4 CPUs); started after the S3 server so every
    node's processes inherit its credentials. Nodes added by a test are stopped here too."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    with pytest.MonkeyPatch.context() as env:
        for name, value in HEALTH_CHECK_ENV.items():
            env.setenv(name, value)
        with local_ray_head(tmp / "head", num_cpus=0) as head:
            rehearsal = Rehearsal(head, tmp)
            try:
                rehearsal.add_node("gpu-0", GPU_STANDIN)
                rehearsal.add_node("cpu-0")
                yield rehearsal
            finally:
                rehearsal.stop_all()


@pytest.fixture(scope="module")
def bucket(_s3_admin) -> Iterator[str]:
    name = f"medsr-rehearsal-{uuid.uuid4().hex[:8]}"
    _s3_admin.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in _s3_admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            _s3_admin.delete_object(Bucket=name, Key=item["Key"])
    _s3_admin.delete_bucket(Bucket=name)


@pytest.fixture(scope="module")
def storage(s3_server) -> Storage:
    return Storage(StorageConfig(endpoint_url=s3_server))


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory) -> Path:
    """What a user uploads with ``--working-dir``: the package, the job entrypoints and the configs."""
    wd = tmp_path_factory.mktemp("wd")
    for name in ("medsr_dist", "jobs", "configs"):
        shutil.copytree(REPO / name, wd / name, ignore=shutil.ignore_patterns("__pycache__"))
    return wd


def s3_get(client, uri: str) -> bytes | None:
    """An object's bytes straight from S3 (no listing cache), None when it does not exist."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def s3_objects(client, prefix: str) -> dict[str, tuple[str, str]]:
    """{uri: (ETag, LastModified)} of every object under an s3:// prefix."""
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
        for item in page.get("Contents", []):
            found[f"s3://{bucket}/{item['Key']}"] = (item["ETag"], str(item["LastModified"]))
    return found


def actors_by_node(head: RayHead, match) -> dict[str, list[dict]]:
    """{node_id: [actor rows]} of the actors (alive or dead) whose state-API row satisfies ``match``."""
    found: dict[str, list[dict]] = {}
    for actor in state_api(head, "actors"):
        if match(actor):
            found.setdefault(actor["node_id"], []).append(actor)
    return found


def is_train_worker(actor: dict) -> bool:
    return actor["class_name"] == "RayTrainWorker"


def is_enhance_replica(actor: dict) -> bool:
    return "EnhanceReplica" in (actor.get("repr_name") or "") or "EnhanceReplica" in actor["class_name"]


def write_training_dataset(storage: Storage, root: str) -> None:
    """A prepared dataset (train: 8 rows, val: 2) of 64-px 16-bit synthetic radiographs, as `medsr prepare` writes."""
    for split, seeds in (("train", range(8)), ("val", range(8, 10))):
        rows = [{"key": f"p{s}_000.png", "patient_id": f"p{s}",
                 "image": to_training_png(make_radiograph(s, 64)[:, :, None], 16)} for s in seeds]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        storage.write_bytes(f"{root}/{split}/part-0.parquet", buffer.getvalue())


def wait_for_registered_checkpoint(client, snapshot_uri: str, while_waiting, timeout_s: float = 240.0) -> dict:
    """Poll until Ray Train's checkpoint manager snapshot on S3 names a checkpoint; return that checkpoint's metrics.
    ``while_waiting()`` is called between polls (it raises to give up).

    The snapshot is written by the Train controller once every rank's report of a checkpoint is in: from then on a
    restarted worker group gets that checkpoint (a folder merely uploaded may not be registered yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = s3_get(client, snapshot_uri)
        latest = json.loads(data).get("latest_checkpoint_result") if data else None
        if latest:
            return latest["metrics"]
        while_waiting()
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint registered in {snapshot_uri} after {timeout_s:.0f}s")


def test_resume_starts_from_the_checkpoint_ray_train_registered_not_the_newest_folder(tmp_path):
    """A job killed after checkpoint 20's upload but before Ray Train registered it: a new fit() restores 10, so
    the stream must be sized from 10 (sized from 20 it ended 10 iterations short)."""
    from medsr_dist.train.trainer import CHECKPOINT_SNAPSHOT_FILE, latest_iteration

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    storage = Storage(cfg.storage)
    run_dir = Path(cfg.train.output) / "r"
    for iteration in (10, 20):
        (run_dir / f"checkpoint_{iteration}").mkdir(parents=True)
        (run_dir / f"checkpoint_{iteration}" / "meta.json").write_text(json.dumps({"iteration": iteration}))
    assert latest_iteration(storage, cfg) == 20  # no snapshot (a run of an older Ray Train): the newest folder

    snapshot = run_dir / CHECKPOINT_SNAPSHOT_FILE
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_10",
                                                                 "metrics": {"iteration": 10}}}))
    assert latest_iteration(storage, cfg) == 10
    snapshot.write_text(json.dumps({"latest_checkpoint_result": None, "checkpoint_results": []}))
    assert latest_iteration(storage, cfg) == 0  # nothing registered: Ray Train starts from scratch
    snapshot.write_text("{not json")
    with pytest.raises(ValueError, match=CHECKPOINT_SNAPSHOT_FILE):
        latest_iteration(storage, cfg)


@pytest.mark.slow
def test_training_survives_a_lost_worker_node_and_resumes_from_its_last_checkpoint(
        cluster, bucket, storage, working_dir, _s3_admin, s3_server):
    head = cluster.head
    root = f"{bucket}/run"
    write_training_dataset(storage, f"{root}/dataset")
    run_dir = f"{root}/train/rehearsal"
    started = time.monotonic()
    submission = start_job(head, [
        "python", "jobs/train.py", "--config", "configs/demo_psnr.yaml",
        f"run.root={root}", "run.name=rehearsal", f"storage.endpoint_url={s3_server}", "ray.progress=false",
        "degradation.gt_size=32", "degradation.num_actors=1", "degradation.cpus_per_actor=1",
        "model.generator={type: MSRResNet, num_feat: 8, num_block: 1}",
        # 3 of a node's 4 CPUs per worker: no node can hold both, so the two ranks land on the two worker nodes
        "train.num_workers=2", "train.cpus_per_worker=3", "train.use_gpu=false", "train.batch_size=1",
        f"train.iterations={ITERATIONS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        f"train.log_every={CHECKPOINT_EVERY}", f"train.val_every={2 * CHECKPOINT_EVERY}", "train.max_failures=2",
    ], working_dir)

    placement: dict[str, list[dict]] = {}  # the ranks' nodes, looked up while waiting so the kill follows at once

    def while_waiting():
        status = job_info(head, submission)["status"]
        if status in TERMINAL_JOB_STATES:
            raise AssertionError(f"the training job ended ({status}) before a checkpoint was registered")
        if not placement:
            alive = actors_by_node(head, lambda a: is_train_worker(a) and a["state"] == "ALIVE")
            if sum(map(len, alive.values())) == 2:
                placement.update(alive)

    registered = wait_for_registered_checkpoint(_s3_admin, f"{run_dir}/checkpoint_manager_snapshot.json",
                                                while_waiting)
    before = placement or actors_by_node(head, lambda a: is_train_worker(a) and a["state"] == "ALIVE")
    victim = cluster.nodes["gpu-0"]
    victim.kill_raylet()  # the lost node: its raylet, and with it the rank on it, go without warning
    killed_s = time.monotonic() - started
    victim.stop()  # whatever of that node outlived its raylet (its `ray start` exits once the raylet is gone)
    replacement = cluster.add_node("gpu-1", GPU_STANDIN)  # what KubeRay's operator does for the deleted pod

    status, logs = wait_for_job(head, submission, timeout_s=300)
    (cluster.tmp / "train-job.log").write_text(logs)
    print(f"train job: checkpoint {registered['iteration']} registered and node killed after {killed_s:.0f} s, "
          f"finished after {time.monotonic() - started:.0f} s")
    assert status == "SUCCEEDED", logs

    # the kill landed mid-run, with one rank on each worker node
    assert CHECKPOINT_EVERY <= registered["iteration"] < ITERATIONS
    assert set(before) == {victim.node_id, cluster.nodes["cpu-0"].node_id}, before
    # the rank on the lost node died with it; the restarted group has a rank on the replacement node
    after = actors_by_node(head, is_train_worker)
    assert {a["state"] for a in after[victim.node_id]} == {"DEAD"}
    assert replacement.node_id in after and sum(map(len, after.values())) == 4  # 2 ranks, twice

    # resumed from the last registered checkpoint, not from iteration 0, and finished
    snapshot = json.loads(s3_get(_s3_admin, f"{run_dir}/checkpoint_manager_snapshot.json"))
    final = snapshot["latest_checkpoint_result"]["metrics"]
    assert final["iteration"] == ITERATIONS
    resumed = final["resumed_from"]
    assert registered["iteration"] <= resumed < ITERATIONS and resumed % CHECKPOINT_EVERY == 0, final
    kept = [r["metrics"] for r in snapshot["checkpoint_results"]]
    assert all(m["resumed_from"] == resumed for m in kept if m["iteration"] > resumed), kept
    meta = json.loads(s3_get(_s3_admin, f"{root}/train/export/meta.json"))
    assert meta["iteration"] == ITERATIONS and meta["name"] == f"rehearsal@{ITERATIONS}"
    assert f"resumed from iteration {resumed}" in logs and "exported model" in logs


@pytest.mark.slow
def test_the_nightly_job_runs_across_nodes_and_enhances_each_input_exactly_once(
        cluster, bucket, storage, working_dir, _s3_admin, s3_server):
    head = cluster.head
    archive, output, models = f"{bucket}/archive", f"{bucket}/enhanced", f"{bucket}/models/tiny"
    written = write_sample_archive(lambda key, data: storage.write_bytes(f"{archive}/{key}", data),
                                   n_images=6, size=32, seed=5)
    inputs = sorted(f"{archive}/{w['key']}" for w in written)
    write_tiny_model(lambda name, data: storage.write_bytes(f"{models}/{name}", data))
    config = {
        "run": {"name": "nightly-rehearsal", "root": f"{bucket}/run"},
        "storage": {"endpoint_url": s3_server},
        "ray": {"progress": False},
        "enhance": {"input": archive, "output": output, "checkpoint": f"{models}/model.pth",
                    "tile": 32, "tile_overlap": 4, "batch_size": 4, "images_per_batch": 2,
                    # 3 of a node's 4 CPUs per replica: one replica on each worker node
                    "min_replicas": 2, "max_replicas": 2, "cpus_per_replica": 3},
    }
    (working_dir / "configs" / "rehearsal_nightly.yaml").write_text(yaml.safe_dump(config))
    entrypoint = ["python", "jobs/enhance.py", "--config", "configs/rehearsal_nightly.yaml"]
    runs_dir = f"{output}/{MANIFEST_DIR}/runs"

    started = time.monotonic()
    status, logs = wait_for_job(head, start_job(head, entrypoint, working_dir), timeout_s=240)
    (cluster.tmp / "enhance-job-1.log").write_text(logs)
    print(f"nightly job: first run {time.monotonic() - started:.0f} s")
    assert status == "SUCCEEDED", logs
    first_objects = s3_objects(_s3_admin, output)
    (first_run,) = [k for k in first_objects if k.startswith(runs_dir)]
    rows = {r["input_key"]: r for r in read_manifest(storage, first_run)}
    assert sorted(rows) == inputs and {r["status"] for r in rows.values()} == {"done"}, rows
    outputs = {r["output_key"] for r in rows.values()}
    assert len(outputs) == len(inputs) and all(outputs)
    assert {k for k in first_objects if f"/{MANIFEST_DIR}/" not in k} == outputs  # one output each, nothing else
    worker_nodes = {node.node_id for node in cluster.nodes.values() if node.process.poll() is None}
    replicas = actors_by_node(head, is_enhance_replica)
    # one replica on each live worker node: the job waits for enhance.min_replicas (enhance.replica_start_timeout_s)
    # before its decode tasks can take the CPUs a pending 3-CPU replica needs
    assert set(replicas) == worker_nodes, replicas

    started = time.monotonic()
    status, logs = wait_for_job(head, start_job(head, entrypoint, working_dir), timeout_s=240)
    (cluster.tmp / "enhance-job-2.log").write_text(logs)
    print(f"nightly job: rerun {time.monotonic() - started:.0f} s")
    assert status == "SUCCEEDED", logs
    second_objects = s3_objects(_s3_admin, output)
    (second_run,) = [k for k in second_objects if k.startswith(runs_dir) and k not in first_objects]
    assert {r["status"] for r in read_manifest(storage, second_run)} == {"skipped"}
    assert sorted(r["input_key"] for r in read_manifest(storage, second_run)) == inputs
    unchanged = {k: v for k, v in first_objects.items() if not k.endswith("manifest.parquet")}
    assert {k: second_objects[k] for k in unchanged} == unchanged  # outputs and item records not rewritten
    assert set(second_objects) - set(first_objects) == {second_run}
