"""`medsr enhance`: an archive prefix -> enhanced images in the input's own form, with a manifest.

Ray Data stages (the model replicas never wait on decoding or encoding):

1. ``ReadDecode`` (CPU tasks): read bytes, content hash, output key, skip what is already done, decode.
2. ``EnhanceReplica`` (actor pool of ``min_replicas..max_replicas``; one GPU each when the cluster has
   GPUs): the tiled inference engine with the configured backend.
3. ``EncodeCommit`` (CPU tasks): encode in the input's form with provenance, write atomically, score
   consistency, then write the item's manifest record (only after the output is complete).

Exactly once: an output is keyed by (input content hash, model hash, parameters). A record under
``<output>/_manifest/items/`` exists only for complete outputs; a rerun skips those, so a run killed
at any moment and started again finishes the rest with no duplicates and no partial files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist import __version__
from medsr_dist.config import EnhanceConfig, MedsrConfig, StorageConfig
from medsr_dist.infer.model_file import ModelFile, read_model_file
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
EMPTY = np.zeros((0, 0, 1), np.float32)  # placeholder pixels for rows that are skipped or failed
NOTE = "Enhanced by a super-resolution model: an enhancement, not a new acquisition. Compare with the original."

MANIFEST_SCHEMA = pa.schema([
    ("input_key", pa.string()), ("input_sha256", pa.string()), ("output_key", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("model_name", pa.string()), ("model_sha256", pa.string()), ("params", pa.string()),
    ("input_bytes", pa.int64()), ("output_bytes", pa.int64()), ("input_shape", pa.string()),
    ("output_shape", pa.string()), ("seconds", pa.float64()), ("consistency_psnr_db", pa.float64()),
    ("flagged", pa.bool_()), ("run_id", pa.string()), ("finished_at", pa.string()),
])


def enhance_params(e: EnhanceConfig, model: ModelFile) -> dict:
    """The parameters that determine an output (part of its identity)."""
    return {"scale": model.scale, "outscale": e.outscale or model.scale, "tile": e.tile, "tile_overlap": e.tile_overlap,
            "backend": e.backend, "precision": e.precision}


def output_id(input_sha256: str, model_sha256: str, params: dict) -> str:
    return hashlib.sha256(f"{input_sha256}|{model_sha256}|{json.dumps(params, sort_keys=True)}".encode()).hexdigest()[:16]


def output_key_for(output_prefix: str, rel_key: str, oid: str, ext: str) -> str:
    """``<output>/<rel dir>/<stem>.sr-<id10><ext>``: beside its siblings, unique per (input, model, params)."""
    rel = PurePosixPath(rel_key)
    stem = rel.name.split(".")[0] if rel.name else "image"
    name = f"{stem}.sr-{oid[:10]}{ext}"
    return Storage.join(output_prefix, str(rel.parent / name) if str(rel.parent) != "." else name)


def consistency_psnr(output: np.ndarray, source: np.ndarray) -> float:
    """Our safeguard against invented detail: PSNR (dB) between the output area-downsampled back to the
    input grid and the input. High: the enhancement agrees with what was measured; low: it changed it."""
    import cv2

    from medsr_dist.eval.metrics import psnr

    h, w = source.shape[:2]
    down = cv2.resize(output, (w, h), interpolation=cv2.INTER_AREA)
    if down.ndim == 2:
        down = down[:, :, None]
    return psnr(down.astype(np.float32), source.astype(np.float32), max_value=1.0)


class ReadDecode:
    """Stage 1 (CPU tasks): ``{"key"}`` -> rows with pixels to enhance, or a skipped/error status."""

    def __init__(self, storage: Storage, input_prefix: str, output_prefix: str, model_sha: str, params: dict):
        self.storage, self.input, self.output = storage, input_prefix.rstrip("/"), output_prefix.rstrip("/")
        self.model_sha, self.params = model_sha, params

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.io.image import decode_image, detect_format, output_extension

        rows = []
        for key in batch["key"]:
            key = str(key)
            row = {"key": key, "input_sha256": "", "input_bytes": 0, "output_key": "", "output_id": "",
                   "status": "todo", "error": "", "pixels": EMPTY, "meta": "", "header": b"", "seconds": 0.0}
            t0 = time.perf_counter()
            try:
                data = self.storage.read_bytes(key)
                row["input_sha256"], row["input_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
                fmt = detect_format(data)
                if fmt is None:
                    raise ValueError("not a PNG, JPEG, TIFF or DICOM file")
                oid = output_id(row["input_sha256"], self.model_sha, self.params)
                row["output_id"] = oid
                row["output_key"] = output_key_for(self.output, key[len(self.input):].lstrip("/"), oid, output_extension(fmt))
                if self.storage.exists(item_record_uri(self.output, oid)):
                    row["status"] = "skipped"
                else:
                    img = decode_image(data, key)
                    row.update(pixels=img.pixels, meta=img.meta.to_json(), header=img.header or b"")
            except Exception as exc:  # noqa: BLE001 - becomes an error row naming the file
                row.update(status="error", error=f"{type(exc).__name__}: {exc}")
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
        return _columns(rows)


class EnhanceReplica:
    """Stage 2 (actor pool): one model replica running the tiled engine on every ``todo`` row."""

    def __init__(self, model: ModelFile, storage_cfg: StorageConfig, e: EnhanceConfig):
        from medsr_dist.infer.backends import build_backend
        from medsr_dist.infer.engine import TileSpec

        net = model.build(Storage(storage_cfg))
        self.backend = build_backend(e.backend, model=net, scale=model.scale, precision=e.precision)
        self.spec = TileSpec(tile=e.tile, overlap=e.tile_overlap, batch_size=e.batch_size)
        self.outscale = e.outscale

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.infer.engine import enhance_many

        todo = [i for i, s in enumerate(batch["status"]) if s == "todo"]
        outputs = [EMPTY] * len(batch["status"])
        status, error, seconds = list(batch["status"]), list(batch["error"]), list(batch["seconds"])
        t0 = time.perf_counter()
        try:
            for i, out in zip(todo, enhance_many(self.backend, (batch["pixels"][i] for i in todo), self.spec, outscale=self.outscale)):
                outputs[i] = out if out.ndim == 3 else out[:, :, None]
        except Exception as exc:  # noqa: BLE001 - retry one by one so one bad image fails alone
            for i in todo:
                try:
                    out = next(enhance_many(self.backend, [batch["pixels"][i]], self.spec, outscale=self.outscale))
                    outputs[i] = out if out.ndim == 3 else out[:, :, None]
                except Exception as one_exc:  # noqa: BLE001
                    status[i], error[i] = "error", f"inference failed: {type(one_exc).__name__}: {one_exc}"
            log.warning("batch inference failed (%s); retried image by image", exc)
        per_item = (time.perf_counter() - t0) / max(len(todo), 1)
        for i in todo:
            seconds[i] += per_item
        result = {k: v for k, v in batch.items() if k != "pixels"}
        result.update(pixels=batch["pixels"], output=_object_array(outputs), status=np.asarray(status),
                      error=np.asarray(error), seconds=np.asarray(seconds, dtype=np.float64))
        return result


class EncodeCommit:
    """Stage 3 (CPU tasks): encode in the input's form, write atomically, then record the manifest item."""

    def __init__(self, storage: Storage, output_prefix: str, model: ModelFile, params: dict, run_id: str, threshold_db: float):
        self.storage, self.output, self.model, self.params = storage, output_prefix.rstrip("/"), model, params
        self.run_id, self.threshold = run_id, threshold_db

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.io.image import ImageMeta, encode_image

        rows = []
        for i in range(len(batch["key"])):
            row = {
                "input_key": str(batch["key"][i]), "input_sha256": str(batch["input_sha256"][i]),
                "output_key": str(batch["output_key"][i]), "status": str(batch["status"][i]),
                "error": str(batch["error"][i]), "model_name": self.model.name, "model_sha256": self.model.sha256,
                "params": json.dumps(self.params, sort_keys=True), "input_bytes": int(batch["input_bytes"][i]),
                "output_bytes": 0, "input_shape": "", "output_shape": "", "seconds": float(batch["seconds"][i]),
                "consistency_psnr_db": float("nan"), "flagged": False, "run_id": self.run_id, "finished_at": "",
            }
            oid = str(batch["output_id"][i])
            if row["status"] == "skipped":
                previous = json.loads(self.storage.read_bytes(item_record_uri(self.output, oid)))
                row.update({k: previous[k] for k in ("output_bytes", "input_shape", "output_shape", "consistency_psnr_db", "flagged")})
            elif row["status"] == "todo":
                t0 = time.perf_counter()
                try:
                    src, out = batch["pixels"][i], batch["output"][i]
                    meta = ImageMeta.from_json(str(batch["meta"][i]))
                    scale = out.shape[0] / src.shape[0]
                    provenance = {
                        "medsr:note": NOTE, "medsr:model": self.model.name, "medsr:model_sha256": self.model.sha256,
                        "medsr:scale": f"{scale:g}", "medsr:params": row["params"], "medsr:source": row["input_key"],
                        "medsr:source_sha256": row["input_sha256"], "medsr:software": f"medsr-dist {__version__}",
                    }
                    data = encode_image(out, meta, bytes(batch["header"][i]) or None, scale=scale, provenance=provenance)
                    self.storage.write_bytes(row["output_key"], data)  # atomic
                    score = consistency_psnr(out, src)
                    row.update(status="done", output_bytes=len(data), input_shape=str(list(src.shape)),
                               output_shape=str(list(out.shape)), consistency_psnr_db=score,
                               flagged=bool(score < self.threshold))
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", error=f"encode/write failed: {type(exc).__name__}: {exc}")
                row["seconds"] += time.perf_counter() - t0
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if row["status"] == "done":
                # written only after the output is complete: its presence means "done"
                self.storage.write_bytes(item_record_uri(self.output, oid), json.dumps(row).encode())
            rows.append(row)
        return _columns(rows)


def item_record_uri(output_prefix: str, oid: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, "items", f"{oid}.json")


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _columns(rows: list[dict]) -> dict:
    cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    return {k: (_object_array(v) if k in ("pixels", "output") else np.asarray(v, dtype=object if k == "header" else None))
            for k, v in cols.items()}


@dataclass
class EnhanceResult:
    output: str
    manifest: str
    run_manifest: str
    counts: dict[str, int]
    rows: list[dict] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return self.counts.get("error", 0)


def _write_parquet(storage: Storage, uri: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def run_enhance_job(cfg: MedsrConfig, storage: Storage | None = None) -> EnhanceResult:
    """Enhance ``enhance.input`` into ``enhance.output`` (Ray must be initialised)."""
    import ray

    from medsr_dist.runtime import cluster_has_gpus

    storage = storage or Storage(cfg.storage)
    e = cfg.enhance
    model = read_model_file(e.checkpoint, cfg.storage)
    params = enhance_params(e, model)
    keys = [k for k in storage.list_files(e.input, include=e.include, exclude=e.exclude)
            if f"/{MANIFEST_DIR}/" not in k]
    if not keys:
        raise FileNotFoundError(f"enhance.input: no files under {e.input} match include={e.include} exclude={e.exclude}")
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    gpu = 1 if cluster_has_gpus() else 0
    ds = ray.data.from_items([{"key": k} for k in keys], override_num_blocks=min(len(keys), 200))
    ds = ds.map_batches(ReadDecode, fn_constructor_args=(storage, e.input, e.output, model.sha256, params),
                        batch_size=1, num_cpus=0.5)
    ds = ds.map_batches(EnhanceReplica, fn_constructor_args=(model, cfg.storage, e), batch_size=e.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=e.min_replicas, max_size=e.max_replicas),
                        num_gpus=gpu, num_cpus=0 if gpu else 1)
    ds = ds.map_batches(EncodeCommit, fn_constructor_args=(storage, e.output, model, params, run_id, e.consistency_threshold_db),
                        batch_size=1, num_cpus=0.5)
    rows = ds.take_all()
    rows = [{k: r[k] for k in MANIFEST_SCHEMA.names} for r in rows]
    manifest_dir = storage.join(e.output, MANIFEST_DIR)
    run_manifest = storage.join(manifest_dir, "runs", f"{run_id}.parquet")
    _write_parquet(storage, run_manifest, rows)
    records = [json.loads(storage.read_bytes(u)) for u in storage.list_files(storage.join(manifest_dir, "items"), include=["*.json"])]
    cumulative = storage.join(manifest_dir, "manifest.parquet")
    _write_parquet(storage, cumulative, sorted(records, key=lambda r: r["input_key"]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return EnhanceResult(output=e.output, manifest=cumulative, run_manifest=run_manifest, counts=counts, rows=rows)
