"""One model's Serve deployment: decode -> the engine (tiles batched across requests) -> encode in the input's form.

Why one deployment per model rather than ``@serve.multiplexed``: tile batches are per model (a model call runs one
network), a GPU replica holds one model's weights and activations at a known size, and each model scales on its own
traffic. Multiplexing several models into one replica would mix their requests in one ``@serve.batch`` queue and
make a replica's memory depend on which models happen to be loaded.

Cross-request batching. Each request's image runs through :class:`~medsr_dist.infer.engine.TileBatcher` in a worker
thread (off the event loop) with :class:`SharedTileQueue` as its backend: every tile the engine wants run becomes
one call of the replica's ``@serve.batch`` method :meth:`SRModel.run_tiles` on the replica's event loop, which
gathers up to ``max_batch_size`` tiles from every request in flight (waiting at most ``batch_wait_timeout_s``),
stacks those of one shape and runs the real backend once per shape in the replica's one model thread. The pixels are the
engine's: tiling, blending and the network are the same as in :func:`~medsr_dist.infer.engine.enhance_array`;
only which tiles share a model call differs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from medsr_dist.config import StorageConfig
from medsr_dist.infer.consistency import consistency_psnr
from medsr_dist.infer.engine import ENGINE_REVISION
from medsr_dist.infer.model_file import ModelFile
from medsr_dist.infer.provenance import output_provenance, params_json, serve_params
from medsr_dist.infer.replica import EngineSettings, ModelReplica, NonFiniteOutput
from medsr_dist.infer.rows import enhance_rows, is_fatal_device_error
from medsr_dist.io.bounded import DecodeKilled, decode_image_capped
from medsr_dist.io.image import ImageDecodeError, NotAnImageObject, encode_image
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.serve.admission import RequestError, check_limits, decoded_bytes  # noqa: F401 - re-exported
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

#: Media types of responses, by the input's format.
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "tiff": "image/tiff", "dicom": "application/dicom"}


class SharedTileQueue:
    """A :class:`~medsr_dist.infer.backends.Backend` for engine threads: each tile of a batch is submitted to the
    replica's ``@serve.batch`` queue on ``loop`` and the results are stacked back.

    Contract as :meth:`Backend.__call__`: (B, 3, h, w) float32 RGB in [0, 1] -> (B, 3, h*s, w*s) float32. Must be
    called from a thread other than the loop's (the engine runs in ``asyncio.to_thread``).
    """

    def __init__(self, backend, submit, loop: asyncio.AbstractEventLoop):
        self.scale = int(backend.scale)
        self.size_multiple = int(getattr(backend, "size_multiple", 1))
        self.precision = getattr(backend, "precision", "fp32")
        self.device = getattr(backend, "device", None)
        self.providers = getattr(backend, "providers", None)
        self._submit, self._loop, self._backend = submit, loop, backend

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        futures = [asyncio.run_coroutine_threadsafe(self._submit(np.ascontiguousarray(tile)), self._loop)
                   for tile in batch]
        return np.stack([f.result() for f in futures])

    def __repr__(self) -> str:
        return f"SharedTileQueue({self._backend!r})"


class SRModel:
    """Serve deployment class holding one model (bound with options by :func:`medsr_dist.serve.app.build_app`).

    :meth:`enhance` answers a dict, never raises for a bad image: ``{"status": 200, "body": bytes, "media_type",
    "headers"}`` or ``{"status": 4xx/5xx, "reason": str}`` (reasons never quote header values: see
    :func:`~medsr_dist.io.phi.sanitize_reason`).
    """

    def __init__(self, model: ModelFile, storage_cfg: StorageConfig | dict, settings: dict, limits: dict,
                 max_batch_size: int, batch_wait_timeout_s: float, dicom_compression: str = "none",
                 max_ongoing_requests: int = 8):
        """
        Args:
            model: the model file (pickled into the replica).
            storage_cfg: how to reach the store (``StorageConfig`` or its dict).
            settings: :class:`~medsr_dist.infer.replica.EngineSettings` fields (precision already resolved).
            limits: ``max_input_pixels``, ``max_output_pixels`` (checked again here: a handle caller may skip the
                ingress), ``decode_memory_bytes`` / ``decode_timeout_s`` (the decode's caps; absent or 0: uncapped).
            max_batch_size / batch_wait_timeout_s: of the shared tile queue.
            max_ongoing_requests: the deployment's; sizes the pool of engine threads (one per request in work).
        """
        if isinstance(storage_cfg, dict):
            storage_cfg = StorageConfig(**storage_cfg)
        self.model, self.limits, self.dicom_compression = model, dict(limits), dicom_compression
        self.settings = EngineSettings(**{**settings, "batch_size": max_batch_size})
        self.unhealthy: str | None = None
        try:
            self.replica: ModelReplica | None = ModelReplica.load(model, Storage(storage_cfg), self.settings)
        except Exception as exc:  # noqa: BLE001 - e.g. a TensorRT plan that does not load: unhealthy, with the reason
            self.replica, self.unhealthy = None, f"backend did not start: {type(exc).__name__}: {exc}"
            log.error("model %s: %s", model.name, self.unhealthy)
        self.run_tiles.set_max_batch_size(int(max_batch_size))
        self.run_tiles.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._shared: ModelReplica | None = None
        self.stats = {"model_calls": 0, "tiles": 0, "max_tiles_per_call": 0, "requests": 0}
        # Two pools, so that requests' engine threads (blocked on their tiles) can never starve the model call
        # that serves those tiles; one model thread: a replica runs one model call at a time.
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="medsr-model")
        self._request_pool = ThreadPoolExecutor(max(1, int(max_ongoing_requests)), thread_name_prefix="medsr-request")
        if self.replica is not None:
            try:
                self.replica.self_check()
            except RuntimeError as exc:  # reported by check_health: Serve replaces this replica
                self.unhealthy = str(exc)
                log.error("model %s: %s", model.name, exc)
            log.info("serving %s (sha256 %s) on %r", model.name, model.sha256[:12], self.replica.backend)

    def check_health(self) -> None:
        """Serve's periodic health check: raises when the backend failed its self-check or a fatal device error."""
        if self.unhealthy:
            raise RuntimeError(f"model {self.model.name}: {self.unhealthy}")

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` lists for this model."""
        described = self.replica.describe() if self.replica is not None else {"model": self.model.name}
        return {**described, "tile": self.settings.tile, "tile_overlap": self.settings.tile_overlap,
                "tile_blend": self.settings.tile_blend, "max_batch_size": self.settings.batch_size,
                "sampling": getattr(self.model, "sampling", None),
                "replica": _replica_tag(),
                "healthy": self.unhealthy is None, "unhealthy_reason": self.unhealthy, "replica_stats": dict(self.stats)}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def run_tiles(self, tiles: list[np.ndarray]) -> list[np.ndarray]:
        """Tiles of any requests, (3, h, w) float32 each -> (3, h*s, w*s): one backend call per tile shape,
        in a worker thread."""
        out: list[np.ndarray | None] = [None] * len(tiles)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, tile in enumerate(tiles):
            by_shape.setdefault(tile.shape, []).append(i)
        for indices in by_shape.values():
            batch = np.stack([tiles[i] for i in indices])
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._model_pool, self.replica.backend, batch)
            except Exception as exc:
                self._note_fatal(exc)
                raise
            for k, i in enumerate(indices):
                out[i] = result[k]
            self.stats["model_calls"] += 1
            self.stats["tiles"] += len(indices)
            self.stats["max_tiles_per_call"] = max(self.stats["max_tiles_per_call"], len(indices))
        return out

    def _note_fatal(self, exc: BaseException) -> None:
        if is_fatal_device_error(exc):  # the CUDA context is gone: let Serve replace the replica
            self.unhealthy = f"fatal device error: {type(exc).__name__}"

    def _shared_replica(self) -> ModelReplica:
        if self._shared is None:
            backend = SharedTileQueue(self.replica.backend, self.run_tiles, asyncio.get_running_loop())
            self._shared = ModelReplica(self.model, backend, self.settings)
        return self._shared

    async def enhance(self, data: bytes, outscale: float | None = None) -> dict[str, Any]:
        """Enhance one image file (PNG/JPEG/TIFF/DICOM bytes); ``outscale`` None: the model's scale."""
        if self.unhealthy:
            return {"status": 503, "reason": f"model {self.model.name} is unavailable on this replica: {self.unhealthy}"}
        shared = self._shared_replica()
        self.stats["requests"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._request_pool, self._enhance, shared, bytes(data), outscale)
        except RequestError as exc:
            return {"status": exc.status, "reason": exc.reason}

    async def enhance_item(self, pixels: np.ndarray, meta_json: str, item_id: str = "",
                           outscale: float | None = None) -> dict[str, Any]:
        """The nightly job's call (``enhance.replicas: serve:<app>``; see
        :class:`~medsr_dist.enhance.serve_client.ServeReplica`): one decoded item through this replica's engine, its
        tiles batched with those of every other request in flight (HTTP or job).

        Args:
            pixels: (F, H, W, C) float32 in [0, 1] (ReadDecode's ``pixels``).
            meta_json: the item's :class:`~medsr_dist.io.image.ImageMeta` JSON (its stored maxval).
            item_id: names the item in this replica's logs (never its key).
            outscale: final scale; ``None``: the model's.

        Returns:
            ``{"status": "todo", "output": (F, H*s, W*s, C) uint16}`` (todo: ready to be committed, as
            :func:`~medsr_dist.infer.rows.enhance_rows` leaves it), ``{"status": "error", "error": reason}``
            for a failure of this item, ``{"status": "unavailable", "error": reason}`` when this replica is
            unhealthy (call again: Serve replaces it), ``{"status": "lost", ...}`` after a fatal device error with
            this item (the job retries it alone, as when a replica dies); with ``seconds`` spent here.
        """
        if self.unhealthy:
            return {"status": "unavailable", "error": f"replica unhealthy: {self.unhealthy}", "seconds": 0.0}
        shared = self._shared_replica()
        self.stats["job_items"] = self.stats.get("job_items", 0) + 1
        return await asyncio.get_running_loop().run_in_executor(
            self._request_pool, self._enhance_item, shared, pixels, str(meta_json), str(item_id), outscale)

    def _enhance_item(self, shared: ModelReplica, pixels: np.ndarray, meta_json: str, item_id: str,
                      outscale: float | None) -> dict[str, Any]:
        row = {"pixels": np.asarray(pixels), "meta": meta_json, "item_id": item_id, "key": "", "seconds": 0.0,
               "status": "todo", "error": ""}
        try:
            (row,) = list(enhance_rows(shared, [row], outscale=outscale))
        except Exception as exc:  # noqa: BLE001 - enhance_rows raises only fatal device errors
            self._note_fatal(exc)
            if not is_fatal_device_error(exc):
                raise
            return {"status": "lost", "error": f"fatal device error: {type(exc).__name__}", "seconds": 0.0}
        return {"status": row["status"], "error": row["error"], "output": row["output"], "seconds": row["seconds"],
                "fp32_fallbacks": int(row.get("fp32_fallbacks", 0))}

    def _enhance(self, shared: ModelReplica, data: bytes, outscale: float | None) -> dict[str, Any]:
        return enhance_file(shared, data, outscale, limits=self.limits, dicom_compression=self.dicom_compression,
                            on_fatal=self._note_fatal)

def enhance_file(replica: ModelReplica, data: bytes, outscale: float | None = None, *, limits: dict,
                 dicom_compression: str = "none", on_fatal=None) -> dict[str, Any]:
    """One request's whole work, Serve or not: probe and limits -> decode -> ``replica``'s engine -> encode in the
    input's form with provenance -> consistency score. :class:`SRModel` runs it for every ``POST /v1/enhance`` (with a
    replica whose backend is the shared tile queue); ``jobs/bench_serve.py`` runs it without Serve, as "the engine
    called directly".

    Args:
        replica: the model replica (its ``model`` and ``settings`` give scale, tiles, precision, backend).
        data: the image file's bytes (PNG/JPEG/TIFF/DICOM).
        outscale: final scale; ``None``: the model's.
        limits: ``max_input_pixels``, ``max_output_pixels``; ``decode_memory_bytes`` and ``decode_timeout_s``
            (both > 0: the decode runs in a capped child process, :func:`~medsr_dist.io.bounded.decode_image_capped`;
            absent or 0: in this process).
        dicom_compression: transfer syntax of a DICOM answer (``none``: as :func:`encode_image` defaults).
        on_fatal: called with a failure of the backend (e.g. to mark a Serve replica unhealthy).

    Returns:
        ``{"status": 200, "body": bytes, "media_type": str, "headers": {X-Medsr-*}}``.

    Raises:
        RequestError: 415 not an image read here, 400 undecodable, 413 over a limit or a decode stopped past
            ``decode_memory_bytes``, 422 a decode stopped past ``decode_timeout_s`` or crashed, 500 a failed or
            non-finite inference or encode (reasons never quote header values).
    """
    t0 = time.perf_counter()
    model, settings = replica.model, replica.settings
    scale = float(outscale) if outscale else float(model.scale)
    try:
        check_limits(data, scale, limits)
        image = decode_image_capped(data, "request", memory_bytes=int(limits.get("decode_memory_bytes", 0)),
                                    seconds=float(limits.get("decode_timeout_s", 0)))
    except RequestError:
        raise
    except DecodeKilled as exc:  # the request can never succeed here: 413 / 422, never a 503 "retry" or a 500
        raise decode_killed_error(exc) from None
    except NotAnImageObject as exc:
        raise RequestError(415, exc.reason) from None
    except ImageDecodeError as exc:
        raise RequestError(400, sanitize_reason(exc.reason, secrets=phi_values(data))) from None
    except (ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError, MemoryError) as exc:
        # a malformed file the decoder did not classify: it can never succeed, so 400 (never 503 "retry"), and
        # only the exception's type is said (its text may quote a header value)
        raise RequestError(400, f"unreadable image file ({type(exc).__name__})") from None
    frames = image.pixels if image.pixels.ndim == 4 else image.pixels[None]
    outputs = [None] * len(frames)
    for index, result in replica.enhance_each(list(frames), outscale=None if scale == model.scale else scale):
        if isinstance(result, BaseException):
            if on_fatal is not None:
                on_fatal(result)
            if isinstance(result, NonFiniteOutput):
                raise RequestError(500, str(result))
            log.warning("inference failed: %r", result)
            raise RequestError(500, f"inference failed: {type(result).__name__}")
        outputs[index] = result if result.ndim == 3 else result[:, :, None]
    out = np.stack(outputs)
    grid = out.shape[1] / frames.shape[1]
    provenance = response_provenance(model, settings, hashlib.sha256(data).hexdigest(), scale)
    pixels = out if image.meta.frames > 1 else out[0]
    kwargs = {"dicom_compression": dicom_compression} if dicom_compression != "none" else {}
    try:
        body = encode_image(pixels, image.meta, image.header, scale=grid, provenance=provenance, **kwargs)
    except ValueError as exc:
        raise RequestError(500, sanitize_reason(f"encode failed: {exc}", secrets=phi_values(data))) from None
    # the score of what the response holds: its stored values, back on [0, 1]
    maxval = np.float32(image.meta.maxval)
    score = consistency_psnr(np.rint(np.clip(out, 0, 1) * maxval) / maxval, frames)
    headers = {"X-Medsr-Model": model.name, "X-Medsr-Model-Sha256": model.sha256,
               "X-Medsr-Scale": f"{scale:g}", "X-Medsr-Engine-Revision": str(ENGINE_REVISION),
               "X-Medsr-Precision": settings.precision, "X-Medsr-Backend": settings.backend,
               "X-Medsr-Consistency-Psnr-Db": f"{score:.3f}", "X-Medsr-Format": image.meta.format,
               "X-Medsr-Seconds": f"{time.perf_counter() - t0:.3f}"}
    if model.sampling is not None:
        headers["X-Medsr-Sampling"] = json.dumps(model.sampling, sort_keys=True, separators=(",", ":"))
    return {"status": 200, "body": body, "media_type": MEDIA_TYPES[image.meta.format], "headers": headers}


def decode_killed_error(exc: DecodeKilled) -> RequestError:
    """The answer to a decode stopped in its capped child: 413 past ``serve.decode_memory_bytes``, 422 past
    ``serve.decode_timeout_s`` or when the decoder crashed; a generic reason (the cap's name, not the file's)."""
    if exc.cap == "memory":
        return RequestError(413, "decoding the image needed more memory than serve.decode_memory_bytes; stopped")
    if exc.cap == "time":
        return RequestError(422, "decoding the image took longer than serve.decode_timeout_s; stopped")
    return RequestError(422, "the image decoder stopped on this file (its process died); it cannot be decoded here")


def response_provenance(model: ModelFile, settings: EngineSettings, source_sha256: str, scale: float) -> dict[str, str]:
    """Provenance written into a response file: the nightly job's keys, with the request as the source."""
    return output_provenance(model_name=model.name, model_sha256=model.sha256, scale=f"{scale:g}",
                             params_json=params_json(serve_params(model, settings, scale)), source="request",
                             source_sha256=source_sha256, software=" (serve)")


def _replica_tag() -> str:
    """This Serve replica's id ("" outside Serve)."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        return ""
