"""Stage 2 of the nightly job (actor pool): the job's own model replicas.

Contract: :class:`EnhanceReplica` adds ``output`` (and the uncertainty columns, see
:mod:`medsr_dist.enhance.uncertainty`) to every ``todo`` row; other rows pass through without pixels. 2-D images go
through :func:`~medsr_dist.infer.rows.enhance_rows` (tiles batched across frames and images); items of another kind
through their kind's enhancer (:data:`EnhanceReplica.enhancers`: volumes by
:class:`~medsr_dist.enhance.volumes.VolumeReplicas`, built with the first volume). A fatal device error ends the
process (exit :data:`FATAL_DEVICE_EXIT`) so that Ray restarts the actor.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from medsr_dist.config import EnhanceConfig, StorageConfig
from medsr_dist.enhance import uncertainty
from medsr_dist.enhance.pass_owner import watch_pass
from medsr_dist.enhance.spec import IMAGE_KIND
from medsr_dist.enhance.volumes import VolumeReplicas
from medsr_dist.infer.model_file import ModelFile
from medsr_dist.infer.provenance import VOLUME_KIND
from medsr_dist.infer.replica import EngineSettings, ModelReplica, PrecisionMismatch
from medsr_dist.infer.rows import NO_OUTPUT, NO_PIXELS, batch_rows, columns, enhance_rows, is_fatal_device_error
from medsr_dist.io.phi import item_label, sanitize_reason
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

#: Exit status of a replica process ended on a fatal device error (Ray restarts the actor).
FATAL_DEVICE_EXIT = 70


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

    def __init__(self, model: ModelFile, storage_cfg: StorageConfig, e: EnhanceConfig, precision: str | None = None,
                 threads: int | None = None, pass_owner=None):
        """``precision``: the one the job's output keys record (default ``enhance.precision``). A replica that
        would run another (e.g. a CPU node without bf16 hardware in a cluster whose driver has it) refuses to
        start (:class:`~medsr_dist.infer.replica.PrecisionMismatch`) rather than write outputs whose provenance
        is wrong. ``threads``: intra-op threads of the backend (the CPUs Ray granted, rounded up; ``None``: the
        backend's default, which Ray's OMP_NUM_THREADS sets to the whole CPUs granted). ``pass_owner``: the
        pass's :class:`~medsr_dist.enhance.pass_owner.PassOwner`; this replica ends itself once it is gone."""
        watch_pass(pass_owner)
        settings = EngineSettings.of(e, precision=precision or e.precision, threads=threads)
        try:
            self.replica = ModelReplica.load(model, Storage(storage_cfg), settings)
        except PrecisionMismatch as exc:
            raise PrecisionMismatch(f"enhance.{exc}") from None  # names the config key
        self.log_keys = bool(getattr(e, "log_keys", False))
        # K > 1 diffusion samples: each image's std tiles are kept until its std map is blended (only that family)
        self.uncertainty = uncertainty.replica_hook(self.replica)
        self.storage_cfg, self.e, self.precision = storage_cfg, e, settings.precision
        self._volumes: VolumeReplicas | None = None  # volume items' models: built with the first volume row
        log.info("model replica ready: %r, %s", self.replica.backend, self.replica.spec)

    @property
    def volumes(self) -> VolumeReplicas:
        """The volume models of this actor (:class:`~medsr_dist.enhance.volumes.VolumeReplicas`), made on first use."""
        if self._volumes is None:
            self._volumes = VolumeReplicas(self.replica, self.storage_cfg, self.e, self.precision)
        return self._volumes

    @property
    def backend(self):
        """The replica's :class:`~medsr_dist.infer.backends.Backend`."""
        return self.replica.backend

    def __call__(self, batch: dict) -> Iterator[dict]:
        rows = batch_rows(batch)
        for row in rows:
            row["output"] = NO_OUTPUT
            row["fp32_fallbacks"] = 0  # set by enhance_rows; every block of the stream has the same columns
            row.update(uncertainty.empty_columns())  # filled by the uncertainty hook (K > 1 samples)
        todo = [row for row in rows if row["status"] == "todo"]
        passing = [row for row in rows if row["status"] != "todo"]
        if passing:
            yield columns([self._drop_pixels(r) for r in passing])
        for row in [r for r in todo if (r.get("kind") or IMAGE_KIND) != IMAGE_KIND]:  # one by one (enhance/volumes.py)
            yield columns([self.enhancers[str(row["kind"])](self, row)])
        todo = [row for row in todo if (row.get("kind") or IMAGE_KIND) == IMAGE_KIND]
        done = 0
        try:
            for row in self._enhance(todo):
                done += 1
                yield columns([row])
        except Exception as exc:  # only fatal device errors get here: ModelReplica retries the rest
            self._restart_if_fatal(exc, todo[done] if done < len(todo) else {})
            raise

    def _enhance(self, rows: list[dict]) -> Iterator[dict]:
        enhanced = enhance_rows(self.replica, rows, log_keys=self.log_keys)
        return self.uncertainty(enhanced) if self.uncertainty is not None else enhanced

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

    #: {item kind: its enhancer} for items that are not 2-D images (those go through :meth:`_enhance` together).
    enhancers = {VOLUME_KIND: _volume}
