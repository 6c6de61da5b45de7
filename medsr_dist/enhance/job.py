"""The driver of `medsr enhance`: model check, listing, lease, plan, the Ray pipeline passes, manifests.

Contract: :func:`run_enhance_job` runs one night (see :mod:`medsr_dist.enhance` for the whole story) and returns an
:class:`EnhanceResult`; it raises before any Ray work when the model, its backend or the listing is unusable, and
:class:`~medsr_dist.storage.LeaseHeldError` when another run holds the output prefix. The pipeline is
:class:`~medsr_dist.enhance.read.ReadDecode` -> :class:`~medsr_dist.enhance.replicas.EnhanceReplica` (or
:class:`~medsr_dist.enhance.serve_client.ServeReplica`) -> :class:`~medsr_dist.enhance.commit.EncodeCommit`.
"""
from __future__ import annotations

import gc
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from medsr_dist.config import EnhanceConfig, MedsrConfig
from medsr_dist.enhance.commit import EncodeCommit
from medsr_dist.enhance.identity import LEASE_FILE, MANIFEST_DIR
from medsr_dist.enhance.manifest import (
    STATUSES,
    manifest_row,
    manifest_uri,
    merge_cumulative,
    now_iso,
    plain,
    remove_stale_partials,
    run_manifest_uri,
    watermark_uri,
    write_manifest,
)
from medsr_dist.enhance.pass_owner import start_pass_owner
from medsr_dist.enhance.plan import list_inputs, plan_run
from medsr_dist.enhance.read import ReadDecode
from medsr_dist.enhance.replicas import EnhanceReplica
from medsr_dist.enhance.serve_client import ServeReplica, serve_deployment
from medsr_dist.enhance.spec import JobSpec, row_model
from medsr_dist.enhance.volumes import group_series, plan_volume_job
from medsr_dist.infer.model_file import (ModelFile, build_model_backend, choose_backend, read_model_file,
                                         runnable_precision)
from medsr_dist.infer.provenance import enhance_params
from medsr_dist.io.phi import item_label
from medsr_dist.pacs.storage import PacsStorage, read_watermark, watermark_of_rows, write_watermark
from medsr_dist.runtime import (STAGE_TASK_CPUS, ReplicaSizing, balanced_batch_size, cluster_free, cluster_has_gpus,
                               cluster_nodes, size_replicas)
from medsr_dist.storage import Lease, Storage
from medsr_dist.uris import is_dicomweb

log = logging.getLogger(__name__)

CRASH_REASON = ("the model replica died with this item in its batch, and again with this item alone "
                "(a crash or out of memory in the model or its runtime)")


@dataclass
class EnhanceProgress:
    """Where a run stands; handed to the progress callback after every item."""

    total: int
    counts: dict[str, int]
    input_pixels: int  # of the items done so far
    elapsed_s: float

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        rate = self.finished / self.elapsed_s if self.elapsed_s > 0 else 0.0
        mpx = self.input_pixels / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0
        left = (self.total - self.finished) / rate if rate > 0 else math.inf
        eta = f"{left:.0f} s" if math.isfinite(left) else "?"
        counts = " · ".join(f"{s} {self.counts.get(s, 0)}" for s in STATUSES)
        return (f"{self.finished}/{self.total} items ({100 * self.finished / max(self.total, 1):.0f}%) · {counts} · "
                f"{rate:.2f} items/s · {mpx:.2f} input Mpx/s · eta {eta}")


@dataclass
class EnhanceResult:
    output: str
    manifest: str
    run_manifest: str
    counts: dict[str, int]
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    input_pixels: int = 0  # of the items enhanced in this run
    log_keys: bool = False
    read_items: int = 0  # input reads (items sent to the pipeline; one retried alone twice); the rest: from the manifest
    sizing: ReplicaSizing | None = None  # the model replicas that ran (None: nothing went to Ray)

    @property
    def n_errors(self) -> int:
        return self.counts.get("error", 0)

    def label(self, row: dict) -> str:
        """How to name ``row``'s item in logs (see :func:`item_label`)."""
        return item_label(row, self.log_keys)


def job_storage(cfg: MedsrConfig, storage: Storage | None = None) -> Storage:
    """The job's storage: ``storage`` (default: ``Storage(cfg.storage)``), as a
    :class:`~medsr_dist.pacs.storage.PacsStorage` with ``cfg.pacs`` when the input or output is a DICOMweb endpoint."""
    storage = storage or Storage(cfg.storage)
    if (is_dicomweb(cfg.enhance.input) or is_dicomweb(cfg.enhance.output)) and not isinstance(storage, PacsStorage):
        storage = PacsStorage(storage.config, cfg.pacs)
    return storage



def run_enhance_job(
    cfg: MedsrConfig, storage: Storage | None = None, progress: Callable[[EnhanceProgress], None] | None = None
) -> EnhanceResult:
    """Enhance ``enhance.input`` into ``enhance.output`` (Ray must be initialised when there is work to do).

    ``progress`` is called after every finished item. Raises before any Ray work when the model, its backend or
    the input listing is unusable (FileNotFoundError / ValueError naming the key), and
    :class:`~medsr_dist.storage.LeaseHeldError` when another run holds the output prefix (nothing is touched).

    DICOMweb (``enhance.input`` / ``enhance.output`` ``dicomweb+http(s)://``): the input is a QIDO-RS query
    (``pacs.query``, from the stored watermark with ``since_watermark``), instances are read with WADO-RS and
    derived objects stored with STOW-RS, at most ``pacs.concurrency`` read and write tasks at a time; manifests,
    records, lease and watermark live under ``enhance.manifest``. Raises
    :class:`~medsr_dist.pacs.dicomweb.PacsError` when the PACS cannot be queried (before any Ray work); requests
    that fail later become error rows.
    """
    t_start = time.perf_counter()
    storage = job_storage(cfg, storage)
    e = cfg.enhance
    # every local write of the run (outputs, records, lease) stays under its prefix, links inside it notwithstanding
    storage.confine_writes({"enhance.output": e.output, ("enhance.manifest" if e.manifest else "enhance.output"):
                            e.manifest or e.output})
    model = read_model_file(e.checkpoint, cfg.storage, onnx_uri=e.onnx_model)
    model = model.with_sampling(e.sampling.overrides(), "enhance.sampling")  # ldm: the sampler settings that run
    if e.replicas == "local":  # a bad model or export fails here, not in every replica (serve:<app>: the app holds it)
        build_model_backend(model, choose_backend(e.backend, model, storage, gpu=False).name, storage, device="cpu")
    records = (e.manifest or e.output).rstrip("/")
    mark = (read_watermark(storage, watermark_uri(records))
            if is_dicomweb(e.input) and cfg.pacs.query.since_watermark else None)
    entries = list_inputs(storage, e, watermark=mark)
    if e.volumes.enabled and e.volumes.series_folders and not is_dicomweb(e.input):
        # a DICOM series folder is one volume item
        entries = group_series(entries, e.input.rstrip("/"), e.volumes.series_folders)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    lease = Lease.acquire(storage, Storage.join(records, MANIFEST_DIR, LEASE_FILE), run_id, e.lease_ttl_s)
    lease.keep_alive()
    try:
        return _run_leased(cfg, storage, model, entries, run_id, lease, progress, t_start)
    finally:
        lease.release()


def _run_leased(cfg, storage, model, entries, run_id, lease, progress, t_start) -> EnhanceResult:
    gpu = cluster_has_gpus()
    requested = cfg.enhance.backend
    choice = choose_backend(requested, model, storage, gpu=gpu)
    if choice.reason != "configured":  # from here on the run is keyed and labelled with the chosen backend
        log.info("enhance.backend auto: %s; %s", choice.name, choice.reason)
        cfg = cfg.model_copy(update={"enhance": cfg.enhance.model_copy(update={"backend": choice.name})})
    e = cfg.enhance
    removed = [p for prefix in dict.fromkeys([e.output.rstrip("/"), (e.manifest or e.output).rstrip("/")])
               for p in remove_stale_partials(storage, prefix)]
    if removed:
        log.warning("removed %d temp file(s) left by a killed run%s", len(removed),
                    (": " + ", ".join(removed)) if e.log_keys else "")
    precision = _precision(e, gpu)
    params = enhance_params(e, model, precision=precision)
    spec = JobSpec(storage=storage, input=e.input.rstrip("/"), output=e.output.rstrip("/"), model=model, params=params,
                   run_id=run_id, threshold_db=e.consistency_threshold_db, max_input_pixels=e.max_input_pixels,
                   max_output_pixels=e.max_output_pixels, max_input_bytes=e.max_input_bytes,
                   decode_timeout_s=e.decode_timeout_s, decode_memory_bytes=e.decode_memory_bytes,
                   max_attempts=e.max_attempts, log_keys=e.log_keys,
                   uncertainty_threshold=e.uncertainty_threshold,
                   dicom_compression=str(getattr(e, "dicom_compression", "none") or "none"),
                   manifest=(e.manifest or "").rstrip("/"),
                   volumes=plan_volume_job(cfg, storage, model, entries, precision, requested_backend=requested, gpu=gpu),
                   provenance_source=e.provenance_source)
    target = serve_deployment(e, model, params) if e.replicas != "local" else None  # raises before any item
    plan = plan_run(storage, spec, entries)
    rows: list[dict] = []
    counts: dict[str, int] = {}
    pixels = 0
    t_run = time.perf_counter()

    def finished(row: dict) -> None:
        nonlocal pixels
        rows.append(row)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] == "done":
            pixels += row["input_height"] * row["input_width"] * max(row["frames"], 1)
        if row["status"] in ("error", "quarantined"):
            log.info("%s: %s: %s", item_label(row, e.log_keys), row["status"], row["error"])
        if progress is not None:
            progress(EnhanceProgress(len(entries), dict(counts), pixels, time.perf_counter() - t_run))

    for row in plan.rows:
        finished(row)
    sizing = job_sizing(e, gpu) if plan.todo or plan.alone else None
    lost = _run_pipeline(cfg, spec, model, precision, sizing, plan.todo, finished, alone=False, serve=target)
    retried = len(lost)
    if lost:
        log.warning("%d item(s) lost with a model replica that died; retrying each alone", len(lost))
    lost = _run_pipeline(cfg, spec, model, precision, sizing, lost + plan.alone, finished, alone=True, serve=target)
    for item in lost:
        attempts = int(item["attempts"]) + 1
        quarantined = attempts >= e.max_attempts
        reason = (f"quarantined: killed its model replica in {attempts} runs (enhance.max_attempts "
                  f"{e.max_attempts}); last: {CRASH_REASON}; not tried again until it changes" if quarantined
                  else f"{CRASH_REASON} (run {attempts} of enhance.max_attempts {e.max_attempts}; the next run "
                       f"tries it alone again)")
        finished(manifest_row({
            "input_key": item["key"], "status": "quarantined" if quarantined else "error", "error": reason,
            **row_model(spec, item["key"]), "run_id": run_id, "input_bytes": int(item["size"]),
            "input_version": str(item["version"]), "attempts": attempts, "finished_at": now_iso()}))
    rows.sort(key=lambda r: r["input_key"])

    run_manifest = run_manifest_uri(spec.records, run_id)
    metadata = {"sizing": sizing.record()} if sizing else {}
    if choice.reason != "configured":
        metadata["backend"] = {"name": choice.name, "reason": choice.reason}
    write_manifest(storage, run_manifest, rows, metadata=metadata or None)
    cumulative = manifest_uri(spec.records)
    lease.refresh()  # still ours? (raises LeaseLostError: the cumulative manifest is the new holder's to write)
    write_manifest(storage, cumulative, merge_cumulative(storage, spec.records, rows))
    if is_dicomweb(spec.input):  # the next since_watermark run starts here (held back by this run's errors)
        write_watermark(storage, watermark_uri(spec.records), watermark_of_rows(rows), run_id)
    return EnhanceResult(output=e.output, manifest=cumulative, run_manifest=run_manifest, counts=counts, rows=rows,
                         seconds=time.perf_counter() - t_start, input_pixels=pixels, log_keys=e.log_keys,
                         read_items=len(plan.todo) + len(plan.alone) + retried, sizing=sizing)


def _precision(e: EnhanceConfig, gpu: bool) -> str:
    """The precision the replicas of ``e.backend`` (a chosen one, not ``auto``) run on this cluster's nodes."""
    precision = runnable_precision(e.backend, e.precision, gpu=gpu)
    if precision != e.precision:
        log.warning("enhance.precision %s: %s replicas run %s; outputs record %s", e.precision,
                    "GPU" if gpu else "CPU", precision, precision)
    return precision


def job_sizing(e: EnhanceConfig, gpu: bool) -> ReplicaSizing:
    """The model replicas of this run from ``enhance.min/max_replicas`` and ``cpus_per_replica`` (``auto``: from
    the connected cluster, :func:`~medsr_dist.runtime.size_replicas`); logged, and recorded in the run manifest's
    metadata. ``enhance.replicas: serve:<app>``: the client actors (auto: 1, 0.25 CPU each)."""
    if e.replicas != "local":
        top = 1 if e.max_replicas == "auto" else int(e.max_replicas)
        low = min(top, 1) if e.min_replicas == "auto" else int(e.min_replicas)
        return ReplicaSizing(low, max(low, top), 0.25, 0.0, 1, f"serve client actors of {e.replicas}")
    sizing = size_replicas(cluster_nodes(), cpus_per_replica=e.cpus_per_replica, min_replicas=e.min_replicas,
                           max_replicas=e.max_replicas, section="enhance", free=cluster_free())
    if gpu:  # a replica next to a GPU: 1 CPU, whatever the CPU-only sizing would say
        sizing = ReplicaSizing(sizing.min_replicas, sizing.max_replicas, 1.0, 1.0, sizing.threads, sizing.how)
    log.info("model replicas: %d..%d, %s each, %d intra-op thread(s) (%s)", sizing.min_replicas,
             sizing.max_replicas, "1 GPU" if sizing.gpus else f"{sizing.cpus:g} CPU", sizing.threads, sizing.how)
    return sizing


class ReplicasNotStartedError(RuntimeError):
    """``enhance.min_replicas`` replicas did not start within ``enhance.replica_start_timeout_s``; no item was
    read by that pass."""


def _run_pipeline(cfg, spec: JobSpec, model: ModelFile, precision: str, sizing: ReplicaSizing, items: list[dict],
                  finished: Callable[[dict], None], *, alone: bool, serve: tuple[str, str] | None = None) -> list[dict]:
    """ReadDecode -> EnhanceReplica -> EncodeCommit over ``items``; each finished row goes to ``finished``.
    Returns the items whose rows never came back (their block's replica died). ``alone``: one item per block
    and per replica batch, so that a replica that dies takes no batch-mate with it. ``serve``: (app, deployment)
    of :func:`serve_deployment`: :class:`ServeReplica` instead of the job's own replicas."""
    import ray  # lazy: Ray starts only for a run with work to do

    if not items:
        return []
    e = cfg.enhance
    per_batch = 1 if alone else balanced_batch_size(len(items), e.images_per_batch, sizing.max_replicas)
    ctx = ray.data.DataContext.get_current()
    saved_errored, saved_wait = ctx.max_errored_blocks, ctx.wait_for_min_actors_s
    # A crashed replica loses its block's rows (retried alone, or counted, by the caller), not the whole run. Set
    # before the dataset exists: a Dataset keeps a copy of the context it was created under.
    ctx.max_errored_blocks = -1
    # Ray Data starts actor pools without waiting (its default -1): on CPU-only nodes the decode tasks then take
    # the CPUs a pending replica needs and the pass runs on fewer than min_replicas. Wait before any task runs.
    ctx.wait_for_min_actors_s = e.replica_start_timeout_s or -1
    try:
        return _iterate(cfg, spec, model, precision, sizing, items, finished, per_batch, alone=alone, serve=serve)
    except ray.exceptions.GetTimeoutError as err:
        if "starting actors" not in str(err):  # Ray Data's text for a pool below min_size at its deadline
            raise
        each = ("Serve client actors, 0.25 CPU each" if serve is not None else "1 GPU each" if sizing.gpus
                else f"{sizing.cpus:g} CPU each")
        raise ReplicasNotStartedError(
            f"enhance.min_replicas {sizing.min_replicas} model replica(s) ({each}) did not all start within "
            f"enhance.replica_start_timeout_s {e.replica_start_timeout_s} s (sizing: {sizing.how}): the cluster lacks the resources for "
            "them; lower enhance.min_replicas (or enhance.cpus_per_replica), add nodes, or wait longer") from err
    finally:
        ctx.max_errored_blocks, ctx.wait_for_min_actors_s = saved_errored, saved_wait


def _pacs_bound(cfg, uri: str) -> dict:
    """map_batches arguments bounding a stage that talks to the DICOMweb endpoint ``uri``: at most
    ``pacs.concurrency`` of its tasks at once (each sends one request at a time), so the PACS sees at most that many
    WADO-RS (read stage) or STOW-RS (write stage) requests from this job, however large the cluster."""
    import ray  # lazy: Ray starts only for a run with work to do

    return {"compute": ray.data.TaskPoolStrategy(size=cfg.pacs.concurrency)} if is_dicomweb(uri) else {}


def _iterate(cfg, spec, model, precision, sizing, items, finished, per_batch, *, alone: bool, serve=None) -> list[dict]:
    import ray  # lazy: Ray starts only for a run with work to do

    e = cfg.enhance
    before = cluster_free()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / per_batch), 20_000)))
    ds = ds.map_batches(ReadDecode(spec), batch_size=None, num_cpus=STAGE_TASK_CPUS, **_pacs_bound(cfg, spec.input))
    # A dead replica is restarted (max_restarts) but its task is not retried (max_task_retries=0): Ray Data's
    # default (retry forever) would feed a poison image to fresh replicas without end. Its rows come back lost.
    # Ray 2.60 warns that **ray_remote_args goes in 2.64 ("use the named remote parameters"), but names neither
    # option (map_batches, ActorPoolStrategy, DataContext); ray is pinned, and the poison test fails on an upgrade.
    owner = None
    if serve is not None:  # the app's replicas compute; alone: one item in flight, so none shares a death
        ds = ds.map_batches(ServeReplica, fn_constructor_args=(*serve, e.outscale, e.log_keys), batch_size=per_batch,
                            compute=ray.data.ActorPoolStrategy(min_size=1 if alone else sizing.min_replicas,
                                                               max_size=1 if alone else sizing.max_replicas,
                                                               max_tasks_in_flight_per_actor=1 if alone else None),
                            num_cpus=0.25, max_restarts=-1, max_task_retries=0)
    else:
        owner = start_pass_owner()  # the replicas end with it (pass_owner.py): none outlives this pass
        ds = ds.map_batches(EnhanceReplica, fn_constructor_args=(model, cfg.storage, e, precision, sizing.threads, owner),
                            batch_size=per_batch,
                            # alone: one task in flight per replica too, or an innocent item queued behind a poison one
                            # on the same replica dies with it (Ray Data queues several tasks per actor by default)
                            # (a pass of items alone starts on one replica: a few items, one at a time)
                            compute=ray.data.ActorPoolStrategy(min_size=1 if alone else sizing.min_replicas,
                                                               max_size=sizing.max_replicas,
                                                               max_tasks_in_flight_per_actor=1 if alone else None),
                            num_gpus=sizing.gpus, num_cpus=sizing.cpus,
                            max_restarts=-1, max_task_retries=0)
    ds = ds.map_batches(EncodeCommit(spec), batch_size=1, num_cpus=STAGE_TASK_CPUS, **_pacs_bound(cfg, spec.output))

    seen: set[str] = set()
    try:
        for raw in ds.iter_rows():
            row = manifest_row({k: plain(v) for k, v in raw.items()})
            seen.add(row["input_key"])
            finished(row)
    finally:
        # Ray Data releases its replicas by reference counting; a replica Ray restarted after a crash can outlive
        # the dataset and would hold its CPUs/GPU from the next pass: the pass owner's end ends it.
        del ds
        gc.collect()
        if owner is not None:
            ray.kill(owner)
    lost = [item for item in items if item["key"] not in seen]
    if lost and before is not None:
        _await_released(before)
    return lost


#: Seconds a pass in which a replica died waits for the cluster to get back what it held before the pass
#: started: Ray releases a restarted replica's CPUs/GPU a moment after the pool lets it go, and a retry pass
#: started at once would wait for a replica that cannot be placed beside it.
RELEASE_WAIT_S = 60.0


def _await_released(before: dict[str, float], wait_s: float = RELEASE_WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        now = cluster_free() or before
        if all(now.get(k, 0.0) + 1e-6 >= v for k, v in before.items()):
            return
        if time.monotonic() > deadline:
            log.warning("the replicas of the last pass still hold %s of the cluster's resources after %.0f s; "
                        "the next pass starts on what is free",
                        {k: round(v - now.get(k, 0.0), 2) for k, v in before.items()}, wait_s)
            return
        time.sleep(0.5)

