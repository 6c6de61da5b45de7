"""Where Ray starts: the one place the driver connects to (or starts) a cluster."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from medsr_dist.config import MedsrConfig

log = logging.getLogger(__name__)


def init_ray(cfg: MedsrConfig):
    """Join ``ray.address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``), else start a local instance."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address or "local", "ignore_reinit_error": True, "log_to_driver": True}
        if not address:  # a private local instance, never some other cluster that happens to run here
            kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=False)
        ray.init(**kwargs)
    configure_data_context(cfg, DataContext.get_current())
    return ray


def configure_data_context(cfg: MedsrConfig, ctx) -> None:
    """Ray Data settings of a run on ``ctx`` (a ``DataContext``): the driver's, or that of a process building
    datasets for it (the Ray Train controller rebuilding the training stream)."""
    ctx.enable_progress_bars = cfg.ray.progress
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


#: CPUs per node left to the CPU stages (decode/read and encode/write tasks, 0.25 CPU each: one of each at a time)
#: when model replicas are sized from the cluster. They take ~1 % of a CPU node's time on x4plus (a 256x256 16-bit
#: PNG decodes in ms; the model needs seconds), so half a CPU keeps them from starving without idling a core.
STAGE_RESERVE_CPUS = 0.5
#: CPU of each decode/encode task of a job whose replicas are sized from the cluster.
STAGE_TASK_CPUS = 0.25
#: Memory an auto-sized CPU replica is assumed to need: the measured peak RSS of an x4plus replica enhancing a
#: 2048x2048 16-bit image at x4 with tile 256 (2.84 GiB, docs/PERFORMANCE.md section 3), rounded up. A node whose
#: memory (Ray's ``memory`` resource) holds fewer such replicas than it has CPUs gets fewer replicas with more
#: threads each.
REPLICA_MEMORY_BYTES = 3 * 1024 ** 3


@dataclass(frozen=True)
class ReplicaSizing:
    """How many model replicas a pass runs and what each is granted (:func:`size_replicas`).

    Attributes:
        min_replicas, max_replicas: the actor pool's bounds.
        cpus: Ray CPUs per replica (1 next to a GPU).
        gpus: Ray GPUs per replica (0 on CPU-only clusters).
        threads: torch/onnxruntime intra-op threads of a replica (``ceil(cpus)`` on CPU; the granted CPUs).
        how: one line saying where the numbers came from (logged and recorded in the run's manifest).
    """

    min_replicas: int
    max_replicas: int
    cpus: float
    gpus: float
    threads: int
    how: str

    def record(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas, "cpus_per_replica": self.cpus,
                "gpus_per_replica": self.gpus, "threads_per_replica": self.threads, "sizing": self.how}


def cluster_nodes() -> list[dict[str, float]]:
    """``[{"CPU": n, "GPU": g, "memory": bytes}, ...]`` of the live nodes of the connected Ray cluster
    (``ray.nodes()``; ``memory`` is Ray's schedulable memory resource); without a connected cluster, this machine's
    CPUs and physical memory (what a local instance would start with)."""
    import ray  # lazy: runtime.py is imported by drivers that may never start Ray

    if not ray.is_initialized():
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return [{"CPU": float(os.cpu_count() or 1), "GPU": 0.0, "memory": memory}]
    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0)),
             "memory": float(n["Resources"].get("memory", 0))}
            for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def cluster_free() -> dict[str, float] | None:
    """The connected Ray cluster's resources not held now (``ray.available_resources()``: CPU, GPU); ``None``
    without a connected cluster."""
    import ray  # lazy: runtime.py is imported by drivers that may never start Ray

    if not ray.is_initialized():
        return None
    free = ray.available_resources()
    return {"CPU": float(free.get("CPU", 0.0)), "GPU": float(free.get("GPU", 0.0))}


def size_replicas(nodes: list[dict[str, float]], *, cpus_per_replica: float | str = "auto",
                  min_replicas: int | str = "auto", max_replicas: int | str = "auto", section: str = "enhance",
                  reserve: float = STAGE_RESERVE_CPUS, free: dict[str, float] | None = None) -> ReplicaSizing:
    """Model replicas for the cluster ``nodes`` (see :func:`cluster_nodes`); explicit numbers win over ``auto``.

    GPU clusters: one replica per GPU, 1 CPU each. CPU-only clusters: one single-threaded replica per CPU of the
    node (fewer, with more threads each, where the node's ``memory`` does not hold that many replicas of
    :data:`REPLICA_MEMORY_BYTES`), sharing the node's CPUs less ``reserve`` for the decode/encode stages (replicas x
    CPUs = node CPUs - reserve; a 2-CPU node: two replicas of 0.75 CPU and 1 thread). Independent replicas beat one
    replica of as many intra-op threads on the same cores: no thread waits on another at each convolution's
    barrier, and a decode/encode task that preempts one replica's thread stalls only that replica (measured in
    docs/PERFORMANCE.md section 2b). The sizes come from the smallest node so that a replica fits on every node;
    explicit ``cpus_per_replica`` gives ``ceil(cpus)`` threads. ``min_replicas: auto`` is ``max_replicas``: the pass waits for
    the whole pool (``replica_start_timeout_s``) before it reads any item; given ``free`` (the cluster's
    resources not held now, ``ray.available_resources()``), it is the replicas that fit in them (at least 1):
    on a cluster shared with a Serve application the pass starts on what is free and the pool grows to
    ``max_replicas`` as resources come free, rather than waiting for replicas that cannot start.

    Raises:
        ValueError: the cluster has no CPU (names ``section``).
    """
    gpus = sum(n.get("GPU", 0) for n in nodes)
    cpu_nodes = [n["CPU"] for n in nodes if n.get("CPU", 0) > 0]
    if not cpu_nodes:
        raise ValueError(f"{section}: the Ray cluster has no CPU to size model replicas on")
    if gpus > 0:
        count = max(1, int(gpus))
        how = f"auto: one replica per GPU ({count} GPU(s))"
        cpus, per_gpu, threads = 1.0, 1.0, 1
        if cpus_per_replica != "auto":
            cpus, threads = float(cpus_per_replica), max(1, math.ceil(float(cpus_per_replica)))
    else:
        per_gpu = 0.0
        room = [max(c - reserve, min(c, 0.5)) for c in cpu_nodes]
        if cpus_per_replica != "auto":
            cpus = float(cpus_per_replica)
            how = f"{section}.cpus_per_replica {cpus:g}"
        elif max_replicas != "auto":
            cpus = min(min(room), sum(room) / int(max_replicas))
            how = f"auto: {sum(room):g} CPUs for {max_replicas} replica(s) ({section}.max_replicas)"
        else:
            smallest = min(cpu_nodes)
            memory = min((n.get("memory", 0.0) for n in nodes if n.get("CPU", 0) > 0), default=0.0)
            per_node = max(1, int(smallest + 1e-9))
            held = f"{'/'.join(f'{c:g}' for c in cpu_nodes)} CPUs"
            if memory > 0 and memory // REPLICA_MEMORY_BYTES < per_node:
                per_node = max(1, int(memory // REPLICA_MEMORY_BYTES))
                held += f", {memory / 1024 ** 3:.1f} GiB memory for {per_node} replica(s) of " \
                        f"{REPLICA_MEMORY_BYTES / 1024 ** 3:g} GiB"
            cpus = min(room) / per_node
            threads = max(1, int(smallest / per_node + 1e-9))
            how = f"auto: {len(cpu_nodes)} CPU node(s) of {held}, {per_node} replica(s) of {threads} thread(s) per " \
                  f"node, {reserve:g} CPU each kept for decode/encode"
        cpus = math.floor(cpus * 100) / 100  # Ray's CPU quantum is 1e-4; keep the figure readable
        if cpus_per_replica != "auto" or max_replicas != "auto":
            threads = max(1, math.ceil(cpus - 1e-9))
        count = max(1, sum(int((r + 1e-9) // cpus) for r in room))
    top = count if max_replicas == "auto" else int(max_replicas)
    low = top if min_replicas == "auto" else min(int(min_replicas), top)
    if min_replicas == "auto" and free is not None:
        fits = (int(free.get("GPU", 0.0) + 1e-9) if gpus > 0
                else int((max(free.get("CPU", 0.0) - reserve * len(cpu_nodes), 0.0) + 1e-9) // cpus))
        if fits < top:
            low = max(1, fits)
            how += f"; {low} fit in the resources free now, the pool grows to {top}"
    if min_replicas != "auto" and max_replicas == "auto":
        top = max(top, int(min_replicas))
        low = int(min_replicas)
    return ReplicaSizing(low, top, cpus, per_gpu, threads, how)


def balanced_batch_size(items: int, most: int, replicas: int) -> int:
    """Images per replica batch: at most ``most`` (``enhance.images_per_batch``, ``eval.batch_size``), and as even a split of ``items``
    over ``replicas`` as that allows, so that no replica is left with a last batch while the others idle (12
    items, 4 per batch, 2 replicas: 3 batches would give one replica twice the work; 4 batches of 3 do not)."""
    if items <= 0:
        return max(1, most)
    rounds = math.ceil(items / (max(1, replicas) * max(1, most)))
    return max(1, min(most, math.ceil(items / (max(1, replicas) * rounds))))


#: CPU of each Ray Data task of the training stream (the parquet read and the per-epoch tagging run as tasks with
#: Ray Data's default of one CPU): one such task must be able to run beside the trainers and degradation actors.
TRAIN_DATA_TASK_CPUS = 1.0


class ClusterTooSmallError(ValueError):
    """A run's actors cannot all be placed on the cluster: it would wait for ever (the message names the keys)."""


def check_training_fits(nodes: list[dict[str, float]], *, num_workers: int, cpus_per_worker: float, use_gpu: bool,
                        num_actors: int, cpus_per_actor: float) -> None:
    """Raise :class:`ClusterTooSmallError` when the trainers (``train.num_workers`` x ``train.cpus_per_worker``, a GPU
    each with ``use_gpu``), the degradation actors (``degradation.num_actors`` x ``degradation.cpus_per_actor``) and
    one Ray Data task (:data:`TRAIN_DATA_TASK_CPUS`) do not fit ``nodes`` (see :func:`cluster_nodes`): otherwise the
    trainers start, hold the CPUs, and the stream that feeds them never gets one ("0 rows" for ever)."""
    total = sum(n.get("CPU", 0) for n in nodes)
    trainers = num_workers * cpus_per_worker
    actors = num_actors * cpus_per_actor
    need = trainers + actors + TRAIN_DATA_TASK_CPUS
    fix = ("lower train.num_workers / train.cpus_per_worker or degradation.num_actors / degradation.cpus_per_actor, "
           "or give Ray more CPUs (ray.num_cpus for a local instance: logical CPUs may exceed the cores)")
    if need > total + 1e-9:
        raise ClusterTooSmallError(
            f"training needs {need:g} CPUs but the Ray cluster has {total:g}: train.num_workers {num_workers} x "
            f"train.cpus_per_worker {cpus_per_worker:g} + degradation.num_actors {num_actors} x "
            f"degradation.cpus_per_actor {cpus_per_actor:g} + {TRAIN_DATA_TASK_CPUS:g} for Ray Data's read/epoch "
            f"tasks; {fix}")
    placeable = sum(int((n.get("CPU", 0) + 1e-9) // cpus_per_worker) for n in nodes)
    if placeable < num_workers:
        raise ClusterTooSmallError(
            f"train.num_workers {num_workers} trainers of train.cpus_per_worker {cpus_per_worker:g} CPUs do not fit the "
            f"nodes ({'/'.join(format(n.get('CPU', 0), 'g') for n in nodes)} CPUs): only {placeable} do; {fix}")
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if use_gpu and gpus < num_workers:
        raise ClusterTooSmallError(f"train.num_workers {num_workers} trainers want a GPU each but the Ray cluster has "
                                   f"{gpus:g}: lower train.num_workers or add GPU nodes")
