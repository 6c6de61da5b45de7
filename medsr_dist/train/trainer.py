"""Driver side of `medsr train`: build the degraded stream, run Ray Train, export the model.

Everything distributed is declared here and nowhere else: the Ray Data stream (read -> epochs ->
degradation actor pool), the TorchTrainer with its ScalingConfig/RunConfig/FailureConfig, and the
export of the final EMA generator. The loop itself is in :mod:`medsr_dist.train.loop`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist.config import MedsrConfig, check_through_plane_model
from medsr_dist.data.bicubic import BicubicDegradation
from medsr_dist.data.degrade import PairedCrop, SecondOrderDegradation
from medsr_dist.data.ldm_pairs import AugmentedBicubicPairs
from medsr_dist.models.registry import load_family
from medsr_dist.runtime import (
    ClusterTooSmallError,
    check_training_fits,
    cluster_has_gpus,
    cluster_nodes,
    configure_data_context,
)
from medsr_dist.storage import Storage
from medsr_dist.train.guard import COLLAPSE_FILE, TrainingCollapsed
from medsr_dist.train.loop import META_FILE, MODEL_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


#: epochs one training stream may union: Ray Data 2.60 overflows Python's recursion limit on its dataset stats
#: after about 200 (seen at 401: "maximum recursion depth exceeded" in DatasetStats.to_summary)
MAX_EPOCHS = 128


@dataclass
class TrainResult:
    iterations: int
    metrics: dict
    checkpoint: str  # URI of the last Ray Train checkpoint folder
    export: str  # URI of the exported model.pth (params + params_ema)
    export_sha256: str


def _tag_epoch(epoch: int):
    def tag(table: pa.Table) -> pa.Table:
        return table.append_column("epoch", pa.array([epoch] * table.num_rows, pa.int64()))
    return tag


#: Ray Train's record of the checkpoints it registered, in the run folder (ray.train.v2's
#: CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_iteration(storage: Storage, cfg: MedsrConfig) -> int:
    """Iteration of the checkpoint a new ``fit()`` of this run restores (0 when there is none).

    That is the latest checkpoint Ray Train *registered* (its snapshot file), not the newest folder on the store: a
    run killed after a checkpoint's upload but before every rank's report of it leaves a folder that Ray Train never
    restores, and a training stream sized from that folder's iteration ends short of ``train.iterations``. Without a
    snapshot (older runs), the newest folder's ``meta.json``."""
    run_dir = storage.join(cfg.train.output, cfg.run.name)
    best = 0
    if not storage.exists(run_dir):
        return 0
    snapshot_uri = storage.join(run_dir, CHECKPOINT_SNAPSHOT_FILE)
    if storage.exists(snapshot_uri):
        try:
            latest = json.loads(storage.read_bytes(snapshot_uri)).get("latest_checkpoint_result")
            return int(latest["metrics"]["iteration"]) if latest else 0
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{snapshot_uri}: not a Ray Train checkpoint snapshot with an iteration ({exc})") from None
    for uri in storage.list_files(run_dir, include=[f"*/{META_FILE}"]):
        try:
            best = max(best, int(json.loads(storage.read_bytes(uri))["iteration"]))
        except (ValueError, KeyError):
            continue
    return best


def stream_epochs(cfg: MedsrConfig, n_images: int, start_iteration: int = 0) -> tuple[int, int]:
    """(first epoch, number of epochs) of the training stream for the iterations left, ``n_images`` training rows.

    Raises:
        ValueError: more than :data:`MAX_EPOCHS` epochs; the message says how to get more rows (the small-archive
            preset ``configs/finetune_x4plus_psnr.yaml`` among them).
    """
    global_batch = cfg.train.batch_size * cfg.train.num_workers
    remaining = max(cfg.train.iterations - start_iteration, 0) * global_batch
    first_epoch = start_iteration * global_batch // n_images
    # one epoch of margin: drop_last and the equal split across workers can leave rows unused
    n_epochs = math.ceil(remaining / n_images) + 1
    if n_epochs > MAX_EPOCHS:
        raise ValueError(
            f"train.iterations: {remaining} more samples ({cfg.train.iterations - start_iteration} iterations x "
            f"train.batch_size {cfg.train.batch_size} x train.num_workers {cfg.train.num_workers}) are {n_epochs} epochs "
            f"of the {n_images} prepared training images; the stream holds at most {MAX_EPOCHS} (Ray Data fails on a "
            f"union of a few hundred epochs). Prepare more training rows (prepare.subimages, prepare.multiscale) or "
            f"train fewer iterations; for a small real archive, configs/finetune_x4plus_psnr.yaml (then "
            f"configs/finetune_x4plus_gan.yaml) prepares 128-px sub-images and fine-tunes RealESRGAN_x4plus for a few "
            f"hundred images"
        )
    return first_epoch, n_epochs


def build_train_stream(cfg: MedsrConfig, storage: Storage, start_iteration: int = 0):
    """The degraded training stream: enough epochs of the prepared train split for the remaining iterations.

    Paired datasets (a ``lq_image`` column, from ``prepare.paired_lq``) are cropped instead of degraded.
    Each epoch's rows get an ``epoch`` column (so degradation seeds differ per epoch and resume where a
    restarted run left off); the degradation runs in an actor pool of ``degradation.num_actors`` CPU actors.
    """
    import ray

    pafs, path = storage.pyarrow_fs(storage.join(cfg.train.dataset, "train"))
    paired = "lq_image" in pq.ParquetDataset(path, filesystem=pafs).schema.names
    columns = ["key", "image", "lq_image"] if paired else ["key", "image"]
    # materialised once (the encoded images sit in the object store); every epoch re-reads it from there
    base = ray.data.read_parquet(path, filesystem=pafs, columns=columns)
    # in file order (not the order the read tasks finish in): the epochs' seeded block shuffles start from it
    base.context.execution_options.preserve_order = cfg.train.reproducible_order
    base = base.materialize()
    n_images = base.count()
    if n_images == 0:
        raise ValueError(f"train.dataset: {cfg.train.dataset}/train holds no images")
    first_epoch, n_epochs = stream_epochs(cfg, n_images, start_iteration)
    epochs = [base.randomize_block_order(seed=cfg.run.seed + e).map_batches(_tag_epoch(e), batch_format="pyarrow")
              for e in range(first_epoch, first_epoch + n_epochs)]
    stream = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    d = cfg.degradation
    stage, columns = pair_stage(cfg, paired)
    return stream.map_batches(
        stage,
        fn_constructor_args=(d, cfg.model.scale, cfg.run.seed),
        batch_size=16,  # rows per call: smaller batches cost 20-30 % of an actor's throughput in Ray Data overhead
        compute=ray.data.ActorPoolStrategy(size=d.num_actors),
        num_cpus=d.cpus_per_actor,
    ).select_columns(columns)


class TrainStream:
    """``datasets["train"]`` of a run: the stream for its first worker group, then a fresh one at each restart.

    Ray Train calls it at every worker-group start in its controller, including when FailureConfig restarts the
    group after a lost worker or node: the new stream starts at the epoch of the checkpoint the group restores
    (:func:`latest_iteration`), as a restarted job's does, instead of replaying the first epochs; blocks lost with a
    node are read again from the store."""

    def __init__(self, cfg: MedsrConfig, storage: Storage, first):
        self.cfg, self.storage, self.first = cfg, storage, first

    def __call__(self):
        first, self.first = self.first, None
        if first is not None:
            return first
        from ray.data import DataContext

        configure_data_context(self.cfg, DataContext.get_current())  # the controller's own context
        start = latest_iteration(self.storage, self.cfg)
        log.info("train: worker group restarted; stream from iteration %d", start)
        return build_train_stream(self.cfg, self.storage, start)


def pair_stage(cfg: MedsrConfig, paired: bool) -> tuple[type, list[str]]:
    """The Ray Data stage making training pairs for this run, and the columns it yields.

    Paired datasets are cropped; otherwise the family's ``model.degradation`` decides: Real-ESRGAN's second-order
    pipeline (``lq``, ``gt``, ``gt_usm``) or classic bicubic BI pairs (``lq``, ``gt``).
    """
    if paired:
        return PairedCrop, ["lq", "gt", "gt_usm"]
    if cfg.model.degradation == "bicubic":
        return BicubicDegradation, ["lq", "gt"]
    if cfg.model.degradation == "bicubic_augmented":  # latent diffusion families (vae, ldm)
        return AugmentedBicubicPairs, ["lq", "gt"]
    return SecondOrderDegradation, ["lq", "gt", "gt_usm"]


def validation_pairs(cfg: MedsrConfig, storage: Storage, limit: int = 8) -> list[dict]:
    """Fixed validation pairs from the val split: the run's training pair stage (:func:`pair_stage`) with epoch -1
    seeds, so the same pairs every time. Arrays (3, h, w) float32 in [0, 1]; empty when there is no val split."""
    val_uri = storage.join(cfg.train.dataset, "val")
    if not storage.exists(val_uri):
        return []
    pairs = []
    for uri in storage.list_files(val_uri, include=["*.parquet"]):
        with storage.open(uri) as f:
            table = pq.read_table(f)
        paired = "lq_image" in table.column_names
        stage = pair_stage(cfg, paired)[0](cfg.degradation, cfg.model.scale, cfg.run.seed)
        if paired:
            make = lambda row: stage.crop_one(row["image"], row["lq_image"], row["key"], -1)  # noqa: E731
        else:
            make = lambda row: stage.degrade_one(row["image"], row["key"], -1)  # noqa: E731
        for row in table.select([c for c in ("key", "image", "lq_image") if c in table.column_names]).to_pylist():
            out = make(row)
            pairs.append({"lq": out["lq"].transpose(2, 0, 1).copy(), "gt": out["gt"].transpose(2, 0, 1).copy()})
            if len(pairs) >= limit:
                return pairs
    return pairs


def run_training(cfg: MedsrConfig, storage: Storage | None = None) -> TrainResult:
    """Train (or resume) ``cfg.run.name`` and export the EMA generator. Ray must be initialised.

    Raises ConfigError (before any Ray work) when ``train.dataset`` holds MRI slice pairs (its summary.json has
    an ``mri`` section) and ``model`` cannot be a through-plane refiner (RRDBNet x1)."""
    storage = storage or Storage(cfg.storage)
    t = cfg.train
    summary = storage.join(t.dataset, "summary.json") if t.dataset else None  # mri prepare records mri: there
    if summary and storage.exists(summary) and "mri" in json.loads(storage.read_bytes(summary)):
        check_through_plane_model(cfg)
    start = latest_iteration(storage, cfg)
    if start >= t.iterations:
        log.info("train: run %s already reached iteration %d", cfg.run.name, start)
    else:
        log.info("train: %s from iteration %d to %d", cfg.run.name, start, t.iterations)
    check_resources(cfg)
    # built here first, so a bad dataset fails before any worker starts; rebuilt at each worker-group restart
    datasets = {"train": TrainStream(cfg, storage, build_train_stream(cfg, storage, start))}

    collapse_uri = storage.join(t.output, cfg.run.name, COLLAPSE_FILE)
    if storage.exists(collapse_uri):  # an earlier attempt collapsed; this one (new settings) is watched afresh
        storage.delete(collapse_uri)
    trainer = make_trainer(cfg, storage, datasets, validation_pairs(cfg, storage))
    result = trainer.fit()
    if storage.exists(collapse_uri):
        raise TrainingCollapsed(json.loads(storage.read_bytes(collapse_uri))["message"])
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} finished without a checkpoint")
    export, digest = export_checkpoint(result.checkpoint, cfg, storage)
    metrics = dict(result.metrics or {})
    return TrainResult(iterations=int(metrics.get("iteration", start)), metrics=metrics,
                       checkpoint=result.checkpoint.path, export=export, export_sha256=digest)


def check_resources(cfg: MedsrConfig) -> None:
    """Trainers + degradation actors + a Ray Data task against the connected cluster, before anything starts
    (:func:`~medsr_dist.runtime.check_training_fits`). On a cluster this run joined (``ray.address``), which an
    autoscaler may grow, a shortfall is a warning naming the keys; on the local instance it is the error.

    Raises:
        ClusterTooSmallError: the local instance cannot hold the run (the message names the keys and numbers).
    """
    t, d = cfg.train, cfg.degradation
    use_gpu = t.use_gpu if t.use_gpu is not None else cluster_has_gpus()
    try:
        check_training_fits(cluster_nodes(), num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker,
                            use_gpu=use_gpu, num_actors=d.num_actors, cpus_per_actor=d.cpus_per_actor)
    except ClusterTooSmallError as exc:
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            raise
        log.warning("%s (the cluster's current size; the run waits until an autoscaler adds the nodes)", exc)


def make_trainer(cfg: MedsrConfig, storage: Storage, datasets: dict, val_pairs: list[dict] | None = None):
    """The TorchTrainer for ``cfg``: ``datasets["train"]`` yields ``lq``/``gt``/``gt_usm`` rows (any Ray Dataset, or a
    function returning one, called at every worker-group start: :class:`TrainStream`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = worker_config(cfg)
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else cluster_has_gpus()
    pafs, out_path = storage.pyarrow_fs(t.output)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "val_pairs": ray.put(val_pairs or [])},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=out_path, storage_filesystem=pafs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_checkpoints_kept),
        ),
        datasets=datasets,
        dataset_config=ingest_config(cfg),
    )


def ingest_config(cfg: MedsrConfig):
    """How Ray Train splits the stream across workers: its default ingest options, with Ray Data's
    ``preserve_order`` from ``train.reproducible_order``. Samples and their degradations are already seeded per
    (run seed, key, epoch); what else varies between runs is which worker gets which block, in which order (the
    split hands blocks out as they finish). In order, the split is a function of the data alone.

    The options are the driver's ``DataContext`` execution options, as Ray Train's default takes them (a copy:
    ``DataConfig.default_ingest_options()`` itself passes the deprecated ``exclude_resources`` and warns)."""
    import ray.train
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = cfg.train.reproducible_order
    return ray.train.DataConfig(execution_options=options)


def worker_config(cfg: MedsrConfig) -> MedsrConfig:
    """``cfg`` as the workers must see it: relative local weight paths (``model.pretrained_g/_d``) made absolute,
    since Ray workers do not run in the driver's working directory. Zoo names and store URIs are kept."""
    cfg = cfg.model_copy(deep=True)
    for key in ("pretrained_g", "pretrained_d"):
        value = getattr(cfg.model, key, None)
        if value and "://" not in value and os.path.exists(value):
            setattr(cfg.model, key, os.path.abspath(value))
    return cfg


def export_checkpoint(checkpoint, cfg: MedsrConfig, storage: Storage) -> tuple[str, str]:
    """Copy the checkpoint's ``model.pth`` (+ meta with its sha256) to ``<train.output>/export/``."""
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, MODEL_FILE), "rb") as f:
            data = f.read()
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
    digest = hashlib.sha256(data).hexdigest()
    # what only the trained weights know (the vae family: its latent scale factor), recorded in the export's meta
    meta.update(load_family(meta["family"]).meta_from_weights(data))
    meta["sha256"] = digest
    meta["name"] = f"{cfg.run.name}@{meta['iteration']}"
    export = storage.join(cfg.train.output, "export", MODEL_FILE)
    storage.write_bytes(export, data)
    storage.write_bytes(storage.join(cfg.train.output, "export", META_FILE), json.dumps(meta, indent=2).encode())
    return export, digest
