"""`medsr eval`: score models under an evaluation protocol with Ray Data, and write the report.

One pass over the dataset, three Ray Data stages (plain callables, runnable without Ray too):

1. :class:`ProtocolPairs` (CPU tasks): read and decode each image (a file under a prefix, or a prepared
   dataset's row), make its (ground truth, input) pair with the :class:`~medsr_dist.eval.protocols.Protocol`,
   and the bicubic baseline.
2. :class:`EvalReplica` (actor pool, one GPU each when the cluster has GPUs): every model, through the one
   inference engine (:mod:`medsr_dist.infer.engine`), on every input. A model that fails on an image leaves
   an error for that (image, model) cell and goes on.
3. :class:`ScoreImages` (CPU actors): PSNR/SSIM (basicsr's), LPIPS when its weights are available, the
   consistency score; the comparison figure of the images chosen for figures (written under
   ``<output>/figures/``). Emits one row per (image, model): :data:`~medsr_dist.eval.plan.ROW_FIELDS`.

The driver then summarises the rows (:mod:`medsr_dist.eval.stats`) and writes ``results.{csv,json,md}``
and a self-contained ``report.html`` (:mod:`medsr_dist.eval.html_report`).

Everything that can be checked before Ray starts is checked by :func:`plan_evaluation` (protocol,
dataset, model files, LPIPS weights, figure names), so a typo costs seconds.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import ray

from medsr_dist.config import EvalConfig, MedsrConfig, StorageConfig
from medsr_dist.data.prepare import significant_bits
from medsr_dist.eval.html_report import write_eval_report
from medsr_dist.eval.metrics import bicubic_upscale, haarpsi, niqe, psnr, ssim
from medsr_dist.eval.perceptual import LpipsScorer, LpipsStatus, check_lpips
from medsr_dist.eval.plan import (
    BICUBIC,
    IMAGE_FIELDS,
    ROW_FIELDS,
    EvalInputError,
    EvalModel,
    EvalPlan,
    eval_output,
    list_items,
    protocol_of,
    resolve_models,
)
from medsr_dist.eval.protocols import Protocol, VolumeProtocol
from medsr_dist.eval.report import CropBox, side_by_side
from medsr_dist.eval.results import EvalResult, build_report, figure_key, plain_row, runs_precision
from medsr_dist.eval.volume_eval import check_volume_plan, run_volume_evaluation, volume_lpips_status
from medsr_dist.infer.consistency import consistency_psnr
from medsr_dist.infer.replica import EngineSettings, ModelReplica, NonFiniteOutput
from medsr_dist.io.bounded import decode_image_capped
from medsr_dist.io.image import single_frame_pixels
from medsr_dist.runtime import (STAGE_TASK_CPUS, ReplicaSizing, balanced_batch_size, cluster_has_gpus, cluster_nodes,
                                size_replicas)
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

EMPTY = np.zeros((0, 0, 1), np.float32)  # placeholder pixels of rows that failed


# ------------------------------------------------------------------------------------------------------------
# The plan: everything checked before Ray
# ------------------------------------------------------------------------------------------------------------
def plan_evaluation(cfg: MedsrConfig, storage: Storage | None = None,
                    models: list[EvalModel] | None = None) -> EvalPlan:
    """Check everything that can be checked before Ray starts and say what will be evaluated.

    Args:
        cfg: the config (``cfg.eval`` is the evaluation).
        storage: where everything lives (default: from ``cfg.storage``).
        models: models given in Python instead of ``eval.models`` (e.g. with a ``factory``).

    Raises:
        EvalInputError: missing dataset, model file, or figure image name.
    """
    storage = storage or Storage(cfg.storage)
    e = cfg.eval
    protocol = protocol_of(e)
    models = list(models) if models is not None else resolve_models(cfg, storage)
    if not models and not isinstance(protocol, VolumeProtocol):  # volumes always score their interpolations
        raise EvalInputError("no models to evaluate")
    if len({m.name for m in models}) != len(models):
        raise EvalInputError(f"model names must be unique, got {[m.name for m in models]}")
    dataset, items = list_items(cfg, storage)
    names = [item["name"] for item in items]
    if e.figure_images:
        unknown = [n for n in e.figure_images if n not in set(names)]
        if unknown:
            raise EvalInputError(f"eval.figure_images: no image named {unknown} among the {len(names)} evaluated "
                                 f"(names look like {names[:3]})")
        figures = list(e.figure_images)
    else:
        figures = names[: e.figures]
    if isinstance(protocol, VolumeProtocol):  # volumes (mri-aniso-x*): medsr_dist/eval/volume_eval.py
        plan = EvalPlan(protocol, models, dataset, e.split, items, figures, volume_lpips_status(), eval_output(cfg))
        check_volume_plan(plan)
        return plan
    return EvalPlan(protocol, models, dataset, e.split, items, figures, check_lpips(e.lpips, storage),
                    eval_output(cfg))


# ------------------------------------------------------------------------------------------------------------
# Ray Data stages
# ------------------------------------------------------------------------------------------------------------
def _object_array(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ProtocolPairs:
    """Stage 1 (CPU tasks): ``{"key"[, "image"]}`` rows -> protocol pairs.

    Input rows carry ``key`` (a file on the store) and, for a prepared dataset, ``image`` (lossless PNG
    bytes). Output columns: ``image`` (name), ``key``, ``status`` ("ok"/"error"), ``error``, ``hr``, ``lr``
    (arrays (h, w, C) float32 in [0, 1]; empty on error), ``figure`` (bool).
    """

    def __init__(self, storage: Storage, protocol: Protocol, names: dict[str, str], figures: list[str],
                 lr_keys: dict[str, str] | None = None, decode_memory_bytes: int = 0, decode_timeout_s: float = 0.0):
        """``lr_keys``: ``lr_from: paired``, each ground truth's key -> its low-resolution file's key.
        ``decode_memory_bytes`` / ``decode_timeout_s``: both > 0, each file decodes in a capped child process
        (:func:`~medsr_dist.io.bounded.decode_image_capped`); a stopped decode is an error row."""
        self.storage, self.protocol, self.names, self.figures = storage, protocol, names, set(figures)
        self.lr_keys = lr_keys or {}
        self.decode_memory_bytes, self.decode_timeout_s = decode_memory_bytes, decode_timeout_s

    def _decode(self, data: bytes, key: str):
        return decode_image_capped(data, key, memory_bytes=self.decode_memory_bytes, seconds=self.decode_timeout_s)

    def _pair(self, key: str, data: bytes):
        decoded = self._decode(data, key)
        pixels = single_frame_pixels(decoded, key, "evaluation")
        given = self.protocol.lr_from
        if given == "no_reference":  # the file is the model input, kept as decoded
            return self.protocol.given_pair(pixels, None, ("-", key.rsplit("/", 1)[-1]))
        if given == "paired":
            lr_key = self.lr_keys[key]
            lr = single_frame_pixels(self._decode(self.storage.read_bytes(lr_key), lr_key), lr_key, "evaluation")
            return self.protocol.given_pair(lr, pixels, (key.rsplit("/", 1)[-1], lr_key.rsplit("/", 1)[-1]))
        return self.protocol.make_pair(pixels, source_levels(data, decoded.meta))

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("image", "key", "status", "error", "hr", "lr", "figure")}
        images = batch.get("image")
        for i, key in enumerate(batch["key"]):
            key = str(key)
            name = self.names.get(key, key)
            row = {"image": name, "key": key, "status": "ok", "error": "", "hr": EMPTY, "lr": EMPTY,
                   "figure": name in self.figures}
            try:
                data = bytes(images[i]) if images is not None else self.storage.read_bytes(key)
                pair = self._pair(key, data)
                row.update(hr=pair.hr, lr=pair.lr)
            except Exception as exc:  # noqa: BLE001 - an unreadable image is an error row for every model
                row.update(status="error", error=f"input: {_error_text(exc)}")
            for k, v in row.items():
                out[k].append(v)
        return {k: _object_array(v) if k in ("hr", "lr") else np.asarray(v) for k, v in out.items()}


def source_levels(data: bytes, meta) -> int:
    """The largest stored value of a source image (what its LR is rounded to): ``2**bits - 1`` of a PNG's
    ``sBIT`` chunk (a prepared dataset's 16-bit PNG of a 12-bit DICOM says 12), else the format's (``ImageMeta.maxval``:
    BitsStored for DICOM, the sample type otherwise)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return (1 << significant_bits(data)) - 1
    return int(meta.maxval)


def target_shape(hr: np.ndarray, lr: np.ndarray, scale: int) -> tuple[int, ...]:
    """The shape a model output must have: the ground truth's, or, without one (``lr_from: no_reference``), the
    input's times ``scale``."""
    if hr.size:
        return hr.shape
    return (lr.shape[0] * scale, lr.shape[1] * scale, lr.shape[2])


def _column(i: int, what: str) -> str:
    return f"m{i}_{what}"


class EvalReplica:
    """Stage 2 (actor pool): every network model on every input, each model through one
    :class:`~medsr_dist.infer.replica.ModelReplica` (the tiled engine, per-image retry, finiteness check).

    Adds ``bicubic`` (the OpenCV bicubic upscaling of the input, the figures' bicubic panel) and, per model
    ``i``, columns ``m{i}_sr`` (the output, (H, W, C) float32 in [0, 1], the ground truth's shape; empty for
    failures and bicubic models), ``m{i}_error`` and ``m{i}_seconds``. A failing batch is retried image by image, so
    one bad image fails alone.
    """

    def __init__(self, models: list[EvalModel], protocol: Protocol, e: EvalConfig, storage_cfg: StorageConfig,
                 precision: str | None = None, threads: int | None = None):
        """``threads``: intra-op threads (:func:`eval_sizing`). ``precision``: the one the report records (:func:`~medsr_dist.eval.results.runs_precision`; default ``eval.precision``); a
        replica whose backend would run another refuses to start
        (:class:`~medsr_dist.infer.replica.PrecisionMismatch`). Models built in Python (``factory``) run and are
        labelled with their own backend's precision."""
        self.models, self.protocol = models, protocol
        # tiles per model call: the backend's default (1 on CPU, where a batch of 4 ran ~10 % slower; 8 on a
        # GPU), as the nightly job's; eval.batch_size counts images per Ray Data batch
        settings = EngineSettings.of(e, precision=precision or e.precision, threads=threads, batch_size=None)
        storage = Storage(storage_cfg)
        self.replicas: dict[int, ModelReplica] = {}
        for i, m in enumerate(models):
            if m.factory is not None:
                backend = m.factory()
                own = replace(settings, precision=getattr(backend, "precision", settings.precision))
                self.replicas[i] = ModelReplica(None, backend, own)
            elif m.model_file is not None:
                self.replicas[i] = ModelReplica.load(m.model_file, storage, settings)

    def _outscale(self, i: int) -> float | None:
        return None if self.replicas[i].scale == self.protocol.scale else float(self.protocol.scale)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        ok = [j for j in range(n) if batch["status"][j] == "ok"]
        result = dict(batch)
        bicubic, bicubic_seconds = [EMPTY] * n, [0.0] * n
        for j in ok:
            t0 = time.perf_counter()
            shape = target_shape(batch["hr"][j], batch["lr"][j], self.protocol.scale)
            bicubic[j] = bicubic_upscale(batch["lr"][j], self.protocol.scale).reshape(shape)
            bicubic_seconds[j] = time.perf_counter() - t0
        result["bicubic"] = _object_array(bicubic)
        for i, m in enumerate(self.models):
            outputs, errors, seconds = [EMPTY] * n, [""] * n, [0.0] * n
            if m.is_bicubic:
                seconds = bicubic_seconds  # its output is the bicubic column
            elif ok:
                t0 = time.perf_counter()
                ran = []
                for k, out in self.replicas[i].enhance_each([batch["lr"][j] for j in ok], outscale=self._outscale(i)):
                    j = ok[k]
                    if isinstance(out, NonFiniteOutput):
                        errors[j] = f"output contains {out.count:,} NaN or infinite values"
                        ran.append(j)
                    elif isinstance(out, BaseException):
                        log.warning("model %s failed on an image: %s", m.name, type(out).__name__)
                        errors[j] = f"inference: {_error_text(out)}"
                    else:
                        out = out if out.ndim == 3 else out[:, :, None]
                        shape = target_shape(batch["hr"][j], batch["lr"][j], self.protocol.scale)
                        if out.shape != shape:
                            errors[j] = f"output shape {out.shape} differs from the expected {shape}"
                        else:
                            outputs[j] = out
                        ran.append(j)
                per_image = (time.perf_counter() - t0) / len(ok)
                for j in ran:
                    seconds[j] = per_image
            result[_column(i, "sr")] = _object_array(outputs)
            result[_column(i, "error")] = np.asarray(errors)
            result[_column(i, "seconds")] = np.asarray(seconds, dtype=np.float64)
        return result


class ScoreImages:
    """Stage 3 (CPU actors): per (image, model) scores, and the figures of the chosen images.

    Returns one row per (image, model) with :data:`~medsr_dist.eval.plan.ROW_FIELDS`; ``lpips`` is NaN where LPIPS is unavailable
    (the report writes "unavailable" there), metric cells are NaN for errors. LPIPS failing on one image
    (e.g. too small for AlexNet) leaves that cell NaN with the reason in ``error`` and the row ``ok``.
    """

    def __init__(self, models: list[EvalModel], protocol: Protocol, lpips: LpipsStatus, storage: Storage,
                 output: str, crop_box: tuple[int, int, int, int] | None, zoom: int, max_panel: int | None = None):
        self.models, self.protocol, self.storage, self.output = models, protocol, storage, output
        self.crop_box, self.zoom, self.max_panel = crop_box, zoom, max_panel
        self.lpips = LpipsScorer(lpips, storage) if lpips.available else None

    def _scores(self, sr: np.ndarray, hr: np.ndarray, lr: np.ndarray) -> dict[str, float | str]:
        p = self.protocol
        if not hr.size:  # lr_from: no_reference: what can be said without a ground truth
            scores = {"consistency_psnr_db": consistency_psnr(sr, lr)}
            try:
                scores["niqe"] = niqe(sr, crop_border=p.crop_border, max_value=1.0)
            except Exception as exc:  # noqa: BLE001 - e.g. too small for NIQE's blocks: consistency still counts
                scores["error"] = f"niqe: {_error_text(exc)}"
            return scores
        args = {"crop_border": p.crop_border, "test_y_channel": p.test_y_channel, "max_value": 1.0}
        scores = {"psnr": psnr(sr, hr, **args), "ssim": ssim(sr, hr, **args), "lpips": math.nan, "haarpsi": math.nan,
                  "consistency_psnr_db": consistency_psnr(sr, lr)}
        try:
            scores["haarpsi"] = haarpsi(sr, hr, crop_border=p.crop_border, max_value=1.0)
        except ValueError as exc:  # smaller than its 16-px filters: PSNR/SSIM still count
            scores["error"] = f"haarpsi: {exc}"
        if self.lpips is not None:
            try:
                scores["lpips"] = self.lpips(sr, hr, p.crop_border)
            except Exception as exc:  # noqa: BLE001 - e.g. an image too small for AlexNet: PSNR/SSIM still count
                scores["error"] = "; ".join(filter(None, [scores.get("error", ""), f"lpips: {_error_text(exc)}"]))
        return scores

    def __call__(self, batch: dict) -> dict:
        rows: list[dict] = []
        for j in range(len(batch["key"])):
            image, key = str(batch["image"][j]), str(batch["key"][j])
            figure = figure_key(image) if bool(batch["figure"][j]) and batch["status"][j] == "ok" else ""
            outputs: dict[int, np.ndarray] = {}
            for i, m in enumerate(self.models):
                row = {"image": image, "key": key, "model": m.name, "model_index": i, "status": "ok", "error": "",
                       "psnr": math.nan, "ssim": math.nan, "lpips": math.nan, "consistency_psnr_db": math.nan,
                       "haarpsi": math.nan, "niqe": math.nan, "seconds": 0.0, "figure": figure}
                if batch["status"][j] != "ok":
                    row.update(status="error", error=str(batch["error"][j]))
                elif str(batch[_column(i, "error")][j]):
                    row.update(status="error", error=str(batch[_column(i, "error")][j]))
                else:
                    sr = batch["bicubic"][j] if m.is_bicubic else batch[_column(i, "sr")][j]
                    row["seconds"] = float(batch[_column(i, "seconds")][j])
                    try:
                        row.update(self._scores(sr, batch["hr"][j], batch["lr"][j]))
                        outputs[i] = sr
                    except Exception as exc:  # noqa: BLE001
                        row.update(status="error", error=f"metrics: {_error_text(exc)}")
                rows.append(row)
            if figure:
                try:
                    self.storage.write_bytes(self.storage.join(self.output, figure), self._figure(batch, j, outputs))
                except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is not a failed evaluation
                    log.warning("figure of %s failed: %s", image, exc)
                    for row in rows[-len(self.models):]:
                        row["figure"] = ""
        return {k: np.asarray([r[k] for r in rows]) for k in (*ROW_FIELDS, *IMAGE_FIELDS)}

    def _figure(self, batch: dict, j: int, outputs: dict[int, np.ndarray]) -> bytes:
        """LR | bicubic | models... | ground truth, with the region where the models disagree most magnified."""
        hr, lr = batch["hr"][j], batch["lr"][j]
        blank = np.zeros(target_shape(hr, lr, self.protocol.scale), np.float32)
        bicubic_index = next((i for i, m in enumerate(self.models) if m.is_bicubic), None)
        panels = [(f"LR x1/{self.protocol.scale}", lr),
                  (self.models[bicubic_index].name if bicubic_index is not None else BICUBIC, batch["bicubic"][j])]
        compare = [1]
        for i, m in enumerate(self.models):
            if i == bicubic_index:
                continue
            if i in outputs:
                compare.append(len(panels))
                panels.append((m.name, outputs[i]))
            else:
                panels.append((f"{m.name}: error", blank))
        if hr.size:
            panels.append(("ground truth", hr))
        box = None
        if self.crop_box is not None:
            y, x, h, w = self.crop_box
            height, width = blank.shape[:2]
            y, x = min(max(y, 0), height - 1), min(max(x, 0), width - 1)
            box = CropBox(y, x, max(1, min(h, height - y)), max(1, min(w, width - x)))
        return side_by_side(panels, crop_box=box, compare=compare if len(compare) >= 2 else None, zoom=self.zoom,
                            max_panel=self.max_panel)


# ------------------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------------------
class ReadShards:
    """Stage 0 for a prepared dataset (CPU tasks): ``{"shard"}`` rows -> ``{"key", "image"}`` rows of the
    wanted images in that Parquet shard (only those two columns are read)."""

    def __init__(self, storage: Storage, keys: frozenset[str]):
        self.storage, self.keys = storage, keys

    def __call__(self, batch: dict) -> dict:
        keys, images = [], []
        for shard in batch["shard"]:
            with self.storage.open(str(shard)) as handle:
                for row in pq.read_table(handle, columns=["key", "image"]).to_pylist():
                    if row["key"] in self.keys:
                        keys.append(row["key"])
                        images.append(row["image"])
        return {"key": np.asarray(keys, dtype=object), "image": _object_array(images)}


def eval_sizing(e: EvalConfig, gpu: int, *, reserve: float) -> ReplicaSizing:
    """Evaluation's model replicas: ``eval.replicas`` x ``eval.cpus_per_replica`` (``auto``: from the connected
    cluster, as :func:`~medsr_dist.runtime.size_replicas`, keeping ``reserve`` CPUs per node for the other stages);
    logged, and recorded in the report."""
    sizing = size_replicas(cluster_nodes(), cpus_per_replica=e.cpus_per_replica, min_replicas=1,
                           max_replicas=e.replicas, section="eval", reserve=reserve)
    log.info("eval model replicas: up to %d, %s each, %d intra-op thread(s) (%s)", sizing.max_replicas,
             "1 GPU" if gpu else f"{sizing.cpus:g} CPU", sizing.threads, sizing.how)
    return sizing


def _dataset_of(plan: EvalPlan, storage: Storage):
    """The input rows: ``{"key"}`` per image file, or ``{"key", "image"}`` read from a prepared split's shards.

    The shards are read by our own task rather than ``ray.data.read_parquet``, whose file-listing task
    wants a whole CPU that the pre-started actor pools may already hold on a small machine.
    """
    if plan.split:
        shards = sorted({item["shard"] for item in plan.items})
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        return ds.map_batches(ReadShards(storage, frozenset(item["key"] for item in plan.items)), batch_size=1,
                              num_cpus=STAGE_TASK_CPUS)
    keys = [item["key"] for item in plan.items]
    return ray.data.from_items([{"key": k} for k in keys], override_num_blocks=min(len(keys), 200))


def run_evaluation(cfg: MedsrConfig, storage: Storage | None = None, *, plan: EvalPlan | None = None) -> EvalResult:
    """Evaluate ``plan`` (default: :func:`plan_evaluation` of ``cfg``) and write the report (Ray must be running)."""
    storage = storage or Storage(cfg.storage)
    plan = plan or plan_evaluation(cfg, storage)
    if isinstance(plan.protocol, VolumeProtocol):
        return run_volume_evaluation(cfg, storage, plan)
    e = cfg.eval
    t0 = time.perf_counter()
    gpu = 1 if cluster_has_gpus() else 0
    names = {item["key"]: item["name"] for item in plan.items}
    ds = _dataset_of(plan, storage)
    # an instance (not the class) runs as tasks: no idle actor holds a CPU the other stages need
    lr_keys = {item["key"]: item["lr_key"] for item in plan.items if "lr_key" in item}
    pairs = ProtocolPairs(storage, plan.protocol, names, plan.figures, lr_keys, e.decode_memory_bytes,
                          e.decode_timeout_s)
    # kept beside the replicas: a pair-making task, the score actors and, for a prepared split, a shard-reading
    # task (without its share a replica and the score actors hold every CPU and the shards are never read)
    sizing = eval_sizing(e, gpu, reserve=STAGE_TASK_CPUS * (1 + e.score_workers + (1 if plan.split else 0)))
    per_batch = balanced_batch_size(len(plan.items), e.batch_size, sizing.max_replicas)
    ds = ds.map_batches(pairs, batch_size=per_batch, num_cpus=STAGE_TASK_CPUS)
    precision = runs_precision(plan, e, gpu)
    ds = ds.map_batches(EvalReplica, fn_constructor_args=(plan.models, plan.protocol, e, cfg.storage, precision,
                                                          sizing.threads),
                        # every replica starts at once (loading the models in parallel), not one after another as
                        # the pool grows; min_size 1: a cluster with room for fewer runs on those
                        batch_size=per_batch, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sizing.max_replicas,
                                                                                 initial_size=sizing.max_replicas),
                        num_gpus=gpu, num_cpus=0 if gpu else sizing.cpus)
    ds = ds.map_batches(ScoreImages, fn_constructor_args=(plan.models, plan.protocol, plan.lpips, storage, plan.output,
                                                          e.crop_box, e.zoom, e.figure_panel),
                        batch_size=per_batch, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=e.score_workers),
                        num_cpus=STAGE_TASK_CPUS)
    order = {item["name"]: k for k, item in enumerate(plan.items)}
    rows = sorted((plain_row(r) for r in ds.take_all()), key=lambda r: (order.get(r["image"], len(order)), r["model_index"]))
    report = build_report(cfg, plan, rows, seconds=time.perf_counter() - t0, precision=precision)
    report["sizing"] = sizing.record()
    figures = {}
    for key in sorted({r["figure"] for r in rows if r["figure"]}):
        figures[key] = storage.read_bytes(storage.join(plan.output, key))
    files = write_eval_report(report, figures, lambda key, data: storage.write_bytes(storage.join(plan.output, key), data))
    return EvalResult(plan.output, report, rows, {k: storage.join(plan.output, k) for k in files})


