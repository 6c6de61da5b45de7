"""Rows of decoded items through a model replica: the contract shared by the nightly job's replicas and Serve.

Contract: a row is a dict (``pixels`` (F, H, W, C) float32 in [0, 1], ``meta`` ImageMeta JSON, ``key``,
``seconds``, ``status``, ``error``); :func:`enhance_rows` adds ``output`` (F, H*s, W*s, C) uint16 stored values
(:func:`quantize`) or turns the row into an error row. :func:`columns` / :func:`batch_rows` convert between rows and
a Ray Data numpy batch. :func:`is_fatal_device_error` says which failures end a replica's process.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import numpy as np

from medsr_dist.infer.replica import SETTINGS, ModelReplica, NonFiniteOutput
from medsr_dist.io.image import ImageMeta
from medsr_dist.io.phi import item_label, sanitize_reason

log = logging.getLogger(__name__)

# Placeholders for rows without pixels (skipped, failed): every row of a column has the same dtype and rank,
# so Ray Data can hold the column as one variable-shaped tensor array. Pixels travel as (F, H, W, C) always.
NO_PIXELS = np.zeros((0, 0, 0, 1), np.float32)
NO_OUTPUT = np.zeros((0, 0, 0, 1), np.uint16)


def object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def columns(rows: list[dict]) -> dict:
    """Rows (dicts with the same keys) -> a Ray Data numpy batch."""
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if k in ("pixels", "output", "header", "std"):
            out[k] = object_array(values)
        else:
            out[k] = np.asarray(values)
    return out


def batch_rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Stages


def stored_maxval(meta_json: str) -> int:
    """The stored value meaning 1.0 for an image of this ``ImageMeta`` (255, 65535 or DICOM 2**BitsStored - 1)."""
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
    bad, failure, fp32 = 0, None, 0
    fallbacks: dict[int, int] = {}
    for index, out in replica.enhance_each(frames, outscale=outscale, reraise=is_fatal_device_error,
                                           fallbacks=fallbacks):
        i, f = order[index]
        row = rows[i]
        n_frames = len(row["pixels"])
        fp32 += fallbacks.get(index, 0)
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
            row["fp32_fallbacks"] = fp32
            bad, failure, fp32 = 0, None, 0
            yield row
            t0 = time.perf_counter()
