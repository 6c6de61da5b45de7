"""`medsr enhance`: an archive prefix -> enhanced images in the input's own form, with a manifest.

Ray Data stages; the model replicas never wait on decoding or encoding:

1. :class:`ReadDecode` (CPU tasks): read bytes, content hash, output key; skip what is already done; decode.
2. :class:`EnhanceReplica` (actor pool of ``min_replicas..max_replicas``; one GPU each when the cluster has GPUs,
   ``cpus_per_replica`` CPUs otherwise): the tiled inference engine with the configured backend. Tiles of the
   images in one batch share model calls; each image leaves the actor as soon as its last tile is blended,
   quantised to its stored sample type (lossless w.r.t. what is written, and 2-4x smaller than float32).
3. :class:`EncodeCommit` (CPU tasks): encode in the input's form with provenance, write the output, score its
   consistency, then write the item's record (only after the output is complete).

Exactly once. An output is keyed by (input content hash, model hash, parameters): its name carries
``output_id(...)``. The item record ``<output>/_manifest/items/<item id>.json`` (item id: relative input key + output
id) exists only for complete outputs, and a rerun skips inputs that have one (and whose output is still there).
Writes are atomic (local: temp file +
rename; S3: an object appears only when its upload completes), so a run killed at any moment leaves complete outputs
or none; started again it redoes only what has no record, writing the same bytes under the same key. Leftover local
temp files of a killed run are removed when the next run starts (one run per output prefix at a time).

Manifests (Parquet, :data:`MANIFEST_SCHEMA`): ``_manifest/runs/<run id>.parquet`` has one row per input of that
run (done / skipped / error with its reason); ``_manifest/manifest.parquet`` has one row per output ever completed
(the previous table + this run's outputs + records of a killed run that this run did not list again).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist import __version__
from medsr_dist.config import EnhanceConfig, MedsrConfig, StorageConfig
from medsr_dist.infer.engine import ENGINE_REVISION
from medsr_dist.infer.model_file import ModelFile, build_model_backend, read_model_file, runnable_precision
from medsr_dist.storage import PARTIAL_SUFFIX, Storage

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
CUMULATIVE_FILE = "manifest.parquet"
NOTE = "Enhanced by a super-resolution model: an enhancement, not a new acquisition. Compare with the original."
STATUSES = ("done", "skipped", "error")

# Placeholders for rows without pixels (skipped, failed): every row of a column has the same dtype and rank,
# so Ray Data can hold the column as one variable-shaped tensor array.
NO_PIXELS = np.zeros((0, 0, 1), np.float32)
NO_OUTPUT = np.zeros((0, 0, 1), np.uint16)

MANIFEST_SCHEMA = pa.schema([
    ("input_key", pa.string()), ("input_sha256", pa.string()), ("output_key", pa.string()), ("item_id", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("model_name", pa.string()), ("model_sha256", pa.string()), ("params", pa.string()), ("provenance", pa.string()),
    ("input_format", pa.string()), ("bits_stored", pa.int32()), ("channels", pa.int32()),
    ("input_bytes", pa.int64()), ("output_bytes", pa.int64()),
    ("input_height", pa.int64()), ("input_width", pa.int64()), ("output_height", pa.int64()), ("output_width", pa.int64()),
    ("seconds", pa.float64()), ("consistency_psnr_db", pa.float64()), ("flagged", pa.bool_()),
    ("run_id", pa.string()), ("finished_at", pa.string()),
])
"""One manifest row. ``params``/``provenance`` are JSON objects; ``provenance`` is exactly the text written into the
output file (PNG/TIFF/JPEG text, DICOM derivation). ``run_id``/``finished_at``: the run that produced the output
(for ``skipped`` rows an earlier one). ``seconds``: wall time spent on the item in the run that produced it.
``consistency_psnr_db``: see :func:`consistency_psnr`; ``flagged``: below ``enhance.consistency_threshold_db``."""


# ----------------------------------------------------------------------------------------------------------
# Identity of an output
# ----------------------------------------------------------------------------------------------------------
def enhance_params(e: EnhanceConfig, model: ModelFile, *, precision: str | None = None) -> dict:
    """The parameters that determine an output's pixels (part of its identity and provenance), with the
    engine's revision (:data:`~medsr_dist.infer.engine.ENGINE_REVISION`): a run of a newer engine does not take an
    older engine's outputs for its own.

    ``precision`` is the one the replicas will run (:func:`~medsr_dist.infer.model_file.runnable_precision`: a
    CPU asked for fp16 runs fp32, and says so); ``None`` takes ``enhance.precision`` as written.
    """
    return {"scale": model.scale, "outscale": e.outscale or model.scale, "tile": e.tile, "tile_overlap": e.tile_overlap,
            "tile_blend": e.tile_blend, "backend": e.backend, "precision": precision or e.precision,
            "engine": ENGINE_REVISION}


def output_id(input_sha256: str, model_sha256: str, params: dict) -> str:
    """16 hex digits identifying the output of (input content, model, parameters)."""
    return hashlib.sha256(f"{input_sha256}|{model_sha256}|{json.dumps(params, sort_keys=True)}".encode()).hexdigest()[:16]


def item_id(rel_key: str, oid: str) -> str:
    """20 hex digits identifying one input file's output: the same content under two names gets two outputs."""
    return hashlib.sha256(f"{rel_key}|{oid}".encode()).hexdigest()[:20]


def output_key_for(output_prefix: str, rel_key: str, oid: str, ext: str) -> str:
    """``<output>/<rel dir>/<stem>.sr-<oid[:10]><ext>``: beside its siblings, unique per (input, model, params)."""
    directory, name = posixpath.split(rel_key)
    stem = posixpath.splitext(name)[0] or "image"
    return Storage.join(output_prefix, directory, f"{stem}.sr-{oid[:10]}{ext}")


def item_record_uri(output_prefix: str, iid: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, "items", f"{iid}.json")


def consistency_psnr(output: np.ndarray, source: np.ndarray) -> float:
    """Our safeguard against invented detail: PSNR (dB) between the output area-downsampled back to the
    input grid and the input. High: the enhancement agrees with what was measured; low: it changed it.

    Args:
        output: (H', W'[, C]) float in [0, 1].
        source: (H, W[, C]) float in [0, 1], same channels.

    Returns:
        PSNR in dB with peak 1.0 (the same number as basicsr's ``calculate_psnr``; ``inf`` for identical
        images). Computed here rather than through :mod:`medsr_dist.eval.metrics`, whose basicsr import would cost
        every encode worker seconds of start-up.
    """
    import cv2

    h, w = source.shape[:2]
    down = cv2.resize(np.asarray(output, np.float32), (w, h), interpolation=cv2.INTER_AREA)
    if down.ndim == 2:
        down = down[:, :, None]
    diff = down.astype(np.float64) - np.asarray(source, np.float64).reshape(down.shape)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _now() -> str:
    """UTC, ISO 8601 with milliseconds (items finish several per second)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _columns(rows: list[dict]) -> dict:
    """Rows (dicts with the same keys) -> a Ray Data numpy batch."""
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if k in ("pixels", "output", "header"):
            out[k] = _object_array(values)
        else:
            out[k] = np.asarray(values)
    return out


def _rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """What the CPU stages need to know; pickled into every task (the Storage ships only its config)."""

    storage: Storage
    input: str
    output: str
    model: ModelFile
    params: dict
    run_id: str
    threshold_db: float

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)


def _rel_key(spec: JobSpec, key: str) -> str:
    rel = key[len(spec.input):].lstrip("/") if key.startswith(spec.input) else ""
    return rel or posixpath.basename(key)


class ReadDecode:
    """Stage 1 (CPU tasks): ``{"key"}`` -> one row per key: pixels to enhance (``todo``), or ``skipped``/``error``.

    Output columns: key, item_id, input_sha256, input_bytes, input_format, output_key, status, error, record
    (the existing item record, JSON, for ``skipped``), pixels ((H, W, C) float32 in [0, 1]), meta
    (``ImageMeta`` JSON), header (DICOM header bytes or b""), seconds.
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        return _columns([self.one(str(key)) for key in batch["key"]])

    def one(self, key: str) -> dict:
        from medsr_dist.io.image import decode_image, detect_format, output_extension

        spec = self.spec
        row = {"key": key, "item_id": "", "input_sha256": "", "input_bytes": 0, "input_format": "", "output_key": "",
               "status": "todo", "error": "", "record": "", "pixels": NO_PIXELS, "meta": "", "header": b"",
               "seconds": 0.0}
        t0 = time.perf_counter()
        try:
            data = spec.storage.read_bytes(key)
            row["input_sha256"], row["input_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
            fmt = detect_format(data) if data else None
            row["input_format"] = fmt or ""
            if fmt is not None:
                rel = _rel_key(spec, key)
                oid = output_id(row["input_sha256"], spec.model.sha256, spec.params)
                row["item_id"] = item_id(rel, oid)
                row["output_key"] = output_key_for(spec.output, rel, oid, output_extension(fmt))
                record_uri = item_record_uri(spec.output, row["item_id"])
                # done = a record and its output (an output deleted since is made again)
                if spec.storage.exists(record_uri) and spec.storage.exists(row["output_key"]):
                    row.update(status="skipped", record=spec.storage.read_bytes(record_uri).decode())
            if row["status"] == "todo":
                img = decode_image(data, key)  # raises ImageDecodeError naming the reason (also for fmt None)
                row.update(pixels=img.pixels, meta=img.meta.to_json(), header=img.header or b"")
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the file
            row.update(status="error", error=_reason(exc), pixels=NO_PIXELS)
        row["seconds"] = time.perf_counter() - t0
        return row


def _reason(exc: BaseException) -> str:
    from medsr_dist.io.image import ImageDecodeError

    if isinstance(exc, ImageDecodeError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def stored_maxval(meta_json: str) -> int:
    """The stored value meaning 1.0 for an image of this ``ImageMeta`` (255, 65535 or DICOM 2**BitsStored - 1)."""
    from medsr_dist.io.image import ImageMeta

    return ImageMeta.from_json(meta_json).maxval


def quantize(image: np.ndarray, maxval: int, *, in_place: bool = False) -> np.ndarray:
    """(H, W[, C]) float in [0, 1] -> (H, W, C) uint16 ``rint(p * maxval)``: exactly the values ``encode_image``
    writes for ``p``, and ``q / maxval`` encodes to ``q`` again (float32 error << 0.5 for maxval <= 65535).

    ``in_place=True`` reuses a writable float32 ``image`` as scratch (it is overwritten), saving a full-size float
    copy: 256 MB for a 2048 x 2048 input at x4."""
    if image.ndim == 2:
        image = image[:, :, None]
    if in_place and image.dtype == np.float32 and image.flags.writeable:
        q = np.clip(image, 0.0, 1.0, out=image)
        q *= np.float32(maxval)
    else:
        q = np.clip(image, 0.0, 1.0) * np.float32(maxval)
    return np.rint(q, out=q).astype(np.uint16)


class EnhanceReplica:
    """Stage 2 (actor pool): one model replica running the tiled engine on every ``todo`` row.

    Yields the batch's skipped/error rows at once, then each image as soon as it is done (so only the image being
    blended and the current tile batch are held, not the whole batch's outputs). Adds the column ``output``:
    (H*s, W*s, C) uint16 stored values (see :func:`quantize`), and turns rows whose inference failed into errors.
    """

    def __init__(self, model: ModelFile, storage_cfg: StorageConfig, e: EnhanceConfig, precision: str | None = None):
        """``precision``: the one the job's output keys record (default ``enhance.precision``). A replica that
        would run another (e.g. a CPU node without bf16 hardware in a cluster whose driver has it) refuses to
        start rather than write outputs whose provenance is wrong."""
        from medsr_dist.infer.backends import auto_batch_size
        from medsr_dist.infer.engine import TileSpec

        precision = precision or e.precision
        self.backend = build_model_backend(model, e.backend, Storage(storage_cfg), precision=precision)
        runs = getattr(self.backend, "precision", precision)
        if runs != precision:
            raise RuntimeError(f"enhance.precision: this replica ({self.backend!r}) runs {runs}, but the job's outputs "
                               f"are keyed and labelled {precision}; run replicas on like nodes or set "
                               f"enhance.precision: {runs}")
        batch_size = e.batch_size or auto_batch_size(self.backend)
        self.spec = TileSpec(tile=e.tile, overlap=e.tile_overlap, blend=e.tile_blend, batch_size=batch_size)
        self.outscale = e.outscale
        log.info("model replica ready: %r, %s", self.backend, self.spec)

    def __call__(self, batch: dict) -> Iterator[dict]:
        from medsr_dist.infer.engine import enhance_many

        rows = _rows(batch)
        for row in rows:
            row["output"] = NO_OUTPUT
        todo = [row for row in rows if row["status"] == "todo"]
        passing = [row for row in rows if row["status"] != "todo"]
        if passing:
            yield _columns([self._drop_pixels(r) for r in passing])
        done = 0
        t0 = time.perf_counter()
        try:
            for row, out in zip(todo, enhance_many(self.backend, (r["pixels"] for r in todo), self.spec,
                                                   outscale=self.outscale)):
                row["output"] = quantize(out, stored_maxval(str(row["meta"])), in_place=True)
                del out
                row["seconds"] = float(row["seconds"]) + time.perf_counter() - t0
                done += 1
                yield _columns([row])
                t0 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - retry the rest one by one, so one bad image fails alone
            log.warning("batch inference failed (%s: %s); retrying image by image", type(exc).__name__, exc)
            for row in todo[done:]:
                t0 = time.perf_counter()
                try:
                    out = next(enhance_many(self.backend, [row["pixels"]], self.spec, outscale=self.outscale))
                    row["output"] = quantize(out, stored_maxval(str(row["meta"])))
                except Exception as one_exc:  # noqa: BLE001
                    row.update(status="error", error=f"inference failed: {type(one_exc).__name__}: {one_exc}")
                    row = self._drop_pixels(row)
                row["seconds"] = float(row["seconds"]) + time.perf_counter() - t0
                yield _columns([row])

    @staticmethod
    def _drop_pixels(row: dict) -> dict:
        return {**row, "pixels": NO_PIXELS, "header": b""}


class EncodeCommit:
    """Stage 3 (CPU tasks): encode in the input's form, write the output, then its record; one manifest row out."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        return _columns([self.one(row) for row in _rows(batch)])

    def provenance(self, input_key: str, input_sha256: str, scale_text: str) -> dict[str, str]:
        """The provenance written into an output file (and repeated in its manifest row)."""
        model = self.spec.model
        return {
            "medsr:note": NOTE, "medsr:model": model.name, "medsr:model_sha256": model.sha256,
            "medsr:scale": scale_text, "medsr:params": self.spec.params_json, "medsr:source": input_key,
            "medsr:source_sha256": input_sha256, "medsr:software": f"medsr-dist {__version__}",
        }

    def one(self, item: dict) -> dict:
        spec, status = self.spec, str(item["status"])
        if status == "skipped":
            try:
                return {**_manifest_row(json.loads(str(item["record"]))), "status": "skipped"}
            except Exception as exc:  # noqa: BLE001 - an unreadable record: report, the next run redoes it
                status, item = "error", {**item, "error": f"unreadable item record: {_reason(exc)}"}
        row = _manifest_row({
            "input_key": str(item["key"]), "input_sha256": str(item["input_sha256"]), "output_key": str(item["output_key"]),
            "item_id": str(item["item_id"]), "status": status, "error": str(item["error"]),
            "model_name": spec.model.name, "model_sha256": spec.model.sha256, "params": spec.params_json,
            "input_format": str(item["input_format"]), "input_bytes": int(item["input_bytes"]),
            "seconds": float(item["seconds"]), "run_id": spec.run_id,
        })
        if status == "todo":
            t0 = time.perf_counter()
            try:
                row.update(self._commit(item, row))
            except Exception as exc:  # noqa: BLE001 - the output may exist without a record: the next run redoes it
                row.update(status="error", error=f"encode/write failed: {_reason(exc)}")
            row["seconds"] += time.perf_counter() - t0
        if row["status"] != "done":
            row["output_key"] = ""  # nothing was (completely) written for this row
        row["finished_at"] = _now()
        return row

    def _commit(self, item: dict, row: dict) -> dict:
        from medsr_dist.io.image import ImageMeta, encode_image

        spec = self.spec
        src = np.asarray(item["pixels"])
        meta = ImageMeta.from_json(str(item["meta"]))
        out = np.asarray(item["output"]).astype(np.float32) / np.float32(meta.maxval)
        nominal = spec.params["outscale"]
        provenance = self.provenance(row["input_key"], row["input_sha256"], f"{nominal:g}")
        # the grid got finer by exactly this much (rounding of non-integer outscales included)
        scale = out.shape[0] / src.shape[0]
        data = encode_image(out, meta, bytes(item["header"]) or None, scale=scale, provenance=provenance)
        spec.storage.write_bytes(row["output_key"], data)  # atomic
        score = consistency_psnr(out, src)
        done = {
            "status": "done", "provenance": json.dumps(provenance, sort_keys=True), "bits_stored": meta.bits_stored,
            "channels": meta.channels, "output_bytes": len(data), "input_height": src.shape[0],
            "input_width": src.shape[1], "output_height": out.shape[0], "output_width": out.shape[1],
            "consistency_psnr_db": score, "flagged": bool(score < spec.threshold_db), "finished_at": _now(),
        }
        record = {**row, **done, "seconds": row["seconds"]}
        # written only after the output is complete: its presence means "done"
        spec.storage.write_bytes(item_record_uri(spec.output, row["item_id"]), json.dumps(record).encode())
        return done


_DEFAULTS = {"string": "", "int32": 0, "int64": 0, "double": math.nan, "bool": False}


def _manifest_row(values: dict) -> dict:
    """A complete manifest row: ``values`` over type defaults, in schema order (unknown keys dropped)."""
    return {f.name: values.get(f.name, _DEFAULTS[str(f.type)]) for f in MANIFEST_SCHEMA}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------------
def manifest_uri(output_prefix: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, CUMULATIVE_FILE)


def run_manifest_uri(output_prefix: str, run_id: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, "runs", f"{run_id}.parquet")


def write_manifest(storage: Storage, uri: str, rows: list[dict]) -> None:
    """Write rows (dicts with :data:`MANIFEST_SCHEMA` fields) as one Parquet file, atomically."""
    table = pa.Table.from_pylist([_manifest_row(r) for r in rows], schema=MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_manifest(storage: Storage, uri: str) -> list[dict]:
    """Rows of a manifest Parquet file (columns of older manifests missing here get type defaults)."""
    rows = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return [_manifest_row(r) for r in rows]


def merge_cumulative(storage: Storage, output_prefix: str, run_rows: list[dict]) -> list[dict]:
    """The cumulative manifest after a run: one row per completed output (by item id), newest wins.

    Starts from the previous ``manifest.parquet`` (rebuilt from the item records if it is missing or unreadable),
    adds this run's ``done`` rows, and reads the records of any item the two do not know (outputs of a killed run
    that this run did not list again) — so a listing of the records, not a read of each, is the usual cost.
    """
    uri = manifest_uri(output_prefix)
    known: dict[str, dict] = {}
    if storage.exists(uri):
        try:
            known = {r["item_id"]: r for r in read_manifest(storage, uri) if r["item_id"]}
        except Exception as exc:  # noqa: BLE001 - rebuilt below from the records
            log.warning("cumulative manifest %s unreadable (%s); rebuilding it from the item records", uri, exc)
    for row in run_rows:
        if row["status"] == "done":
            known[row["item_id"]] = row
    items_dir = Storage.join(output_prefix, MANIFEST_DIR, "items")
    if storage.exists(items_dir):
        for record_uri in storage.list_files(items_dir, include=["*.json"]):
            iid = posixpath.basename(record_uri)[: -len(".json")]
            if iid not in known:
                try:
                    known[iid] = _manifest_row(json.loads(storage.read_bytes(record_uri)))
                except Exception as exc:  # noqa: BLE001
                    log.warning("item record %s unreadable (%s); left out of the manifest", record_uri, exc)
    return sorted(known.values(), key=lambda r: (r["input_key"], r["finished_at"]))


def remove_stale_partials(storage: Storage, output_prefix: str) -> list[str]:
    """Delete in-flight temp files that a killed run left under a local output prefix; returns their paths.

    Object stores need nothing: an upload that never completed leaves no visible object.
    """
    if "://" in output_prefix and not output_prefix.startswith("file://"):
        return []
    fs, root = storage.fs(output_prefix)
    if not os.path.isdir(root):
        return []
    removed = []
    for path in fs.find(root, withdirs=False):
        name = posixpath.basename(path)
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:  # pragma: no cover - raced with its writer
                pass
    return removed


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
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

    @property
    def n_errors(self) -> int:
        return self.counts.get("error", 0)


def list_inputs(storage: Storage, e: EnhanceConfig) -> list[str]:
    """Input keys: files under ``enhance.input`` matching include/exclude, minus anything under the output prefix."""
    out = e.output.rstrip("/") + "/"
    keys = [k for k in storage.list_files(e.input, include=e.include, exclude=e.exclude) if not k.startswith(out)]
    if not keys:
        raise FileNotFoundError(f"enhance.input: no files under {e.input} match include={e.include} exclude={e.exclude}")
    return keys


def run_enhance_job(
    cfg: MedsrConfig, storage: Storage | None = None, progress: Callable[[EnhanceProgress], None] | None = None
) -> EnhanceResult:
    """Enhance ``enhance.input`` into ``enhance.output`` (Ray must be initialised).

    ``progress`` is called after every finished item. Raises before any Ray work when the model, its backend or
    the input listing is unusable (FileNotFoundError / ValueError naming the key).
    """
    import ray

    from medsr_dist.runtime import cluster_has_gpus

    t_start = time.perf_counter()
    storage = storage or Storage(cfg.storage)
    e = cfg.enhance
    model = read_model_file(e.checkpoint, cfg.storage, onnx_uri=e.onnx_model)
    build_model_backend(model, e.backend, storage, device="cpu")  # a bad model or export fails here, not in every replica
    gpu = cluster_has_gpus()
    precision = runnable_precision(e.backend, e.precision, gpu=gpu)
    if precision != e.precision:
        log.warning("enhance.precision %s: %s replicas run %s; outputs record %s", e.precision,
                    "GPU" if gpu else "CPU", precision, precision)
    params = enhance_params(e, model, precision=precision)
    keys = list_inputs(storage, e)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    for path in remove_stale_partials(storage, e.output):
        log.warning("removed a temp file left by a killed run: %s", path)
    spec = JobSpec(storage=storage, input=e.input.rstrip("/"), output=e.output.rstrip("/"), model=model, params=params,
                   run_id=run_id, threshold_db=e.consistency_threshold_db)

    ds = ray.data.from_items([{"key": k} for k in keys],
                             override_num_blocks=max(1, min(math.ceil(len(keys) / e.images_per_batch), 20_000)))
    ds = ds.map_batches(ReadDecode(spec), batch_size=None, num_cpus=0.5)
    ds = ds.map_batches(EnhanceReplica, fn_constructor_args=(model, cfg.storage, e, precision), batch_size=e.images_per_batch,
                        compute=ray.data.ActorPoolStrategy(min_size=e.min_replicas, max_size=e.max_replicas),
                        num_gpus=1 if gpu else 0, num_cpus=1 if gpu else e.cpus_per_replica)
    ds = ds.map_batches(EncodeCommit(spec), batch_size=1, num_cpus=0.5)

    ctx = ray.data.DataContext.get_current()
    saved_errored = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a crashed worker loses its block's rows, reported below, not the whole run
    rows: list[dict] = []
    counts: dict[str, int] = {}
    pixels = 0
    t_run = time.perf_counter()
    try:
        for raw in ds.iter_rows():
            row = _manifest_row({k: _plain(v) for k, v in raw.items()})
            rows.append(row)
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            if row["status"] == "done":
                pixels += row["input_height"] * row["input_width"]
            if progress is not None:
                progress(EnhanceProgress(len(keys), dict(counts), pixels, time.perf_counter() - t_run))
    finally:
        ctx.max_errored_blocks = saved_errored
    seen = {r["input_key"] for r in rows}
    for key in keys:
        if key not in seen:
            rows.append(_manifest_row({
                "input_key": key, "status": "error", "model_name": model.name, "model_sha256": model.sha256,
                "params": spec.params_json, "run_id": run_id, "finished_at": _now(),
                "error": "no result: the worker processing it failed (crash or out of memory); the next run retries it",
            }))
            counts["error"] = counts.get("error", 0) + 1
    rows.sort(key=lambda r: r["input_key"])

    run_manifest = run_manifest_uri(spec.output, run_id)
    write_manifest(storage, run_manifest, rows)
    cumulative = manifest_uri(spec.output)
    write_manifest(storage, cumulative, merge_cumulative(storage, spec.output, rows))
    return EnhanceResult(output=e.output, manifest=cumulative, run_manifest=run_manifest, counts=counts, rows=rows,
                         seconds=time.perf_counter() - t_start, input_pixels=pixels)


# ----------------------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------------------
def manifest_summary(storage: Storage, output_prefix: str) -> dict:
    """What ``medsr status`` prints: totals of the cumulative manifest and of the latest run.

    Raises:
        FileNotFoundError: no manifest under ``output_prefix``.
    """
    output_prefix = output_prefix.rstrip("/")
    uri = manifest_uri(output_prefix)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest at {uri}: has `medsr enhance` written to {output_prefix}?")
    rows = read_manifest(storage, uri)
    runs_dir = Storage.join(output_prefix, MANIFEST_DIR, "runs")
    runs = storage.list_files(runs_dir, include=["*.parquet"]) if storage.exists(runs_dir) else []
    latest = read_manifest(storage, runs[-1]) if runs else []
    scores = [r["consistency_psnr_db"] for r in rows if r["consistency_psnr_db"] is not None
              and math.isfinite(r["consistency_psnr_db"])]
    by_model: dict[str, int] = {}
    for r in rows:
        label = f"{r['model_name']} ({r['model_sha256'][:12]})"
        by_model[label] = by_model.get(label, 0) + 1
    latest_counts: dict[str, int] = {}
    for r in latest:
        latest_counts[r["status"]] = latest_counts.get(r["status"], 0) + 1
    return {
        "output": output_prefix,
        "manifest": uri,
        "outputs": len(rows),
        "flagged": sum(bool(r["flagged"]) for r in rows),
        "input_bytes": sum(r["input_bytes"] or 0 for r in rows),
        "output_bytes": sum(r["output_bytes"] or 0 for r in rows),
        "consistency_psnr_db": {"min": min(scores), "median": float(np.median(scores)), "max": max(scores)} if scores else None,
        "models": by_model,
        "runs": len(runs),
        "latest_run": posixpath.basename(runs[-1])[: -len(".parquet")] if runs else None,
        "latest_run_manifest": runs[-1] if runs else None,
        "latest_counts": latest_counts,
        "latest_errors": [(r["input_key"], r["error"]) for r in latest if r["status"] == "error"],
        "flagged_outputs": [(r["output_key"], r["consistency_psnr_db"]) for r in rows if r["flagged"]],
    }


def format_summary(summary: dict, max_listed: int = 10) -> str:
    """Human-readable text of :func:`manifest_summary`."""
    gib = 1 << 30
    lines = [f"output prefix: {summary['output']}",
             f"outputs: {summary['outputs']} ({summary['input_bytes'] / gib:.3f} GiB in -> "
             f"{summary['output_bytes'] / gib:.3f} GiB out), flagged for review: {summary['flagged']}"]
    if summary["consistency_psnr_db"]:
        c = summary["consistency_psnr_db"]
        lines.append(f"consistency PSNR (dB): min {c['min']:.1f} · median {c['median']:.1f} · max {c['max']:.1f}")
    for label, n in summary["models"].items():
        lines.append(f"model {label}: {n} outputs")
    if summary["latest_run"]:
        counts = ", ".join(f"{s} {summary['latest_counts'].get(s, 0)}" for s in STATUSES)
        lines.append(f"runs: {summary['runs']}; latest {summary['latest_run']}: {counts}")
        for key, error in summary["latest_errors"][:max_listed]:
            lines.append(f"  error {key}: {error}")
        if len(summary["latest_errors"]) > max_listed:
            lines.append(f"  ... {len(summary['latest_errors']) - max_listed} more errors in {summary['latest_run_manifest']}")
    for key, score in summary["flagged_outputs"][:max_listed]:
        lines.append(f"  flagged {key}: consistency {score:.1f} dB")
    if len(summary["flagged_outputs"]) > max_listed:
        lines.append(f"  ... {len(summary['flagged_outputs']) - max_listed} more flagged in the manifest")
    lines.append(f"manifest: {summary['manifest']}")
    return "\n".join(lines)
