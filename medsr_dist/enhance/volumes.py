"""Volume items of the nightly job (`medsr enhance`): NIfTI volumes and DICOM series beside the 2-D images.

**What an item is.** With ``enhance.volumes.enabled`` (default), a key ending in ``.nii``/``.nii.gz`` is a volume
item. A DICOM series is one item by a **folder rule** decided at listing time (:func:`group_series`):
``enhance.volumes.series_folders`` are glob patterns (fnmatch on the folder's path below ``enhance.input``, e.g.
``"mri/*/*"``); every listed file directly inside a matching folder belongs to that folder's item, whose key is
the folder with a trailing ``/``, whose size is the files' total and whose version hashes their names, sizes and
versions (a slice added, removed or changed makes it a changed item). Why a folder rule rather than grouping by
SeriesInstanceUID: listing stays free of reads (incremental nights skip unchanged series unread), and archives
exported per series (PACS exports, dcm2niix/BIDS-style trees) already hold one series per folder. A folder that
holds several series, a localizer or a non-DICOM file is an error row naming it - never a silent split. DICOM files
outside series folders stay 2-D items.

**Stages** (the ``volume`` entries of the stages' ``{kind: handler}`` tables in :mod:`medsr_dist.enhance`; the
2-D path is unchanged; rows carry ``kind`` = ``"volume"``):

1. ReadDecode -> :func:`read_volume_item`: read (every file of a series), hash, probe the header (NIfTI header
   bytes / DICOM headers without pixel data) and refuse *before decoding*: 4-D, more than
   ``enhance.max_input_pixels`` input voxels or ``max_output_pixels`` output voxels; skip what has a record and an
   output; decode (:mod:`medsr_dist.mri.volume`) and plan (:func:`~medsr_dist.mri.reconstruct.plan_reconstruction`):
   no single low-resolution axis, a sheared orientation matrix, missing or duplicate slices -> error rows that
   name the item and what is wrong. Columns: ``pixels`` the (I, J, K) float32 physical volume, ``header`` the
   volume's geometry and source headers (pickled :class:`~medsr_dist.mri.volume.Volume` without voxels), ``meta``
   JSON of the plan and the volume model.
2. EnhanceReplica -> :class:`VolumeReplicas`: the volume model in a
   :class:`~medsr_dist.infer.replica.ModelReplica` (loaded with the first volume, kept; the job's own replica
   when it is the same model), :func:`~medsr_dist.mri.reconstruct.reconstruct` through the one engine (tiles
   batched across slices); ``output``: the fused volume in the source's stored dtype and scaling.
3. EncodeCommit -> :func:`commit_volume`: NIfTI (the source's header, dtype, scl_slope/inter; the new affine and
   pixdim; provenance JSON as a NIfTI comment extension) or a derived DICOM series
   (:func:`~medsr_dist.mri.volume.write_dicom_series`: new series, DERIVED, ImagePositionPatient per slice,
   SliceThickness = SpacingBetweenSlices) in a folder of its own; the consistency score (the output re-degraded
   along the low-resolution axis with ``mri.profile``: for ``estimate`` the profile estimated from the input in
   the read stage, recorded as ``medsr:slice_profile`` in a NIfTI output's provenance; against the input, inside its mask); then the record.

Output keys: NIfTI ``<rel dir>/<stem>.sr-<id>.nii[.gz]`` (same compression as the input); a series
``<rel folder>.sr-<id>/slice_0001.dcm`` (the first slice names the output in the manifest; every slice is written
before the record, whose presence means done). The id covers the input content, the volume model and
:func:`~medsr_dist.infer.provenance.volume_params` (factor, fusion, profile, tiling, backend, precision, engine revision).

**Memory.** The engine streams the slices of one orientation (``batch_size`` slices' tiles in flight), the mean
fusion accumulates in place: a replica holds the input (float32), the output (float32, V) and its stored copy
(V/2 for int16) besides the model; ``jobs/bench_mri_replica.py`` measures it on a 512 x 512 x 75 -> 300 volume
(docs/PERFORMANCE.md). Manifest rows: ``input_format`` ``nifti`` / ``dicom-series``; ``input_width``,
``input_height``, ``frames`` = the input's i, j, k sizes, ``output_width``/``output_height`` the output's i, j (its
shape is in the provenance); ``model_*`` and ``params`` name the volume model and :func:`~medsr_dist.infer.provenance.volume_params`.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import math
import pickle
import posixpath
import time
import zlib
from typing import Any

import numpy as np
import pydicom

from medsr_dist import __version__
from medsr_dist.config import through_plane_refiner_problem
from medsr_dist.enhance.identity import item_id, item_record_uri, output_id
from medsr_dist.enhance.manifest import now_iso
from medsr_dist.infer.model_file import choose_backend, read_model_file, runnable_precision
from medsr_dist.infer.provenance import VOLUME_KIND as KIND
from medsr_dist.infer.provenance import VOLUME_NOTE as NOTE
from medsr_dist.infer.provenance import output_provenance, params_json, provenance_source, volume_params
from medsr_dist.infer.replica import EngineSettings, ModelReplica
from medsr_dist.infer.rows import non_finite
from medsr_dist.io.dicom import read_image_dataset
from medsr_dist.io.medical_image import ImageDecodeError
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.mri.job import consistency_psnr
from medsr_dist.mri.profile import profile_from_record, resolve_profile
from medsr_dist.mri.reconstruct import fine_step, plan_reconstruction, reconstruct
from medsr_dist.mri.volume import (
    VolumeError,
    _quantise,
    read_dicom_series,
    read_nifti,
    resampled_affine,
    write_dicom_series,
    write_nifti,
)
from medsr_dist.storage import FileEntry, Storage
from medsr_dist.uris import relative_key

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_volume_key(key: str) -> bool:
    """A NIfTI file, or a series folder (key with a trailing ``/``, as :func:`group_series` makes them)."""
    return key.endswith(NIFTI_SUFFIXES) or key.endswith("/")


# ----------------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------------
def group_series(entries: list, input_prefix: str, patterns: list[str]) -> list:
    """Listed files -> the same list with the files of each series folder replaced by one entry (module doc).

    ``entries``: :class:`~medsr_dist.storage.FileEntry` of the listing; ``patterns``: ``enhance.volumes.series_folders``.
    Returns entries sorted by key; a folder item's key is ``<input>/<folder>/``. An entry the listing refused (a
    symbolic link) stays on its own, to become its error row; the folder's volume is read without it.
    """
    if not patterns:
        return entries
    groups: dict[str, list] = {}
    out = []
    for entry in entries:
        try:
            folder = posixpath.dirname(relative_key(entry.uri, input_prefix))
        except ValueError:
            folder = ""
        if folder and not entry.refused and any(fnmatch.fnmatchcase(folder, p.strip("/")) for p in patterns):
            groups.setdefault(folder, []).append(entry)
        else:
            out.append(entry)
    for folder, files in groups.items():
        files.sort(key=lambda f: f.uri)
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{posixpath.basename(f.uri)}|{f.size}|{f.version}\n".encode())
        out.append(FileEntry(uri=Storage.join(input_prefix, folder) + "/", size=sum(f.size for f in files),
                             version="series:" + digest.hexdigest()[:32]))
    return sorted(out, key=lambda f: f.uri)


# ----------------------------------------------------------------------------------------------------------
# The driver's part: which model and parameters volume items get
# ----------------------------------------------------------------------------------------------------------
def plan_volume_job(cfg, storage, job_model, entries: list, precision: str, *, requested_backend: str | None = None,
                    gpu: bool = False) -> dict | None:
    """What volume items of this run get: ``{"model": ModelFile | None, "params": dict, "problem": str}``, or
    None when volumes are off or none is listed. ``problem`` (every volume item's error) is set when no scale-1
    model is available. ``requested_backend``: ``enhance.backend`` as configured (``auto`` is chosen for the
    volume model itself, which may lack the ONNX export the 2-D model has); default: ``cfg.enhance.backend``.

    Raises:
        FileNotFoundError / ValueError: ``enhance.volumes.checkpoint`` is set but unusable (before any Ray work).
    """
    e = cfg.enhance
    if not e.volumes.enabled or not any(is_volume_key(x.uri) for x in entries):
        return None
    if str(getattr(e, "replicas", "local")) != "local":
        return {"model": None, "params": {}, "uri": "", "problem": (
            f"volumes are reconstructed by the job's own replicas; enhance.replicas {e.replicas} serves 2-D images "
            "(run volumes with enhance.replicas: local)")}
    if e.volumes.checkpoint:
        model = read_model_file(e.volumes.checkpoint, cfg.storage)
        if model.scale != 1:
            raise ValueError(f"enhance.volumes.checkpoint {e.volumes.checkpoint}: a x{model.scale} model; volumes are "
                             "reconstructed by a scale-1 through-plane model (medsr mri prepare + medsr train)")
        problem = through_plane_refiner_problem(model.generator.get("type", "RRDBNet"), model.scale)
        if problem:
            raise ValueError(f"enhance.volumes.checkpoint {e.volumes.checkpoint}: {problem}")
    elif job_model.scale == 1:
        problem = through_plane_refiner_problem(job_model.generator.get("type", "RRDBNet"), job_model.scale)
        if problem:  # the 2-D images still run with it; the volumes need their own model
            return {"model": None, "params": {}, "uri": "", "problem": (
                f"a volume needs a through-plane model; enhance.checkpoint (used when enhance.volumes.checkpoint is "
                f"empty): {problem}; set enhance.volumes.checkpoint (or enhance.volumes.enabled=false)")}
        model = job_model
    else:
        return {"model": None, "params": {}, "uri": "", "problem": (
            f"a volume needs a scale-1 through-plane model; enhance.checkpoint is x{job_model.scale}: set "
            "enhance.volumes.checkpoint (or enhance.volumes.enabled=false)")}
    backend = choose_backend(requested_backend or e.backend, model, storage, gpu=gpu).name
    if backend != e.backend:
        precision = runnable_precision(backend, e.precision, gpu=gpu)
    return {"model": model, "uri": e.volumes.checkpoint or e.checkpoint, "problem": "",
            "params": volume_params(e, cfg.mri, model, precision, backend)}


# ----------------------------------------------------------------------------------------------------------
# Stage 1: read, probe, skip, decode
# ----------------------------------------------------------------------------------------------------------
def probe_nifti_shape(data: bytes, name: str) -> tuple[int, ...]:
    """The data shape a NIfTI-1/-2 header declares, from its first bytes only (a gzip stream is inflated just far
    enough): trailing axes of length 1 dropped.

    Raises:
        VolumeError: not a NIfTI header.
    """
    head = data[:1024]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 1024)
        except zlib.error as exc:
            raise VolumeError(f"{name}: truncated or corrupt gzip stream ({exc})") from None
    for order in "<>":
        if len(head) < 348:
            break
        size = int(np.frombuffer(head[:4], order + "i4")[0])
        if size == 348:
            dim = np.frombuffer(head[40:56], order + "i2").astype(np.int64)
        elif size == 540 and len(head) >= 540:
            dim = np.frombuffer(head[16:80], order + "i8")
        else:
            continue
        ndim = int(dim[0])
        if not 1 <= ndim <= 7 or np.any(dim[1:ndim + 1] < 1):
            raise VolumeError(f"{name}: NIfTI header declares an invalid shape (dim = {dim.tolist()})")
        shape = [int(n) for n in dim[1:ndim + 1]]
        while len(shape) > 3 and shape[-1] == 1:
            shape.pop()
        return tuple(shape)
    raise VolumeError(f"{name}: not a NIfTI file (no NIfTI-1/-2 header)")


def _series_voxels(files: list[tuple[str, bytes]], name: str) -> tuple[int, tuple[int, int], int]:
    """(voxels, (rows, columns) of the first slice, slices) from the DICOM headers alone (pixel data not read)."""
    voxels, shape = 0, (0, 0)
    for fname, data in files:
        try:  # the image reader's bounds: Deflate inflation and sequence items (medsr_dist.io.dicom)
            ds = read_image_dataset(data, fname, header_only=True)
        except ImageDecodeError as exc:
            raise VolumeError(f"series {name}: {fname} is not a readable DICOM file ({exc.reason})") from None
        rows, cols, frames = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)
        if rows < 1 or cols < 1:
            raise VolumeError(f"series {name}: {fname} has no image (Rows/Columns missing)")
        voxels += rows * cols * frames
        shape = shape if shape != (0, 0) else (rows, cols)
    return voxels, shape, len(files)


def _item_name(series: bool) -> str:
    """How messages name the item: not by its key (keys often embed accession numbers; the manifest row has it)."""
    return "input" if series else "volume"


def volume_output_key(output_prefix: str, rel: str, oid: str, series: bool) -> str:
    """Where a volume item's output goes (module doc)."""
    if series:
        return Storage.join(output_prefix, f"{rel.rstrip('/')}.sr-{oid[:10]}", "slice_0001.dcm")
    directory, name = posixpath.split(rel)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    return Storage.join(output_prefix, directory, f"{name[: -len(suffix)] or 'volume'}.sr-{oid[:10]}{suffix}")


def read_volume_item(spec, row: dict, rel: str, secrets: set[str]) -> dict:
    """Fill a ReadDecode ``row`` (its 2-D columns, ``status`` "todo") for a volume key: see the module doc.

    ``secrets`` receives the series' patient identifier values as soon as a file is read, for the caller to keep
    out of the row's error text. Raises whatever makes the item an error row (the caller turns it into one).
    """
    job = spec.volumes
    key = row["key"]
    series = key.endswith("/")
    name = _item_name(series)
    row["kind"] = KIND
    if series:
        keys = sorted(spec.storage.list_files(key))
        if not keys:
            raise VolumeError(f"series {name}: the folder holds no files")
        files = [(posixpath.basename(k), spec.storage.read_bytes(k)) for k in keys]
        secrets.update(phi_values(files[0][1]))
        digest = hashlib.sha256()
        for fname, data in files:
            digest.update(fname.encode() + b"\0" + hashlib.sha256(data).digest())
        row.update(input_sha256=digest.hexdigest(), input_bytes=sum(len(d) for _, d in files), input_format="dicom-series")
    else:
        data = spec.storage.read_bytes(key)
        row.update(input_sha256=hashlib.sha256(data).hexdigest(), input_bytes=len(data), input_format="nifti")
    if job is None or job["problem"]:
        raise VolumeError(f"{name}: {job['problem'] if job else 'volume items are off (enhance.volumes.enabled)'}")
    model, params = job["model"], job["params"]
    oid = output_id(row["input_sha256"], model.sha256, params)
    row["item_id"] = item_id(rel, oid)
    row["output_key"] = volume_output_key(spec.output, rel, oid, series)
    # header only: a 1 MB .nii.gz can declare 4000^3 voxels
    if series:
        voxels, _, slices = _series_voxels(files, name)
        what = f"{slices} slices, {voxels:,} voxels"
    else:
        shape = probe_nifti_shape(data, name)
        if len(shape) != 3:
            raise VolumeError(f"{name}: expected a 3-D volume, the header declares shape {shape}"
                              + (" (a 4-D series: split it into 3-D volumes first)" if len(shape) == 4 else "")
                              + "; not decoded")
        voxels = int(np.prod(shape))
        what = f"{' x '.join(map(str, shape))} = {voxels:,} voxels"
    if voxels > spec.max_input_pixels:
        raise VolumeError(f"{name}: {what} exceeds enhance.max_input_pixels {spec.max_input_pixels:,}; not decoded")
    out_voxels = math.ceil(voxels * params["factor"])
    if out_voxels > spec.max_output_pixels:
        raise VolumeError(f"{name}: the output at x{params['factor']} would be {out_voxels:,} voxels, "
                          f"over enhance.max_output_pixels {spec.max_output_pixels:,}; not decoded")
    records = getattr(spec, "records", spec.output)
    record_uri = item_record_uri(records, row["item_id"])
    if spec.storage.exists(record_uri) and spec.storage.exists(row["output_key"]):
        row.update(status="skipped", record=spec.storage.read_bytes(record_uri).decode())
        return row
    volume = read_dicom_series(files, name) if series else read_nifti(data, name)
    plan = plan_reconstruction(volume, params["factor"])
    template = volume.with_data(np.zeros((1, 1, 1), np.float32))
    _, profile_record = resolve_profile(params["profile"], volume.data, volume.spacing, plan.lr_axis, plan.factor,
                                       volume.facts.get("slice_thickness"))
    meta = {"lr_axis": plan.lr_axis, "factor": plan.factor, "fusion": params["fusion"], "profile": params["profile"],
            "slice_profile": profile_record,
            "input_shape": list(plan.input_shape), "output_shape": list(plan.output_shape),
            "output_spacing_mm": list(plan.output_spacing), "format": volume.format, "model_uri": job["uri"],
            "model_sha256": model.sha256, "model_name": model.name, "params": params}
    # (1, I, J, K) float32: the pixels column keeps the 2-D rows' rank and dtype (one tensor column for Ray Data)
    row.update(pixels=volume.data[None], header=pickle.dumps(template), meta=json.dumps(meta),
               frames=int(plan.input_shape[2]))
    return row


def pack_stored(stored: np.ndarray) -> np.ndarray:
    """A volume's stored values as the ``output`` column carries them: their bytes as (1, 1, N, 1) uint16 (the 2-D
    rows' rank and dtype; one byte of padding for an odd count). :func:`unpack_stored` inverts it."""
    raw = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    if raw.size % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    return raw.view(np.uint16).reshape(1, 1, -1, 1)


def unpack_stored(packed: np.ndarray, dtype, shape) -> np.ndarray:
    """Inverse of :func:`pack_stored`."""
    dtype, count = np.dtype(dtype), int(np.prod(shape))
    raw = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)[: count * dtype.itemsize]
    return raw.view(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the replica
# ----------------------------------------------------------------------------------------------------------
class VolumeReplicas:
    """The volume models of one EnhanceReplica actor, loaded on first use (a 2-D-only night loads none).

    ``job_replica``: the actor's own :class:`~medsr_dist.infer.replica.ModelReplica`, reused when the volume model
    is the job's model."""

    def __init__(self, job_replica, storage_cfg, e, precision: str):
        self.job_replica, self.storage_cfg, self.e, self.precision = job_replica, storage_cfg, e, precision
        self.loaded: dict[str, Any] = {}

    def replica(self, meta: dict):
        sha = meta["model_sha256"]
        job = self.job_replica
        if job is not None and job.model is not None and job.model.sha256 == sha and job.scale == 1:
            return job
        if sha not in self.loaded:
            model = read_model_file(meta["model_uri"], self.storage_cfg)
            if model.sha256 != sha:
                raise RuntimeError(f"the volume model {meta['model_uri']} changed since the job started (sha256 "
                                   f"{model.sha256[:12]}, expected {sha[:12]}); nothing written")
            params = meta.get("params") or {}
            settings = EngineSettings.of(self.e, precision=params.get("precision", self.precision), outscale=None,
                                         backend=params.get("backend", self.e.backend))
            self.loaded[sha] = ModelReplica.load(model, Storage(self.storage_cfg), settings)
        return self.loaded[sha]

    def enhance(self, row: dict) -> dict:
        """Reconstruct one volume row (``output``: the stored values of the fused volume); failures raise."""
        t0 = time.perf_counter()
        meta = json.loads(str(row["meta"]))
        replica = self.replica(meta)
        template = pickle.loads(bytes(row["header"]))
        volume = template.with_data(np.asarray(row["pixels"])[0])
        out = reconstruct(volume, replica.backend, meta["factor"], tile=replica.spec, fusion=meta["fusion"],
                          lr_axis=meta["lr_axis"])
        bad = non_finite(out.data)
        if bad:
            raise ValueError(f"the model output {bad:,} non-finite values (NaN/Inf); nothing written")
        slope, inter = _scaling(template)
        row["output"] = pack_stored(_quantise(out.data, template.stored_dtype, slope, inter))  # slab by slab
        del out
        row["seconds"] = float(row["seconds"]) + time.perf_counter() - t0
        return row


def _scaling(volume) -> tuple[float, float]:
    """The (slope, inter) stored values are written with (as :func:`~medsr_dist.mri.volume.write_nifti` does)."""
    if not np.issubdtype(volume.stored_dtype, np.integer):
        return 1.0, 0.0
    slope = volume.scl_slope if np.isfinite(volume.scl_slope) and volume.scl_slope else 1.0
    return float(slope), float(volume.scl_inter if np.isfinite(volume.scl_inter) else 0.0)


# ----------------------------------------------------------------------------------------------------------
# Stage 3: write and commit
# ----------------------------------------------------------------------------------------------------------
def _dicom_secrets(template) -> set[str]:
    """Patient identifier values of a series' first slice header (kept out of error texts)."""
    if not template.dicom_slices:
        return set()
    ds = template.dicom_slices[0].copy()
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - then nothing can be named
        return set()
    return phi_values(buf.getvalue())


def commit_volume(spec, item: dict, row: dict) -> dict:
    """Write a reconstructed volume row's output and its record; returns the manifest columns of a done row.

    Raises:
        RuntimeError: the write failed (message free of the series' patient identifiers); nothing is recorded.
    """
    meta = json.loads(str(item["meta"]))
    template = pickle.loads(bytes(item["header"]))
    try:
        packed = np.asarray(item["output"])
        want = int(np.prod(meta["output_shape"])) * np.dtype(template.stored_dtype).itemsize
        if packed.size * 2 not in (want, want + 1):
            raise ValueError(f"the replica returned {packed.size * 2:,} bytes for a {meta['output_shape']} volume")
        stored = unpack_stored(packed, template.stored_dtype, meta["output_shape"])
        slope, inter = _scaling(template)
        physical = stored.astype(np.float32)
        if (slope, inter) != (1.0, 0.0):
            physical *= np.float32(slope)
            physical += np.float32(inter)
        source = template.with_data(np.asarray(item["pixels"])[0])
        axis = meta["lr_axis"]
        step = fine_step(meta["factor"], meta["input_shape"][axis], meta["output_shape"][axis])
        out = template.with_data(physical, resampled_affine(template.affine, axis, step))
        provenance = output_provenance(
            model_name=meta["model_name"], model_sha256=meta["model_sha256"], params_json=params_json(meta["params"]),
            source=provenance_source(getattr(spec, "provenance_source", "item_id"), row["input_key"], row["item_id"]),
            source_sha256=row["input_sha256"], note=NOTE, extra={
                "medsr:lr_axis": str(meta["lr_axis"]), "medsr:output_spacing_mm": json.dumps(meta["output_spacing_mm"]),
                "medsr:output_shape": json.dumps(meta["output_shape"]),
                "medsr:slice_profile": json.dumps(meta["slice_profile"], sort_keys=True)})
        key = row["output_key"]
        if template.format == "nifti":
            data = write_nifti(out, gz=key.endswith(".gz"), description="medsr-dist isotropic SR (enhancement)",
                               provenance=provenance)
            spec.storage.write_bytes(key, data)  # atomic
            written = len(data)
        else:
            derivation = (f"{NOTE} Through-plane SR x{meta['factor']} ({meta['fusion']} fusion) by model "
                          f"{meta['model_name']} (sha256 {meta['model_sha256'][:16]}), medsr-dist {__version__}")
            folder = posixpath.dirname(key)
            written = 0
            for name, data in write_dicom_series(out, derivation=derivation, uid_entropy=row["item_id"]):
                spec.storage.write_bytes(spec.storage.join(folder, name), data)
                written += len(data)
        score = consistency_psnr(out, source, meta["lr_axis"], meta["factor"],
                                 profile_from_record(meta["slice_profile"]))
    except Exception as exc:  # noqa: BLE001 - becomes the row's error, without identifiers
        raise RuntimeError(sanitize_reason(f"{type(exc).__name__}: {exc}", key=row["input_key"],
                                           secrets=_dicom_secrets(template))) from None
    inp, outp = meta["input_shape"], meta["output_shape"]
    done = {
        "status": "done", "provenance": json.dumps(provenance, sort_keys=True), "model_name": meta["model_name"],
        "model_sha256": meta["model_sha256"], "params": json.dumps(meta["params"], sort_keys=True),
        "bits_stored": int(np.dtype(template.stored_dtype).itemsize * 8), "channels": 1, "output_bytes": written,
        "input_height": inp[1], "input_width": inp[0], "output_height": outp[1], "output_width": outp[0],
        "frames": inp[2], "consistency_psnr_db": float(score), "flagged": bool(score < spec.threshold_db),
        "finished_at": now_iso(),
    }
    record = {**row, **done, "seconds": row["seconds"]}
    spec.storage.write_bytes(item_record_uri(getattr(spec, "records", spec.output), row["item_id"]),
                             json.dumps(record).encode())
    return done


__all__ = ["VolumeReplicas", "commit_volume", "group_series", "is_volume_key", "pack_stored", "plan_volume_job",
           "probe_nifti_shape", "read_volume_item", "unpack_stored", "volume_output_key"]
