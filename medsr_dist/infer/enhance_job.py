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
run (a status of :data:`STATUSES`, with its reason); ``_manifest/manifest.parquet`` has one row per output ever
completed (the previous table + this run's outputs + records of a killed run that this run did not list again), plus
one row per input that needs no new attempt while unchanged (``ignored``; ``quarantined``; ``error`` rows of inputs
that killed their replica, which carry the count of such runs in ``attempts``). Manifests hold input keys: they sit
beside the archive, under its access control. Logs do not (unless ``enhance.log_keys``): they name items by item id.

Hostile input. Before decoding, the header's dimensions (``probe_image``) are held against
``enhance.max_input_pixels`` / ``max_output_pixels``. A non-finite model output is an error and writes nothing. An
input whose batch killed its replica is retried alone in a second pass (its batch-mates with it, each alone); one
that kills its replica alone is counted, across runs, and ``quarantined`` after ``enhance.max_attempts``. A fatal
device (CUDA) error ends the replica's process so Ray starts a fresh one (with a fresh CUDA context). Keys are
normalised; ``..`` and absolute segments are refused; outputs must lie under the output prefix, which is never
listed as input. One run per output prefix: a :class:`~medsr_dist.storage.Lease` at ``_manifest/lease.json``.

Incremental nights: the listing gives each input's size and version (S3 ETag, local mtime); an input whose (key,
size, version) matches its cumulative-manifest row and whose output is still listed is skipped unread.
"""
from __future__ import annotations

import gc
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
from medsr_dist.infer.replica import SETTINGS, ModelReplica, NonFiniteOutput
from medsr_dist.pacs.dicomweb import is_dicomweb
from medsr_dist.pacs.storage import VERSION_PREFIX as PACS_VERSION
from medsr_dist.storage import PARTIAL_SUFFIX, FileEntry, Lease, Storage
from medsr_dist.uris import is_below as _under, relative_key

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
CUMULATIVE_FILE = "manifest.parquet"
LEASE_FILE = "lease.json"
NOTE = "Enhanced by a super-resolution model: an enhancement, not a new acquisition. Compare with the original."
STATUSES = ("done", "skipped", "ignored", "error", "quarantined")
"""done: enhanced in this run; skipped: enhanced before; ignored: a readable object without an image (DICOM SR,
waveform, RT plan...: the SOP class is named in ``error``); error: could not be enhanced (reason in ``error``);
quarantined: killed its model replica in ``enhance.max_attempts`` runs, no longer tried while unchanged."""
CRASH_REASON = ("the model replica died with this item in its batch, and again with this item alone "
                "(a crash or out of memory in the model or its runtime)")
#: Exit status of a replica process ended on a fatal device error (Ray restarts the actor).
FATAL_DEVICE_EXIT = 70
MAX_REASON_CHARS = 600

# Placeholders for rows without pixels (skipped, failed): every row of a column has the same dtype and rank,
# so Ray Data can hold the column as one variable-shaped tensor array. Pixels travel as (F, H, W, C) always.
NO_PIXELS = np.zeros((0, 0, 0, 1), np.float32)
NO_OUTPUT = np.zeros((0, 0, 0, 1), np.uint16)
NO_STD = np.zeros((0, 0, 0), np.uint16)  # rows without an uncertainty map (one sample, or not enhanced)

MANIFEST_SCHEMA = pa.schema([
    ("input_key", pa.string()), ("input_sha256", pa.string()), ("output_key", pa.string()), ("item_id", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("model_name", pa.string()), ("model_sha256", pa.string()), ("params", pa.string()), ("provenance", pa.string()),
    ("input_format", pa.string()), ("bits_stored", pa.int32()), ("channels", pa.int32()),
    ("input_bytes", pa.int64()), ("output_bytes", pa.int64()),
    ("input_height", pa.int64()), ("input_width", pa.int64()), ("output_height", pa.int64()), ("output_width", pa.int64()),
    ("seconds", pa.float64()), ("consistency_psnr_db", pa.float64()), ("flagged", pa.bool_()),
    ("run_id", pa.string()), ("finished_at", pa.string()),
    ("input_version", pa.string()), ("frames", pa.int32()), ("attempts", pa.int32()),
    ("uncertainty_p99", pa.float64()), ("uncertainty_key", pa.string()),
])
"""One manifest row. ``params``/``provenance`` are JSON objects; ``provenance`` is exactly the text written into the
output file (PNG/TIFF/JPEG text, DICOM derivation). ``run_id``/``finished_at``: the run that produced the output
(for ``skipped`` rows an earlier one). ``seconds``: wall time spent on the item in the run that produced it.
``consistency_psnr_db``: see :func:`consistency_psnr`; ``flagged``: below ``enhance.consistency_threshold_db``.
``input_bytes``/``input_version``: the input's size and version (:class:`~medsr_dist.storage.FileEntry`) when it was
listed; ``frames``: of the input (0: not read); ``attempts``: runs in which the input killed its model replica.
``uncertainty_p99`` / ``uncertainty_key``: an ldm output drawn from K > 1 samples: the 99th percentile of its
per-pixel std map (fraction of the intensity range; NaN without a map) and where the map was written (beside the
output, see :meth:`EncodeCommit._write_uncertainty`); ``flagged`` also when p99 > ``enhance.uncertainty_threshold``."""


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
    params = {"scale": model.scale, "outscale": e.outscale or model.scale, "tile": e.tile,
              "tile_overlap": e.tile_overlap, "tile_blend": e.tile_blend, "backend": e.backend,
              "precision": precision or e.precision, "engine": ENGINE_REVISION}
    if model.sampling is not None:  # an iterative sampler: DDIM-50's output is not DDPM-300's (model.with_sampling)
        params["sampling"] = model.sampling  # sampler, steps, samples K, output, seed
        params["schedule"] = dict(model.generator.get("schedule") or {})  # zero_terminal_snr, prediction type, T
    return params


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
        output: (H', W'[, C]) float in [0, 1], or (F, H', W', C) for F frames (the mean squared error of all
            frames together).
        source: (H, W[, C]) float in [0, 1], same channels; (F, H, W, C) with ``output``'s F.

    Returns:
        PSNR in dB with peak 1.0 (the same number as basicsr's ``calculate_psnr``; ``inf`` for identical
        images). Computed here rather than through :mod:`medsr_dist.eval.metrics`, whose basicsr import would cost
        every encode worker seconds of start-up.
    """
    if np.ndim(output) == 4:
        if np.shape(source)[0] != np.shape(output)[0]:
            raise ValueError(f"output has {np.shape(output)[0]} frames, source {np.shape(source)[0]}")
        mse = float(np.mean([_frame_mse(o, s) for o, s in zip(output, source)]))
    else:
        mse = _frame_mse(output, source)
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _frame_mse(output: np.ndarray, source: np.ndarray) -> float:
    import cv2

    h, w = source.shape[:2]
    down = cv2.resize(np.asarray(output, np.float32), (w, h), interpolation=cv2.INTER_AREA)
    if down.ndim == 2:
        down = down[:, :, None]
    diff = down.astype(np.float64) - np.asarray(source, np.float64).reshape(down.shape)
    return float(np.mean(diff * diff))


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
        if k in ("pixels", "output", "header", "std"):
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
    """What the CPU stages need to know; pickled into every task (the Storage ships only its config).

    ``max_input_pixels`` / ``max_output_pixels``: header limits (frames included; see :class:`ReadDecode`);
    ``log_keys``: whether logs may name input keys (else item ids); ``dicom_compression``: of derived DICOM.
    """

    storage: Storage
    input: str
    output: str
    model: ModelFile
    params: dict
    run_id: str
    threshold_db: float
    max_input_pixels: int = 100_000_000
    max_output_pixels: int = 400_000_000
    log_keys: bool = False
    dicom_compression: str = "none"
    uncertainty_threshold: float | None = None  # flag rows whose uncertainty_p99 exceeds it (K > 1 samples)
    manifest: str = ""
    volumes: dict | None = None  # volume items' model and parameters (medsr_dist/mri/nightly.py plan_volume_job)

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def records(self) -> str:
        """Where ``_manifest/`` (manifests, item records, lease, watermark) lives: ``enhance.manifest``, else the
        output prefix."""
        return (self.manifest or self.output).rstrip("/")

    @property
    def output_is_pacs(self) -> bool:
        return is_dicomweb(self.output)


def _rel_key(spec: JobSpec, key: str) -> str:
    """The input's key below ``enhance.input``, normalised (the input's own name when the input is one file).

    Raises ValueError for keys with ``..`` or absolute segments (see :func:`~medsr_dist.storage.relative_key`)."""
    if key.rstrip("/") == spec.input.rstrip("/"):
        return posixpath.basename(key.rstrip("/"))
    return relative_key(key, spec.input)


def key_ref(key: str) -> str:
    """How logs name an input that has no item id yet: ``key-`` + 12 hex digits of its key's SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def item_label(row: dict, log_keys: bool = False) -> str:
    """How logs and progress name a row's item: its input key with ``log_keys``, else ``item <item id>`` (or the
    :func:`key_ref` of its key before an item id exists). Keys often embed accession numbers or names."""
    if log_keys:
        return str(row.get("input_key") or row.get("key") or "")
    iid = str(row.get("item_id") or "")
    return f"item {iid}" if iid else key_ref(str(row.get("input_key") or row.get("key") or ""))


#: DICOM attributes whose values must never reach a reason text or a log (also their PersonName components).
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
                "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientMotherBirthName",
                "ReferringPhysicianName", "InstitutionName", "StudyID")


def phi_values(data: bytes | None) -> set[str]:
    """Identifier values held by a DICOM file's header (:data:`PHI_KEYWORDS`, person names also by component),
    for :func:`sanitize_reason`; empty for anything pydicom cannot read. Reads the header only."""
    if not data:
        return set()
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(bytes(data)), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - not DICOM, or unreadable: nothing of it can be named in a reason
        return set()
    found: set[str] = set()

    def add(value) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            for v in value:
                add(v)
            return
        if isinstance(value, pydicom.Sequence):
            for item in value:
                for elem in item:
                    add(elem.value)
            return
        text = str(value).strip()
        if len(text) >= 2:
            found.add(text)
            found.update(p.strip() for p in text.replace("=", "^").split("^") if len(p.strip()) >= 2)

    for keyword in PHI_KEYWORDS:
        try:
            add(ds.get(keyword))
        except Exception:  # noqa: BLE001 - a damaged element: it is simply not named
            continue
    return found


def sanitize_reason(text: str, *, key: str = "", secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """A reason fit for manifests' ``error`` column and for logs: the input's key (and its relative parts) and
    every identifier value in ``secrets`` replaced (``<input>``, ``<redacted>``), at most
    :data:`MAX_REASON_CHARS` characters. Decoders quote header values in their messages now and then."""
    if key:
        for spelling in sorted({key, key.rstrip("/"), posixpath.basename(key)} - {""}, key=len, reverse=True):
            text = text.replace(spelling, "<input>")
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


class ReadDecode:
    """Stage 1 (CPU tasks): ``{"key"[, "size", "version"]}`` -> one row per key: pixels to enhance (``todo``),
    or ``skipped``/``ignored``/``error``.

    Order per key: normalise the key (``..``/absolute segments: error, nothing read), read, hash, probe the
    header (``probe_image``: a DICOM without image is ``ignored``), refuse what exceeds ``max_input_pixels`` or,
    at the job's outscale, ``max_output_pixels`` (frames counted; nothing decoded), skip what has a record and an
    output, decode the rest.

    Output columns: key, item_id, input_sha256, input_bytes, input_version, input_format, frames, output_key,
    status, error, record (the existing item record, JSON, for ``skipped``), attempts, pixels ((F, H, W, C) float32
    in [0, 1], F = frames, also 1), meta (``ImageMeta`` JSON), header (DICOM header bytes or b""), seconds.
    ``attempts`` (optional input column): runs in which the item already killed its replica.
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        keys = batch["key"]
        sizes, versions, attempts = batch.get("size"), batch.get("version"), batch.get("attempts")
        found = [self._identify(str(key), -1 if sizes is None else int(sizes[i]),
                                "" if versions is None else str(versions[i]), 0 if attempts is None else int(attempts[i]))
                 for i, key in enumerate(keys)]
        present = self._present([row for row, _, _ in found])
        return _columns([self._decide(row, data, probe, present) for row, data, probe in found])

    def one(self, key: str, size: int = -1, version: str = "", attempts: int = 0) -> dict:
        """The row of one key (what ``__call__`` does for a batch of one)."""
        row, data, probe = self._identify(key, size, version, attempts)
        return self._decide(row, data, probe, self._present([row]))

    def _identify(self, key: str, size: int, version: str, attempts: int):
        """Read, hash, probe the header, name the output: (row, bytes or None, probe or None)."""
        from medsr_dist.io.image import NotAnImageObject, output_extension, probe_image

        spec = self.spec
        row = {"key": key, "item_id": "", "input_sha256": "", "input_bytes": max(size, 0), "input_version": version,
               "input_format": "", "frames": 0, "output_key": "", "status": "todo", "error": "", "record": "",
               "attempts": attempts, "pixels": NO_PIXELS, "meta": "", "header": b"", "seconds": 0.0, "kind": "image"}
        t0 = time.perf_counter()
        data = probe = None
        try:
            rel = _rel_key(spec, key)
            if spec.volumes is not None and _is_volume_key(key):  # NIfTI / DICOM series: medsr_dist/mri/nightly.py
                return self._volume(row, rel, t0), None, None
            data = spec.storage.read_bytes(key)  # a DICOMweb instance: WADO-RS, as stored
            row["input_sha256"], row["input_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
            # header only: a 400 kB PNG can say 20000 x 20000, and a DICOM can be a structured report
            probe = probe_image(data, "input")
            row["input_format"], row["frames"] = probe.format, probe.frames
            oid = output_id(row["input_sha256"], spec.model.sha256, spec.params)
            row["item_id"] = item_id(rel, oid)
            if spec.output_is_pacs:
                row["output_key"] = self._pacs_output_key(key, row["input_sha256"], data, probe.format)
            else:  # an instance's key ends in its SOP Instance UID: keep all of it in the file name
                named = rel + ".dcm" if is_dicomweb(spec.input) else rel
                row["output_key"] = output_key_for(spec.output, named, oid, output_extension(probe.format))
            if not _under(row["output_key"], spec.output):  # by construction; asserted because it must never fail
                raise ValueError(f"output key {row['output_key']} is not under the output prefix {spec.output}")
        except NotAnImageObject as exc:
            row.update(status="ignored", error=exc.reason, output_key="", item_id="")
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the reason
            row.update(status="error", error=_reason(exc))
        row["seconds"] = time.perf_counter() - t0
        return row, data, probe

    def _pacs_output_key(self, key: str, sha256: str, data: bytes, fmt: str) -> str:
        """The derived instance's URI at the DICOMweb output, from the source header (deterministic UIDs)."""
        from medsr_dist.pacs.storage import derived_instance_uri

        if fmt != "dicom":
            raise ValueError(f"enhance.output is a DICOMweb endpoint, which stores DICOM objects only; this input is "
                             f"{fmt}")
        provenance = EncodeCommit(self.spec).provenance(key, sha256, f"{self.spec.params['outscale']:g}")
        return derived_instance_uri(self.spec.output, data, provenance)

    def _present(self, rows: list[dict]) -> set[str] | str:
        """Which item records and outputs of ``rows`` exist: a set of URIs, or the reason the check failed. A PACS
        output is asked once per derived series (QIDO-RS), not once per instance."""
        storage = self.spec.storage
        try:
            recorded = {r["output_key"]: uri for r in rows if r["status"] == "todo"
                        for uri in [item_record_uri(self.spec.records, r["item_id"])] if storage.exists(uri)}
            if not recorded:
                return set()
            if self.spec.output_is_pacs:
                outputs = storage.existing(list(recorded))
            else:
                outputs = {k for k in recorded if storage.exists(k)}
            return outputs | {recorded[k] for k in outputs}
        except Exception as exc:  # noqa: BLE001 - every row of the batch that needed the answer says why
            return f"checking for existing outputs failed: {_reason(exc)}"

    def _volume(self, row: dict, rel: str, t0: float) -> dict:
        """A volume item's row, decided (skipped, error or decoded) by :func:`~medsr_dist.mri.nightly.read_volume_item`."""
        from medsr_dist.mri.nightly import read_volume_item

        secrets: set[str] = set()
        try:
            row = read_volume_item(self.spec, row, rel, secrets)
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the item and the reason
            row.update(status="error", error=sanitize_reason(_reason(exc), key=row["key"], secrets=secrets),
                       pixels=NO_PIXELS, header=b"")
        row["seconds"] = time.perf_counter() - t0
        return row

    def _decide(self, row: dict, data: bytes | None, probe, present: set[str] | str) -> dict:
        """Skip (a record and its output exist), refuse (limits), or decode."""
        from medsr_dist.io.image import NotAnImageObject, decode_image

        if row["kind"] == "volume":  # decided by _volume
            return row
        spec = self.spec
        t0 = time.perf_counter()
        try:
            if row["status"] == "todo":
                record_uri = item_record_uri(spec.records, row["item_id"])
                if isinstance(present, str):
                    raise RuntimeError(present)
                # done = a record and its output (an output deleted since is made again)
                if record_uri in present and row["output_key"] in present:
                    row.update(status="skipped", record=spec.storage.read_bytes(record_uri).decode())
                else:
                    self._check_limits(probe)
                    img = decode_image(data, "input")
                    pixels = img.pixels if img.pixels.ndim == 4 else img.pixels[None]
                    row.update(pixels=pixels, meta=img.meta.to_json(), header=img.header or b"", frames=len(pixels))
        except NotAnImageObject as exc:
            row.update(status="ignored", error=exc.reason, pixels=NO_PIXELS, output_key="", item_id="")
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the reason
            row.update(status="error", error=_reason(exc), pixels=NO_PIXELS)
        if row["error"]:
            row["error"] = sanitize_reason(row["error"], key=row["key"], secrets=phi_values(data))
        row["seconds"] += time.perf_counter() - t0
        return row

    def _check_limits(self, probe) -> None:
        from medsr_dist.io.image import ImageDecodeError

        spec, scale = self.spec, float(self.spec.params["outscale"])
        frames = f" x {probe.frames} frames" if probe.frames > 1 else ""
        if probe.pixels > spec.max_input_pixels:
            raise ImageDecodeError("input", f"{probe.height} x {probe.width}{frames} = {probe.pixels:,} pixels exceeds "
                                            f"enhance.max_input_pixels {spec.max_input_pixels:,}; not decoded")
        out_h, out_w = max(1, round(probe.height * scale)), max(1, round(probe.width * scale))
        out_pixels = probe.frames * out_h * out_w
        if out_pixels > spec.max_output_pixels:
            raise ImageDecodeError("input", f"output at x{scale:g} would be {out_h} x {out_w}{frames} = {out_pixels:,} "
                                            f"pixels, over enhance.max_output_pixels {spec.max_output_pixels:,}; "
                                            f"not decoded")


def _identity(spec: JobSpec, key: str) -> tuple[str, dict]:
    """(model sha256, parameters) an input's output is keyed by: the volume model's for volume items."""
    if spec.volumes is not None and spec.volumes["model"] is not None and _is_volume_key(key):
        return spec.volumes["model"].sha256, spec.volumes["params"]
    return spec.model.sha256, spec.params


def _row_model(spec: JobSpec, key: str) -> dict:
    """``model_name``, ``model_sha256`` and ``params`` of an input's manifest row: the volume model's
    (``enhance.volumes.checkpoint``, or enhance.checkpoint when it is the scale-1 one) and the volume parameters
    for volume items, empty when no volume model is available (the row's error says why); the job model's else."""
    if spec.volumes is not None and _is_volume_key(key):
        vm = spec.volumes["model"]
        return {"model_name": vm.name if vm is not None else "", "model_sha256": vm.sha256 if vm is not None else "",
                "params": json.dumps(spec.volumes["params"], sort_keys=True)}
    return {"model_name": spec.model.name, "model_sha256": spec.model.sha256, "params": spec.params_json}


def _volume_job(cfg, storage, model, entries, precision) -> dict | None:
    from medsr_dist.mri.nightly import plan_volume_job

    return plan_volume_job(cfg, storage, model, entries, precision)


def _commit_volume(spec, item: dict, row: dict) -> dict:
    from medsr_dist.mri.nightly import commit_volume

    return commit_volume(spec, item, row)


def _is_volume_key(key: str) -> bool:
    from medsr_dist.mri.nightly import is_volume_key

    return is_volume_key(key)


def _reason(exc: BaseException) -> str:
    from medsr_dist.io.image import ImageDecodeError
    from medsr_dist.pacs.dicomweb import PacsError

    if isinstance(exc, ImageDecodeError):
        return exc.reason
    if isinstance(exc, PacsError):  # names the endpoint, the request, the HTTP status and the PACS's reason
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def stored_maxval(meta_json: str) -> int:
    """The stored value meaning 1.0 for an image of this ``ImageMeta`` (255, 65535 or DICOM 2**BitsStored - 1)."""
    from medsr_dist.io.image import ImageMeta

    return ImageMeta.from_json(meta_json).maxval


def quantize(image: np.ndarray, maxval: int, *, in_place: bool = False) -> np.ndarray:
    """(H, W[, C]) float in [0, 1] -> (H, W, C) uint16 ``rint(p * maxval)``: exactly the values ``encode_image``
    writes for ``p``, and ``q / maxval`` encodes to ``q`` again (float32 error << 0.5 for maxval <= 65535).

    ``in_place=True`` reuses a writable float32 ``image`` as scratch (it is overwritten), saving a full-size float
    copy: 256 MB for a 2048 x 2048 input at x4. NaN would become 0 here: check :func:`non_finite` first."""
    if image.ndim == 2:
        image = image[:, :, None]
    if in_place and image.dtype == np.float32 and image.flags.writeable:
        q = np.clip(image, 0.0, 1.0, out=image)
        q *= np.float32(maxval)
    else:
        q = np.clip(image, 0.0, 1.0) * np.float32(maxval)
    return np.rint(q, out=q).astype(np.uint16)


def non_finite(image: np.ndarray) -> int:
    """How many values of a float image are NaN or +-Inf (0 for a usable model output). A float64 sum answers the
    usual case without a full-size boolean temporary; only a failing image is counted element by element."""
    if math.isfinite(float(np.sum(image, dtype=np.float64))):
        return 0
    flat = image.reshape(-1)
    step = 1 << 22
    return int(sum(np.count_nonzero(~np.isfinite(flat[i:i + step])) for i in range(0, flat.size, step)))


#: Messages of errors after which a CUDA context (and so the process) is unusable: cudaErrorIllegalAddress,
#: device-side asserts, launch failures, ECC errors, cuBLAS/cuDNN execution failures, NCCL, ONNX Runtime's CUDA EP.
FATAL_DEVICE_MARKERS = (
    "cuda error", "cudaerror", "cuda failure", "cudnn failure", "cublas_status_execution_failed",
    "cublas_status_internal_error", "cudnn_status_execution_failed", "cudnn_status_internal_error",
    "cudnn_status_mapping_error", "device-side assert", "illegal memory access", "unspecified launch failure",
    "misaligned address", "illegal instruction", "uncorrectable ecc error", "nccl error", "cuda driver",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the GPU context unusable, so the replica must restart rather than go on with the
    next image: torch's ``AcceleratorError`` and the CUDA/cuDNN/cuBLAS/NCCL failures of :data:`FATAL_DEVICE_MARKERS`
    (by type name and message: works without a GPU and for any runtime). Out-of-memory is not fatal (the next,
    smaller image may fit); nor is anything else (a bad image fails alone)."""
    names = {t.__name__ for t in type(exc).__mro__}
    text = str(exc).lower()
    if "OutOfMemoryError" in names or "out of memory" in text:
        return False
    if "AcceleratorError" in names:
        return True
    return any(marker in text for marker in FATAL_DEVICE_MARKERS)


def enhance_rows(replica: ModelReplica, rows: list[dict], *, log_keys: bool = False,
                 outscale: float | None | object = SETTINGS) -> Iterator[dict]:
    """Each todo row (ReadDecode's: ``pixels`` (F, H, W, C) float32 in [0, 1], ``meta``, ``key``, ``seconds``)
    through ``replica`` (every frame; tiles batched across frames and rows), in order, as it completes, with
    ``output`` (F, H*s, W*s, C) uint16 stored values (:func:`quantize`). A row with a failed or non-finite frame
    becomes an error row (no output, pixels dropped). ``outscale``: left out, the replica's. What the job's own
    replicas and a Serve deployment (``enhance.replicas: serve:<app>``) both run.

    Raises:
        What :func:`is_fatal_device_error` calls fatal (the process must restart); every other failure is a row's.
    """
    order = [(i, f) for i, row in enumerate(rows) for f in range(len(row["pixels"]))]
    frames = [rows[i]["pixels"][f] for i, f in order]  # views, no copies
    t0 = time.perf_counter()
    bad, failure = 0, None
    for index, out in replica.enhance_each(frames, outscale=outscale, reraise=is_fatal_device_error):
        i, f = order[index]
        row = rows[i]
        n_frames = len(row["pixels"])
        if isinstance(out, NonFiniteOutput):
            bad += out.count
        elif isinstance(out, BaseException):
            failure = failure or out
        elif not bad and failure is None:
            if f == 0:
                row["output"] = np.empty((n_frames, out.shape[0], out.shape[1], row["pixels"].shape[-1]),
                                         np.uint16)
            row["output"][f] = quantize(out, stored_maxval(str(row["meta"])), in_place=True)
        del out
        if f == n_frames - 1:
            if failure is not None:
                row.update(status="error", error=sanitize_reason(
                    f"inference failed: {type(failure).__name__}: {failure}", key=str(row["key"])))
            elif bad:  # NaN/Inf would be written as black: nothing is written
                log.warning("%s: the model output %d non-finite values", item_label(row, log_keys), bad)
                row.update(status="error", error=str(NonFiniteOutput(bad)))
            if failure is not None or bad:
                row = {**row, "pixels": NO_PIXELS, "header": b""}
                row["output"] = NO_OUTPUT
            row["seconds"] = float(row["seconds"]) + time.perf_counter() - t0
            bad, failure = 0, None
            yield row
            t0 = time.perf_counter()


class EnhanceReplica:
    """Stage 2 (actor pool): one model replica (:class:`~medsr_dist.infer.replica.ModelReplica`: the model file's
    backend running the tiled engine, with per-image retry and the finiteness check) on every ``todo`` row.

    Yields the batch's skipped/error rows at once, then each image as soon as it is done (so only the image being
    blended and the current tile batch are held, not the whole batch's outputs). Every frame of a multi-frame row
    goes through the engine like an image of its own (tiles batched across frames and images) and is restacked.
    Adds the column ``output``: (F, H*s, W*s, C) uint16 stored values (see :func:`quantize`), and turns rows whose
    inference failed or gave NaN/Inf into errors (a failing batch is retried frame by frame, so one bad image fails
    alone). Other columns pass through. A fatal device error (:func:`is_fatal_device_error`) ends this process
    (exit :data:`FATAL_DEVICE_EXIT`) so that Ray restarts the actor; the job retries its batch alone.
    """

    def __init__(self, model: ModelFile, storage_cfg: StorageConfig, e: EnhanceConfig, precision: str | None = None):
        """``precision``: the one the job's output keys record (default ``enhance.precision``). A replica that
        would run another (e.g. a CPU node without bf16 hardware in a cluster whose driver has it) refuses to
        start (:class:`~medsr_dist.infer.replica.PrecisionMismatch`) rather than write outputs whose provenance
        is wrong."""
        from medsr_dist.infer.replica import EngineSettings, ModelReplica, PrecisionMismatch

        settings = EngineSettings.of(e, precision=precision or e.precision)
        try:
            self.replica = ModelReplica.load(model, Storage(storage_cfg), settings)
        except PrecisionMismatch as exc:
            raise PrecisionMismatch(f"enhance.{exc}") from None  # names the config key
        self.log_keys = bool(getattr(e, "log_keys", False))
        from medsr_dist.infer.diffusion_backend import samples_uncertainty

        # K > 1 diffusion samples: each image's std tiles are kept until its std map is blended (see _uncertainty)
        self.uncertainty = samples_uncertainty(self.replica.backend)
        if self.uncertainty:
            self.replica.backend.keep_std = True
        from medsr_dist.mri.nightly import VolumeReplicas  # volume items' model, loaded on the first volume

        self.volumes = VolumeReplicas(self.replica, storage_cfg, e, settings.precision)
        log.info("model replica ready: %r, %s", self.replica.backend, self.replica.spec)

    @property
    def backend(self):
        """The replica's :class:`~medsr_dist.infer.backends.Backend`."""
        return self.replica.backend

    def __call__(self, batch: dict) -> Iterator[dict]:
        rows = _rows(batch)
        for row in rows:
            row["output"] = NO_OUTPUT
            row["std"], row["uncertainty_p99"] = NO_STD, math.nan  # filled by _uncertainty (K > 1 samples)
        todo = [row for row in rows if row["status"] == "todo"]
        passing = [row for row in rows if row["status"] != "todo"]
        if passing:
            yield _columns([self._drop_pixels(r) for r in passing])
        for row in [r for r in todo if r.get("kind") == "volume"]:  # reconstructed one by one (mri/nightly.py)
            yield _columns([self._volume(row)])
        todo = [row for row in todo if row.get("kind") != "volume"]
        done = 0
        try:
            for row in self._enhance(todo):
                done += 1
                yield _columns([row])
        except Exception as exc:  # only fatal device errors get here: ModelReplica retries the rest
            self._restart_if_fatal(exc, todo[done] if done < len(todo) else {})
            raise

    def _enhance(self, rows: list[dict]) -> Iterator[dict]:
        enhanced = enhance_rows(self.replica, rows, log_keys=self.log_keys)
        return self._uncertainty(enhanced) if self.uncertainty else enhanced

    def _uncertainty(self, rows: Iterator[dict]) -> Iterator[dict]:
        """Each enhanced row with its std map: ``std`` (F, H', W') uint16 (:func:`~medsr_dist.infer.diffusion_backend.std_to_png16`,
        65535 = a std of 0.25 of the range) and ``uncertainty_p99`` (of the float map), computed from the std
        tiles the sampler kept for it, blended by the engine like the image (no second sampling). A row whose map
        cannot be made becomes an error row: an output asked with K samples is not written without its map."""
        from medsr_dist.infer.diffusion_backend import std_map, std_to_png16, uncertainty_p99

        backend, spec, outscale = self.replica.backend, self.replica.spec, self.replica.settings.outscale
        try:
            for row in rows:
                if row["status"] == "todo" and len(row["output"]):
                    try:
                        maps = np.stack([std_map(backend, frame, spec, outscale=outscale) for frame in row["pixels"]])
                        row.update(std=std_to_png16(maps), uncertainty_p99=uncertainty_p99(maps))
                    except Exception as exc:  # noqa: BLE001 - this row fails alone
                        row.update(status="error", error=f"uncertainty map failed: {type(exc).__name__}: {exc}",
                                   output=NO_OUTPUT, std=NO_STD)
                        row = self._drop_pixels(row)
                yield row
        finally:
            backend.clear_std()  # tiles of failed rows; every image's own were consumed by its map

    def _volume(self, row: dict) -> dict:
        """One volume row reconstructed, or an error row (a fatal device error ends the process)."""
        try:
            return self.volumes.enhance(row)
        except Exception as exc:  # noqa: BLE001 - this volume fails alone
            self._restart_if_fatal(exc, row)
            log.warning("%s: volume reconstruction failed (%s)", item_label(row, self.log_keys), type(exc).__name__)
            row.update(status="error", error=sanitize_reason(f"inference failed: {type(exc).__name__}: {exc}",
                                                             key=str(row["key"])))
            return {**self._drop_pixels(row), "output": NO_OUTPUT}

    def _restart_if_fatal(self, exc: BaseException, row: dict) -> None:
        if is_fatal_device_error(exc):
            log.error("fatal device error on %s (%s); ending this replica so Ray starts a fresh one",
                      item_label(row, self.log_keys) if row else "a batch", type(exc).__name__)
            self._restart()

    def _restart(self) -> None:  # pragma: no cover - ends the process; tests replace it
        logging.shutdown()
        os._exit(FATAL_DEVICE_EXIT)

    @staticmethod
    def _drop_pixels(row: dict) -> dict:
        return {**row, "pixels": NO_PIXELS, "header": b""}


#: How long a job item waits, all retries together, on a Serve application at capacity or without a healthy
#: replica before it becomes an error row (the next run tries it again).
SERVE_WAIT_S = 600.0
#: The app's deployment-info keys held against the job's parameters (label, param key).
_SERVE_PARAMS = (("enhance.tile", "tile"), ("enhance.tile_overlap", "tile_overlap"),
                 ("enhance.tile_blend", "tile_blend"), ("enhance.backend", "backend"),
                 ("enhance.precision (as run)", "precision"), ("engine revision (medsr-dist version)", "engine"))


def serve_deployment(e: EnhanceConfig, model: ModelFile, params: dict) -> tuple[str, str]:
    """``enhance.replicas: serve:<app>``: ``(app, deployment)`` of the running Serve application's model deployment
    that serves ``model`` (same sha256) with the job's ``params`` (:func:`enhance_params`).

    Outputs are keyed and labelled by the model's hash and these parameters, so they must be what computes them.

    Raises:
        ValueError: Ray is not initialised; no application of that name is running; it serves no model with this
            sha256 (the message lists what it serves); its deployment runs other parameters (each key with both
            values) or is unhealthy.
    """
    import ray
    from ray import serve

    app = e.replicas.split(":", 1)[1]
    where = f"enhance.replicas serve:{app}"
    if not ray.is_initialized():
        raise ValueError(f"{where}: needs the Ray cluster the application runs on (ray.address)")
    apps = serve.status().applications
    if app not in apps:
        raise ValueError(f"{where}: no Serve application {app!r} is running on this Ray cluster (running: "
                         f"{sorted(apps) or 'none'}); start it with `medsr serve` or `serve deploy`")
    state = apps[app]
    if state.status != "RUNNING":
        raise ValueError(f"{where}: the application is {state.status}, not RUNNING ({state.message[:200]})")
    served = []
    for name in sorted(state.deployments):
        if not name.startswith("model-"):  # medsr_dist.serve.app.model_deployment_name
            continue
        try:
            served.append((name, serve.get_deployment_handle(name, app_name=app).info.remote().result(timeout_s=60)))
        except Exception as exc:  # noqa: BLE001 - the reason is the error
            raise ValueError(f"{where}: deployment {name} does not answer ({type(exc).__name__})") from None
    match = [(name, info) for name, info in served if info.get("model_sha256") == model.sha256]
    if not match:
        listed = ", ".join(f"{info.get('model')} (sha256 {str(info.get('model_sha256'))[:12]})" for _, info in served)
        raise ValueError(f"{where}: the application serves {listed or 'no model'}, not enhance.checkpoint "
                         f"{model.name} (sha256 {model.sha256[:12]}); outputs are keyed by the model's sha256")
    name, info = match[0]
    if int((model.sampling or {}).get("samples", 1)) > 1:
        raise ValueError(f"{where}: enhance.sampling.samples > 1 asks for an uncertainty map beside each output, "
                         f"which only the job's own replicas compute (enhance.replicas: local)")
    checks = list(_SERVE_PARAMS)
    if params.get("sampling") is not None or info.get("sampling") is not None:
        checks.append(("enhance.sampling", "sampling"))
    diff = [f"{label}: the job {params.get(key)!r}, the app {info.get(key)!r}" for label, key in checks
            if params.get(key) != info.get(key)]
    if diff:
        raise ValueError(f"{where}: deployment {name} runs other parameters than the job's outputs would be keyed "
                         f"by ({'; '.join(diff)}); set them equal")
    if not info.get("healthy", True):
        raise ValueError(f"{where}: deployment {name} is unhealthy: {info.get('unhealthy_reason')}")
    return app, name


class ServeReplica:
    """Stage 2 with ``enhance.replicas: serve:<app>``: :class:`EnhanceReplica`'s row contract, computed by a running
    Serve application's model deployment (:meth:`medsr_dist.serve.model.SRModel.enhance_item`, the same
    :func:`enhance_rows`) through a DeploymentHandle; tiles of the job's images and of on-demand requests share the
    app's model calls. This actor holds no model: it sends and waits.

    Every todo row of a batch is sent at once; rows come back in order. A row whose call died with its Serve
    replica (or met a fatal device error there) is not yielded: the job retries it alone and counts it, exactly as
    when one of its own replicas dies. A full queue or an unhealthy replica is waited out (at most
    :data:`SERVE_WAIT_S`, then an error row).
    """

    def __init__(self, app: str, deployment: str, outscale: float | None, log_keys: bool = False):
        from ray import serve

        self.app, self.deployment, self.outscale, self.log_keys = app, deployment, outscale, log_keys
        self.handle = serve.get_deployment_handle(deployment, app_name=app)

    def _send(self, row: dict):
        return self.handle.enhance_item.remote(row["pixels"], str(row["meta"]), str(row.get("item_id", "")),
                                               self.outscale)

    def __call__(self, batch: dict) -> Iterator[dict]:
        rows = _rows(batch)
        for row in rows:
            row["output"] = NO_OUTPUT
        todo = [row for row in rows if row["status"] == "todo"]
        passing = [row for row in rows if row["status"] != "todo"]
        if passing:
            yield _columns([{**r, "pixels": NO_PIXELS, "header": b""} for r in passing])
        for row in [r for r in todo if r.get("kind") == "volume"]:  # the app's replicas run 2-D images only
            yield _columns([{**row, "status": "error", "pixels": NO_PIXELS, "header": b"", "error": (
                "volumes are reconstructed only by the job's own replicas (enhance.replicas: local), not through "
                f"serve:{self.app}")}])
        todo = [row for row in todo if row.get("kind") != "volume"]
        for row, response in [(row, self._send(row)) for row in todo]:
            answer = self._answer(row, response)
            if answer is None:
                continue  # lost with its replica
            row["seconds"] = float(row["seconds"]) + float(answer.get("seconds", 0.0))
            if answer["status"] == "todo":
                row["output"] = answer["output"]
            else:
                row = {**row, "status": "error", "error": sanitize_reason(str(answer["error"]), key=str(row["key"])),
                       "pixels": NO_PIXELS, "header": b"", "output": NO_OUTPUT}
            yield _columns([row])

    def _answer(self, row: dict, response) -> dict | None:
        """The deployment's answer for ``row`` (resent while the app is at capacity); None: lost with a replica."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        label = item_label(row, self.log_keys)
        deadline = time.monotonic() + SERVE_WAIT_S
        while True:
            try:
                answer = response.result()
            except BackPressureError as exc:
                wait = float(exc.retry_after_s or 1.0)
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as exc:
                log.warning("%s: lost with its Serve replica (%s); retried alone", label, type(exc).__name__)
                return None
            except Exception as exc:  # noqa: BLE001 - the app failed this item: its error row
                return {"status": "error", "error": f"Serve application {self.app}: {type(exc).__name__}: {exc}"}
            else:
                if answer["status"] == "lost":
                    log.warning("%s: %s on its Serve replica; retried alone", label, answer["error"])
                    return None
                if answer["status"] != "unavailable":
                    return answer
                wait = 1.0
            if time.monotonic() + wait > deadline:
                return {"status": "error", "error": f"Serve application {self.app} ({self.deployment}) was at "
                                                    f"capacity or unavailable for {SERVE_WAIT_S:.0f} s; not enhanced"}
            time.sleep(wait)
            response = self._send(row)


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
        listed = {"input_version": str(item.get("input_version", "")), "attempts": int(item.get("attempts", 0))}
        if status == "skipped":
            try:
                record = _manifest_row(json.loads(str(item["record"])))
                return {**record, "status": "skipped", "input_version": listed["input_version"] or
                        record["input_version"], "input_bytes": int(item["input_bytes"]) or record["input_bytes"]}
            except Exception as exc:  # noqa: BLE001 - an unreadable record: report, the next run redoes it
                status, item = "error", {**item, "error": f"unreadable item record: {_reason(exc)}"}
        row = _manifest_row({
            "input_key": str(item["key"]), "input_sha256": str(item["input_sha256"]), "output_key": str(item["output_key"]),
            "item_id": str(item["item_id"]), "status": status, "error": str(item["error"]),
            **_row_model(spec, str(item["key"])),
            "input_format": str(item["input_format"]), "input_bytes": int(item["input_bytes"]),
            "frames": int(item.get("frames", 0)), "seconds": float(item["seconds"]), "run_id": spec.run_id, **listed,
        })
        if status == "todo":
            t0 = time.perf_counter()
            try:
                row.update(self._commit(item, row) if item.get("kind") != "volume" else _commit_volume(spec, item, row))
            except Exception as exc:  # noqa: BLE001 - the output may exist without a record: the next run redoes it
                row.update(status="error", error=sanitize_reason(
                    f"encode/write failed: {_reason(exc)}", key=row["input_key"],
                    secrets=phi_values(bytes(item["header"]) or None)))
            row["seconds"] += time.perf_counter() - t0
        if row["status"] != "done":
            row["output_key"] = row["uncertainty_key"] = ""  # nothing was (completely) written for this row
            row["attempts"] = listed["attempts"]
        else:
            row["attempts"] = 0
        row["finished_at"] = _now()
        return row

    def _commit(self, item: dict, row: dict) -> dict:
        from medsr_dist.io.image import ImageMeta, encode_image

        spec = self.spec
        src = np.asarray(item["pixels"])  # (F, H, W, C)
        meta = ImageMeta.from_json(str(item["meta"]))
        out = np.asarray(item["output"]).astype(np.float32) / np.float32(meta.maxval)  # (F, H', W', C)
        if out.shape[0] != src.shape[0] or out.ndim != 4:
            raise ValueError(f"the replica returned {out.shape[0]} frames for {src.shape[0]}")
        if not _under(row["output_key"], spec.output):
            raise ValueError(f"output key {row['output_key']} is not under the output prefix {spec.output}")
        nominal = spec.params["outscale"]
        provenance = self.provenance(row["input_key"], row["input_sha256"], f"{nominal:g}")
        # the grid got finer by exactly this much (rounding of non-integer outscales included)
        scale = out.shape[1] / src.shape[1]
        frames = out if getattr(meta, "frames", 1) > 1 else out[0]
        kwargs = {"dicom_compression": spec.dicom_compression} if spec.dicom_compression != "none" else {}
        data = encode_image(frames, meta, bytes(item["header"]) or None, scale=scale, provenance=provenance, **kwargs)
        uncertainty = self._write_uncertainty(item, row, meta, scale, provenance)  # before the output: see the record
        spec.storage.write_bytes(row["output_key"], data)  # atomic; a DICOMweb output: STOW-RS unless it is there
        score = consistency_psnr(out, src)
        flag_std = spec.uncertainty_threshold is not None and uncertainty.get("uncertainty_p99", 0.0) > spec.uncertainty_threshold
        done = {**uncertainty,
            "status": "done", "provenance": json.dumps(provenance, sort_keys=True), "bits_stored": meta.bits_stored,
            "channels": meta.channels, "output_bytes": len(data), "input_height": src.shape[1],
            "input_width": src.shape[2], "output_height": out.shape[1], "output_width": out.shape[2],
            "consistency_psnr_db": score, "flagged": bool(score < spec.threshold_db or flag_std), "finished_at": _now(),
            "frames": int(src.shape[0]),
        }
        record = {**row, **done, "seconds": row["seconds"]}
        # written only after the output is complete: its presence means "done"
        spec.storage.write_bytes(item_record_uri(spec.records, row["item_id"]), json.dumps(record).encode())
        return done

    def _write_uncertainty(self, item: dict, row: dict, meta, scale: float, provenance: dict) -> dict:
        """Write the row's std map (K > 1 diffusion samples) beside its output: ``<output stem>.std.png`` (16-bit
        gray, 65535 = a std of 0.25 of the intensity range, the output's provenance + what the values mean) or,
        for DICOM input, ``<output stem>.std.dcm``: a derived object of its own series
        (:func:`~medsr_dist.infer.diffusion_backend.uncertainty_dicom`). Returns the manifest fields
        (``uncertainty_p99``, ``uncertainty_key``), or {} for rows without a map."""
        std = np.asarray(item.get("std", NO_STD))
        if not std.size:
            return {}
        from medsr_dist.infer.diffusion_backend import STD_FULL_SCALE, uncertainty_dicom
        from medsr_dist.io.image import ImageMeta, encode_image

        samples = int((self.spec.params.get("sampling") or {}).get("samples", 0))
        stem, _ = posixpath.splitext(row["output_key"])
        text = {**provenance, "medsr:uncertainty": (
            f"per-pixel standard deviation of {samples} diffusion samples of {posixpath.basename(row['output_key'])}; "
            f"stored 65535 = a std of {STD_FULL_SCALE:g} of the intensity range; a hallucination-risk indicator, "
            f"not an error bar")}
        if meta.format == "dicom":
            data = uncertainty_dicom(std, bytes(item["header"]), text, scale=scale, samples=samples,
                                     compression=self.spec.dicom_compression)
            key = _std_instance_uri(self.spec.output, data) if is_dicomweb(self.spec.output) else stem + ".std.dcm"
        else:
            key = stem + ".std.png"
            png = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
            data = encode_image(std[0].astype(np.float32) / np.float32(65535), png, provenance=text)
        if not _under(key, self.spec.output):
            raise ValueError(f"uncertainty key {key} is not under the output prefix {self.spec.output}")
        self.spec.storage.write_bytes(key, data)
        return {"uncertainty_p99": float(item["uncertainty_p99"]), "uncertainty_key": key}


def _std_instance_uri(output: str, data: bytes) -> str:
    """Where an uncertainty map (a derived object of its own series, deterministic UIDs) lands at the DICOMweb
    ``output``: its own study/series/instance URI — a PACS stores objects by UID, not beside a file name."""
    import pydicom

    from medsr_dist.pacs.dicomweb import Endpoint, InstanceRef

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    endpoint, _ = Endpoint.parse(output)
    return InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)).uri(endpoint)


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
    """The cumulative manifest after a run: one row per completed output (by item id), newest wins, plus the
    ledger: one row per input key whose latest outcome was ``ignored``, ``quarantined`` or a replica-killing
    ``error`` (``attempts`` > 0) — what the next run needs to leave an unchanged input alone.

    Starts from the previous ``manifest.parquet`` (rebuilt from the item records if it is missing or unreadable),
    adds this run's ``done`` rows (``skipped`` rows refresh their output's size/version), and reads the records of
    any item the two do not know (outputs of a killed run that this run did not list again) — so a listing of the
    records, not a read of each, is the usual cost.
    """
    uri = manifest_uri(output_prefix)
    known: dict[str, dict] = {}
    ledger: dict[str, dict] = {}
    if storage.exists(uri):
        try:
            for r in read_manifest(storage, uri):
                if r["status"] == "done" and r["item_id"]:
                    known[r["item_id"]] = r
                elif r["status"] in LEDGER_STATUSES or r["attempts"]:
                    ledger[r["input_key"]] = r
        except Exception as exc:  # noqa: BLE001 - rebuilt below from the records
            log.warning("cumulative manifest unreadable (%s); rebuilding it from the item records", type(exc).__name__)
    for row in run_rows:
        if row["status"] in ("done", "skipped") and row["item_id"]:
            known[row["item_id"]] = {**row, "status": "done"}
            ledger.pop(row["input_key"], None)
        elif row["status"] in LEDGER_STATUSES or (row["status"] == "error" and row["attempts"]):
            ledger[row["input_key"]] = row
        elif row["status"] == "error":
            ledger.pop(row["input_key"], None)  # changed since, and now failing for another reason
    items_dir = Storage.join(output_prefix, MANIFEST_DIR, "items")
    if storage.exists(items_dir):
        for record_uri in storage.list_files(items_dir, include=["*.json"]):
            iid = posixpath.basename(record_uri)[: -len(".json")]
            if iid not in known:
                try:
                    known[iid] = _manifest_row(json.loads(storage.read_bytes(record_uri)))
                except Exception as exc:  # noqa: BLE001
                    log.warning("item record of item %s unreadable (%s); left out of the manifest", iid,
                                type(exc).__name__)
    return sorted([*known.values(), *ledger.values()], key=lambda r: (r["input_key"], r["finished_at"]))


#: Statuses the cumulative manifest keeps per input key, so that an unchanged input is not read again.
LEDGER_STATUSES = ("ignored", "quarantined")


def remove_stale_partials(storage: Storage, output_prefix: str) -> list[str]:
    """Delete in-flight temp files that a killed run left under a local output prefix; returns their paths.

    Call only while holding the prefix's lease: a live run's temp files look the same. Object stores need
    nothing: an upload that never completed leaves no visible object.
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
    log_keys: bool = False
    read_items: int = 0  # input reads (items sent to the pipeline; one retried alone twice); the rest: from the manifest

    @property
    def n_errors(self) -> int:
        return self.counts.get("error", 0)

    def label(self, row: dict) -> str:
        """How to name ``row``'s item in logs (see :func:`item_label`)."""
        return item_label(row, self.log_keys)


def list_inputs(storage: Storage, e: EnhanceConfig, *, watermark: str | None = None) -> list[FileEntry]:
    """Input files under ``enhance.input`` matching include/exclude, with size and version, minus anything under
    the output prefix — however either prefix is spelled (``file://`` or a plain path, ``./``, trailing ``/``).

    A DICOMweb input (``storage`` a :class:`~medsr_dist.pacs.storage.PacsStorage`) is the QIDO-RS query
    ``pacs.query`` (``watermark``: the first StudyDate with ``since_watermark``), which leaves out the series
    medsr-dist derived, so input and output may be the same PACS; include/exclude match
    ``studies/<S>/series/<R>/instances/<I>``. An empty answer is a night with nothing new (no error).

    Raises:
        ValueError: the input lies inside the output prefix.
        FileNotFoundError: nothing to enhance (files).
        PacsError: the PACS cannot be queried.
    """
    if is_dicomweb(e.input):
        return storage.entries(e.input, storage.query(e.input, watermark=watermark), e.include, e.exclude)
    if _under(e.input, e.output):
        raise ValueError(f"enhance.input {e.input} lies inside enhance.output {e.output}: outputs would be "
                         f"enhanced again; choose an output prefix outside the archive's input")
    entries = [f for f in storage.list_entries(e.input, include=e.include, exclude=e.exclude)
               if not _under(f.uri, e.output)]
    if not entries:
        raise FileNotFoundError(f"enhance.input: no files under {e.input} match include={e.include} exclude={e.exclude}")
    return entries


@dataclass
class _Plan:
    """What the driver decided per listed input before any Ray work."""

    rows: list[dict]  # finished without Ray: skipped from the index, quarantined, ignored, refused keys
    todo: list[dict]  # {"key", "size", "version", "attempts"} for the pipeline, batch-mates allowed
    alone: list[dict]  # the same, for inputs that killed a replica before: one per block from the start


def plan_run(storage: Storage, spec: JobSpec, entries: list[FileEntry]) -> _Plan:
    """Sort listed inputs by what the cumulative manifest knows of them, reading no input.

    An input whose (key, size, version) matches a ``done`` row of this model and parameters whose output is
    still listed is ``skipped``; one matching a ``quarantined`` or ``ignored`` row keeps that status; one
    matching an ``error`` row with attempts goes to the pipeline alone with its count; every other input
    (new, changed, or indexed by an older manifest without versions) goes to the pipeline, which hashes it.
    """
    done: dict[str, list[dict]] = {}
    ledger: dict[str, dict] = {}
    uri = manifest_uri(spec.records)
    if storage.exists(uri):
        try:
            for r in read_manifest(storage, uri):
                if r["status"] == "done":
                    done.setdefault(r["input_key"], []).append(r)
                elif r["status"] in LEDGER_STATUSES or r["attempts"]:
                    ledger[r["input_key"]] = r
        except Exception as exc:  # noqa: BLE001 - every input is then hashed, as on a first night
            log.warning("cumulative manifest unreadable (%s); every input is read again", type(exc).__name__)
    outputs = _listed_outputs(storage, spec, done, entries) if done else set()
    plan = _Plan([], [], [])
    for entry in entries:
        key, base = entry.uri, {"key": entry.uri, "size": entry.size, "version": entry.version, "attempts": 0}
        unchanged = lambda r: r["input_version"] == entry.version and (  # noqa: E731
            r["input_bytes"] == entry.size or entry.version.startswith(PACS_VERSION))  # QIDO-RS gives no size
        try:
            rel = _rel_key(spec, key)
        except ValueError as exc:
            plan.rows.append(_manifest_row({
                "input_key": key, "status": "error", "error": sanitize_reason(str(exc), key=key), "run_id": spec.run_id,
                **_row_model(spec, key),
                "input_bytes": entry.size, "input_version": entry.version, "finished_at": _now()}))
            continue
        hit = next((r for r in done.get(key, []) if unchanged(r) and r["output_key"] in outputs
                    and item_record_uri(spec.records, r["item_id"]) in outputs
                    and r["item_id"] == item_id(rel, output_id(r["input_sha256"], *_identity(spec, key)))),
                   None)
        known = ledger.get(key)
        if hit is not None:
            plan.rows.append({**hit, "status": "skipped"})
        elif known is not None and unchanged(known) and known["status"] in LEDGER_STATUSES:
            plan.rows.append({**known, "run_id": spec.run_id, "finished_at": _now()})
        elif known is not None and unchanged(known) and known["attempts"]:
            plan.alone.append({**base, "attempts": int(known["attempts"])})
        else:
            plan.todo.append(base)
    return plan


def _listed_outputs(storage: Storage, spec: JobSpec, done: dict[str, list[dict]], entries: list[FileEntry]) -> set[str]:
    """The outputs and item records that exist, of the ``done`` rows of the listed inputs: a listing of the output
    prefix (and of the records' folder when the manifest lives elsewhere); a DICOMweb output is asked with one
    QIDO-RS per derived series."""
    if spec.output_is_pacs:
        listed = {e.uri for e in entries}
        found = storage.existing([r["output_key"] for key, rows in done.items() if key in listed for r in rows])
    else:
        found = set(storage.list_files(spec.output))
    items_dir = Storage.join(spec.records, MANIFEST_DIR, "items")
    if spec.records != spec.output and storage.exists(items_dir):
        found |= set(storage.list_files(items_dir))
    return found


def job_storage(cfg: MedsrConfig, storage: Storage | None = None) -> Storage:
    """The job's storage: ``storage`` (default: ``Storage(cfg.storage)``), as a
    :class:`~medsr_dist.pacs.storage.PacsStorage` with ``cfg.pacs`` when the input or output is a DICOMweb endpoint."""
    from medsr_dist.pacs.storage import PacsStorage

    storage = storage or Storage(cfg.storage)
    if (is_dicomweb(cfg.enhance.input) or is_dicomweb(cfg.enhance.output)) and not isinstance(storage, PacsStorage):
        storage = PacsStorage(storage.config, cfg.pacs)
    return storage


def watermark_uri(records: str) -> str:
    """Where a DICOMweb-input run stores the StudyDate the next ``pacs.query.since_watermark`` run starts from."""
    return Storage.join(records, MANIFEST_DIR, "watermark.json")


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
    from medsr_dist.pacs.storage import read_watermark

    t_start = time.perf_counter()
    storage = job_storage(cfg, storage)
    e = cfg.enhance
    model = read_model_file(e.checkpoint, cfg.storage, onnx_uri=e.onnx_model)
    model = model.with_sampling(e.sampling.overrides(), "enhance.sampling")  # ldm: the sampler settings that run
    if e.replicas == "local":  # a bad model or export fails here, not in every replica (serve:<app>: the app holds it)
        build_model_backend(model, e.backend, storage, device="cpu")
    records = (e.manifest or e.output).rstrip("/")
    mark = (read_watermark(storage, watermark_uri(records))
            if is_dicomweb(e.input) and cfg.pacs.query.since_watermark else None)
    entries = list_inputs(storage, e, watermark=mark)
    if e.volumes.enabled and e.volumes.series_folders and not is_dicomweb(e.input):
        from medsr_dist.mri.nightly import group_series  # a DICOM series folder is one volume item

        entries = group_series(entries, e.input.rstrip("/"), e.volumes.series_folders)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    lease = Lease.acquire(storage, Storage.join(records, MANIFEST_DIR, LEASE_FILE), run_id, e.lease_ttl_s)
    lease.keep_alive()
    try:
        return _run_leased(cfg, storage, model, entries, run_id, lease, progress, t_start)
    finally:
        lease.release()


def _run_leased(cfg, storage, model, entries, run_id, lease, progress, t_start) -> EnhanceResult:
    e = cfg.enhance
    removed = [p for prefix in dict.fromkeys([e.output.rstrip("/"), (e.manifest or e.output).rstrip("/")])
               for p in remove_stale_partials(storage, prefix)]
    if removed:
        log.warning("removed %d temp file(s) left by a killed run%s", len(removed),
                    (": " + ", ".join(removed)) if e.log_keys else "")
    gpu, precision = _precision(e)
    params = enhance_params(e, model, precision=precision)
    spec = JobSpec(storage=storage, input=e.input.rstrip("/"), output=e.output.rstrip("/"), model=model, params=params,
                   run_id=run_id, threshold_db=e.consistency_threshold_db, max_input_pixels=e.max_input_pixels,
                   max_output_pixels=e.max_output_pixels, log_keys=e.log_keys,
                   uncertainty_threshold=e.uncertainty_threshold,
                   dicom_compression=str(getattr(e, "dicom_compression", "none") or "none"),
                   manifest=(e.manifest or "").rstrip("/"), volumes=_volume_job(cfg, storage, model, entries, precision))
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
    lost = _run_pipeline(cfg, spec, model, precision, gpu, plan.todo, finished, alone=False, serve=target)
    retried = len(lost)
    if lost:
        log.warning("%d item(s) lost with a model replica that died; retrying each alone", len(lost))
    lost = _run_pipeline(cfg, spec, model, precision, gpu, lost + plan.alone, finished, alone=True, serve=target)
    for item in lost:
        attempts = int(item["attempts"]) + 1
        quarantined = attempts >= e.max_attempts
        reason = (f"quarantined: killed its model replica in {attempts} runs (enhance.max_attempts "
                  f"{e.max_attempts}); last: {CRASH_REASON}; not tried again until it changes" if quarantined
                  else f"{CRASH_REASON} (run {attempts} of enhance.max_attempts {e.max_attempts}; the next run "
                       f"tries it alone again)")
        finished(_manifest_row({
            "input_key": item["key"], "status": "quarantined" if quarantined else "error", "error": reason,
            **_row_model(spec, item["key"]), "run_id": run_id, "input_bytes": int(item["size"]),
            "input_version": str(item["version"]), "attempts": attempts, "finished_at": _now()}))
    rows.sort(key=lambda r: r["input_key"])

    run_manifest = run_manifest_uri(spec.records, run_id)
    write_manifest(storage, run_manifest, rows)
    cumulative = manifest_uri(spec.records)
    lease.refresh()  # still ours? (raises LeaseLostError: the cumulative manifest is the new holder's to write)
    write_manifest(storage, cumulative, merge_cumulative(storage, spec.records, rows))
    if is_dicomweb(spec.input):  # the next since_watermark run starts here (held back by this run's errors)
        from medsr_dist.pacs.storage import watermark_of_rows, write_watermark

        write_watermark(storage, watermark_uri(spec.records), watermark_of_rows(rows), run_id)
    return EnhanceResult(output=e.output, manifest=cumulative, run_manifest=run_manifest, counts=counts, rows=rows,
                         seconds=time.perf_counter() - t_start, input_pixels=pixels, log_keys=e.log_keys,
                         read_items=len(plan.todo) + len(plan.alone) + retried)


def _precision(e: EnhanceConfig) -> tuple[bool, str]:
    """(cluster has GPUs, the precision its replicas run); Ray is started by then."""
    from medsr_dist.runtime import cluster_has_gpus

    gpu = cluster_has_gpus()
    precision = runnable_precision(e.backend, e.precision, gpu=gpu)
    if precision != e.precision:
        log.warning("enhance.precision %s: %s replicas run %s; outputs record %s", e.precision,
                    "GPU" if gpu else "CPU", precision, precision)
    return gpu, precision


class ReplicasNotStartedError(RuntimeError):
    """``enhance.min_replicas`` replicas did not start within ``enhance.replica_start_timeout_s``; no item was
    read by that pass."""


def _run_pipeline(cfg, spec: JobSpec, model: ModelFile, precision: str, gpu: bool, items: list[dict],
                  finished: Callable[[dict], None], *, alone: bool, serve: tuple[str, str] | None = None) -> list[dict]:
    """ReadDecode -> EnhanceReplica -> EncodeCommit over ``items``; each finished row goes to ``finished``.
    Returns the items whose rows never came back (their block's replica died). ``alone``: one item per block
    and per replica batch, so that a replica that dies takes no batch-mate with it. ``serve``: (app, deployment)
    of :func:`serve_deployment`: :class:`ServeReplica` instead of the job's own replicas."""
    import ray

    if not items:
        return []
    e = cfg.enhance
    per_batch = 1 if alone else e.images_per_batch
    ctx = ray.data.DataContext.get_current()
    saved_errored, saved_wait = ctx.max_errored_blocks, ctx.wait_for_min_actors_s
    # A crashed replica loses its block's rows (retried alone, or counted, by the caller), not the whole run. Set
    # before the dataset exists: a Dataset keeps a copy of the context it was created under.
    ctx.max_errored_blocks = -1
    # Ray Data starts actor pools without waiting (its default -1): on CPU-only nodes the decode tasks then take
    # the CPUs a pending replica needs and the pass runs on fewer than min_replicas. Wait before any task runs.
    ctx.wait_for_min_actors_s = e.replica_start_timeout_s or -1
    try:
        return _iterate(cfg, spec, model, precision, gpu, items, finished, per_batch, alone=alone, serve=serve)
    except ray.exceptions.GetTimeoutError as err:
        if "starting actors" not in str(err):  # Ray Data's text for a pool below min_size at its deadline
            raise
        each = ("Serve client actors, 0.25 CPU each" if serve is not None else "1 GPU each" if gpu
                else f"{e.cpus_per_replica:g} CPU each")
        raise ReplicasNotStartedError(
            f"enhance.min_replicas {e.min_replicas} model replica(s) ({each}) did not all start within "
            f"enhance.replica_start_timeout_s {e.replica_start_timeout_s} s: the cluster lacks the resources for "
            "them; lower enhance.min_replicas (or enhance.cpus_per_replica), add nodes, or wait longer") from err
    finally:
        ctx.max_errored_blocks, ctx.wait_for_min_actors_s = saved_errored, saved_wait


def _pacs_bound(cfg, uri: str) -> dict:
    """map_batches arguments bounding a stage that talks to the DICOMweb endpoint ``uri``: at most
    ``pacs.concurrency`` of its tasks at once (each sends one request at a time), so the PACS sees at most that many
    WADO-RS (read stage) or STOW-RS (write stage) requests from this job, however large the cluster."""
    import ray

    return {"compute": ray.data.TaskPoolStrategy(size=cfg.pacs.concurrency)} if is_dicomweb(uri) else {}


def _iterate(cfg, spec, model, precision, gpu, items, finished, per_batch, *, alone: bool, serve=None) -> list[dict]:
    import ray

    e = cfg.enhance
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / per_batch), 20_000)))
    ds = ds.map_batches(ReadDecode(spec), batch_size=None, num_cpus=0.5, **_pacs_bound(cfg, spec.input))
    # A dead replica is restarted (max_restarts) but its task is not retried (max_task_retries=0): Ray Data's
    # default (retry forever) would feed a poison image to fresh replicas without end. Its rows come back lost.
    # Ray 2.60 warns that **ray_remote_args goes in 2.64 ("use the named remote parameters"), but names neither
    # option (map_batches, ActorPoolStrategy, DataContext); ray is pinned, and the poison test fails on an upgrade.
    if serve is not None:  # the app's replicas compute; alone: one item in flight, so none shares a death
        ds = ds.map_batches(ServeReplica, fn_constructor_args=(*serve, e.outscale, e.log_keys), batch_size=per_batch,
                            compute=ray.data.ActorPoolStrategy(min_size=1 if alone else e.min_replicas,
                                                               max_size=1 if alone else e.max_replicas,
                                                               max_tasks_in_flight_per_actor=1 if alone else None),
                            num_cpus=0.25, max_restarts=-1, max_task_retries=0)
    else:
        ds = ds.map_batches(EnhanceReplica, fn_constructor_args=(model, cfg.storage, e, precision), batch_size=per_batch,
                            # alone: one task in flight per replica too, or an innocent item queued behind a poison one
                            # on the same replica dies with it (Ray Data queues several tasks per actor by default)
                            compute=ray.data.ActorPoolStrategy(min_size=e.min_replicas, max_size=e.max_replicas,
                                                               max_tasks_in_flight_per_actor=1 if alone else None),
                            num_gpus=1 if gpu else 0, num_cpus=1 if gpu else e.cpus_per_replica,
                            max_restarts=-1, max_task_retries=0)
    ds = ds.map_batches(EncodeCommit(spec), batch_size=1, num_cpus=0.5, **_pacs_bound(cfg, spec.output))

    seen: set[str] = set()
    for raw in ds.iter_rows():
        row = _manifest_row({k: _plain(v) for k, v in raw.items()})
        seen.add(row["input_key"])
        finished(row)
    # Ray Data releases its replicas by reference counting; a replica Ray restarted after a crash outlives the
    # dataset until the dataset's references are collected, and would hold its CPUs/GPU from the next pass.
    del ds
    gc.collect()
    return [item for item in items if item["key"] not in seen]


# ----------------------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------------------
def manifest_summary(storage: Storage, output_prefix: str, manifest: str | None = None, *,
                     threshold_db: float | None = None, uncertainty_threshold: float | None = None) -> dict:
    """What ``medsr status`` prints: totals of the cumulative manifest and of the latest run.

    ``outputs`` counts completed outputs; ``ignored``/``quarantined`` count the inputs the cumulative manifest
    keeps in those states. Listed items carry ``item_id``, ``key`` and their text (error reason or output key);
    a flagged output's text says why it was flagged, against ``threshold_db`` (enhance.consistency_threshold_db)
    and ``uncertainty_threshold`` (enhance.uncertainty_threshold) when given (the config's values: the run's own
    are not recorded), else by the values the row holds.
    ``manifest``: where ``_manifest/`` lives when not under ``output_prefix`` (``enhance.manifest``; required for a
    DICOMweb output); ``watermark``: the StudyDate a DICOMweb-input run's ``since_watermark`` starts from, or None.

    Raises:
        FileNotFoundError: no manifest under ``manifest`` (or ``output_prefix``).
        ValueError: ``output_prefix`` is a DICOMweb endpoint and no ``manifest`` is given.
    """
    from medsr_dist.pacs.storage import read_watermark

    output_prefix = output_prefix.rstrip("/")
    if is_dicomweb(output_prefix) and not manifest:
        raise ValueError(f"{output_prefix} is a DICOMweb endpoint: its run's manifest lives at enhance.manifest; pass "
                         f"the run's config (-c) or enhance.manifest=<prefix>")
    records = (manifest or output_prefix).rstrip("/")
    uri = manifest_uri(records)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest at {uri}: has `medsr enhance` written to {output_prefix}?")
    every = read_manifest(storage, uri)
    rows = [r for r in every if r["status"] == "done"]
    runs_dir = Storage.join(records, MANIFEST_DIR, "runs")
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
        "ignored": sum(r["status"] == "ignored" for r in every),
        "quarantined": sum(r["status"] == "quarantined" for r in every),
        "flagged": sum(bool(r["flagged"]) for r in rows),
        "input_bytes": sum(r["input_bytes"] or 0 for r in rows),
        "output_bytes": sum(r["output_bytes"] or 0 for r in rows),
        "consistency_psnr_db": {"min": min(scores), "median": float(np.median(scores)), "max": max(scores)} if scores else None,
        "uncertainty_p99": _uncertainty_summary(rows),
        "models": by_model,
        "runs": len(runs),
        "latest_run": posixpath.basename(runs[-1])[: -len(".parquet")] if runs else None,
        "latest_run_manifest": runs[-1] if runs else None,
        "latest_counts": latest_counts,
        "latest_errors": [_listed(r, r["error"]) for r in latest if r["status"] == "error"],
        "quarantined_items": [_listed(r, r["error"]) for r in every if r["status"] == "quarantined"],
        "flagged_outputs": [(*_listed(r, r["output_key"]), _flag_reason(r, threshold_db, uncertainty_threshold))
                            for r in rows if r["flagged"]],
        "watermark": read_watermark(storage, watermark_uri(records)),
    }


def _flag_reason(row: dict, threshold_db: float | None, uncertainty_threshold: float | None) -> str:
    """Why a done row is flagged for review: its consistency PSNR below ``threshold_db``, its uncertainty_p99
    (ldm, K > 1 samples: the row has a std map) above ``uncertainty_threshold``, or both. A threshold not given
    (or one that no longer explains the flag: the config changed since the run) leaves the row's values named."""
    score = row["consistency_psnr_db"]
    p99 = row.get("uncertainty_p99") if row.get("uncertainty_key") else None
    has_score = score is not None and math.isfinite(score)
    has_p99 = p99 is not None and math.isfinite(p99)
    reasons = []
    if has_p99 and uncertainty_threshold is not None and p99 > uncertainty_threshold:
        reasons.append(f"uncertainty p99 {p99:.4f} > enhance.uncertainty_threshold {uncertainty_threshold:g}")
    if has_score and threshold_db is not None and score < threshold_db:
        reasons.append(f"consistency {score:.1f} dB < enhance.consistency_threshold_db {threshold_db:g}")
    if reasons:
        return "; ".join(reasons)
    values = ([f"consistency {score:.1f} dB"] if has_score else []) + ([f"uncertainty p99 {p99:.4f}"] if has_p99 else [])
    return ", ".join(values) + " (flagged under the thresholds of its run)"


def _uncertainty_summary(rows: list[dict]) -> dict | None:
    """Median/max ``uncertainty_p99`` of the outputs that have a std map (ldm, K > 1 samples), or None."""
    values = [r["uncertainty_p99"] for r in rows if r.get("uncertainty_key") and math.isfinite(r["uncertainty_p99"])]
    return {"outputs": len(values), "median": float(np.median(values)), "max": max(values)} if values else None


def _listed(row: dict, text: str) -> tuple[str, str, str]:
    return row["item_id"], row["input_key"], text


def format_summary(summary: dict, max_listed: int = 10, *, log_keys: bool = False) -> str:
    """Human-readable text of :func:`manifest_summary`. Items are named by item id (input keys, output keys
    and reasons that name them only with ``log_keys``: keys often embed accession numbers)."""
    gib = 1 << 30

    def name(iid: str, key: str) -> str:
        return key if log_keys else item_label({"item_id": iid, "input_key": key})

    lines = [f"output {'endpoint' if is_dicomweb(summary['output']) else 'prefix'}: {summary['output']}",
             f"outputs: {summary['outputs']} ({summary['input_bytes'] / gib:.3f} GiB in -> "
             f"{summary['output_bytes'] / gib:.3f} GiB out), flagged for review: {summary['flagged']}",
             f"inputs ignored (not images): {summary['ignored']}, quarantined: {summary['quarantined']}"]
    if summary["consistency_psnr_db"]:
        c = summary["consistency_psnr_db"]
        lines.append(f"consistency PSNR (dB): min {c['min']:.1f} · median {c['median']:.1f} · max {c['max']:.1f}")
    if summary.get("uncertainty_p99"):
        u = summary["uncertainty_p99"]
        lines.append(f"uncertainty p99 (std, fraction of the range) of {u['outputs']} outputs with a std map: "
                     f"median {u['median']:.4f} · max {u['max']:.4f}")
    for label, n in summary["models"].items():
        lines.append(f"model {label}: {n} outputs")
    if summary["latest_run"]:
        counts = ", ".join(f"{s} {summary['latest_counts'].get(s, 0)}" for s in STATUSES)
        lines.append(f"runs: {summary['runs']}; latest {summary['latest_run']}: {counts}")
        for iid, key, error in summary["latest_errors"][:max_listed]:
            lines.append(f"  error {name(iid, key)}: {error}")
        if len(summary["latest_errors"]) > max_listed:
            lines.append(f"  ... {len(summary['latest_errors']) - max_listed} more errors in {summary['latest_run_manifest']}")
    for iid, key, error in summary["quarantined_items"][:max_listed]:
        lines.append(f"  quarantined {name(iid, key)}: {error}")
    for iid, key, output_key, why in summary["flagged_outputs"][:max_listed]:
        lines.append(f"  flagged {output_key if log_keys else name(iid, key)}: {why}")
    if len(summary["flagged_outputs"]) > max_listed:
        lines.append(f"  ... {len(summary['flagged_outputs']) - max_listed} more flagged in the manifest")
    if summary.get("watermark"):
        lines.append(f"PACS watermark (next since_watermark run starts at StudyDate): {summary['watermark']}")
    lines.append(f"manifest: {summary['manifest']}")
    return "\n".join(lines)
