"""One model replica: a model file loaded into a backend, run through the one engine, with per-image retry.

Every place that holds a model to enhance images with — the nightly job's actor pool, evaluation's replicas and the
Serve deployments — does the same four things, here once:

1. read the model (:class:`~medsr_dist.infer.model_file.ModelFile`) and build the configured backend for it;
2. check that the backend runs the precision the outputs will be labelled with (a CPU asked for fp16 runs fp32:
   the caller decides the label with :func:`resolve_precision` *before* replicas start, and a replica that would run
   another precision refuses to start instead of writing mislabelled outputs);
3. run images through :func:`~medsr_dist.infer.engine.enhance_many` (tiles batched across images);
4. when a batch fails, retry its images one by one, so that one bad image fails alone; a non-finite output
   (fp16 RRDBNet can overflow to NaN) is that image's failure, never a black image.

:meth:`ModelReplica.self_check` runs the backend once on a small synthetic image: what a Serve replica's health
check and a job's start-up rely on to say a backend is broken before the first real image.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr_dist.infer.engine import ENGINE_REVISION, TileSpec, auto_batch_size, enhance_many
from medsr_dist.infer.model_file import ModelFile, build_model_backend, runnable_precision

if TYPE_CHECKING:
    from medsr_dist.infer.backends import Backend
    from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

#: Default of ``outscale`` arguments: the replica's :attr:`EngineSettings.outscale` (``None`` means the native scale).
SETTINGS: Any = object()

__all__ = ["EngineSettings", "ModelReplica", "NonFiniteOutput", "PrecisionMismatch", "resolve_precision"]


class PrecisionMismatch(RuntimeError):
    """The backend on this node runs another precision than the one the outputs are labelled with."""


class NonFiniteOutput(ValueError):
    """The model produced NaN or infinite values for an image (nothing may be written for it)."""

    def __init__(self, count: int):
        super().__init__(f"the model output {count:,} non-finite values (NaN/Inf); nothing written")
        self.count = count

    def __reduce__(self):  # picklable across Ray workers
        return (NonFiniteOutput, (self.count,))


@dataclass(frozen=True)
class EngineSettings:
    """How a replica runs its model: the part of ``enhance``/``eval``/``serve`` sections every replica reads.

    Attributes:
        backend: registered backend name (``torch``, ``onnxruntime``, ...).
        precision: the precision to run *and to label outputs with* (resolve it with :func:`resolve_precision`).
        tile, tile_overlap, tile_blend: the engine's tiling (:class:`~medsr_dist.infer.engine.TileSpec`).
        batch_size: tiles per backend call; ``None``: the backend's default (1 on CPU, 8 on GPU).
        outscale: final scale (Lanczos after the model); ``None``: the model's native scale.
        threads: intra-op threads of the backend on CPU (the CPUs Ray granted the replica, see
            :func:`~medsr_dist.runtime.size_replicas`); ``None``: the backend's default.
    """

    backend: str = "torch"
    precision: str = "fp32"
    tile: int = 0
    tile_overlap: int = 64
    tile_blend: int = 4
    batch_size: int | None = None
    outscale: float | None = None
    threads: int | None = None

    @classmethod
    def of(cls, section: Any, **overrides: Any) -> EngineSettings:
        """The settings of a config section that has these fields (``EnhanceConfig``, ``EvalConfig``,
        ``ServeConfig``); missing fields keep their defaults, ``overrides`` win."""
        values = {name: getattr(section, name) for name in cls.__dataclass_fields__ if hasattr(section, name)}
        return cls(**{**values, **overrides})


def resolve_precision(backend: str, requested: str, *, gpu: bool) -> str:
    """The precision replicas of ``backend`` run for ``requested`` on GPUs (``gpu``) or on this machine's CPU.

    Outputs' identity and provenance must record this one, never the one asked for (a CPU asked for fp16 runs fp32).

    Raises:
        ValueError: unknown precision or backend.
    """
    return runnable_precision(backend, requested, gpu=gpu)


class ModelReplica:
    """A loaded model on this process's device, running the tiled engine.

    Example::

        replica = ModelReplica.load(model_file, storage, EngineSettings(tile=256, precision="fp32"))
        for index, result in replica.enhance_each(images):
            ...  # result: (H*s, W*s[, C]) float32 in [0, 1], or the exception that image failed with
    """

    def __init__(self, model: ModelFile | None, backend: Backend, settings: EngineSettings):
        """Wrap a built backend (use :meth:`load` to build one from a model file).

        A backend with ``prepare(spec)`` (TensorRT: engine built or loaded for the tile shapes) is prepared here.

        Raises:
            PrecisionMismatch: the backend runs another precision than ``settings.precision``.
            Whatever ``backend.prepare`` raises.
        """
        runs = getattr(backend, "precision", settings.precision)
        if runs != settings.precision:
            raise PrecisionMismatch(
                f"precision: this replica ({backend!r}) runs {runs}, but its outputs are keyed and labelled "
                f"{settings.precision}; run replicas on like nodes or ask for precision {runs}")
        self.model = model
        self.backend = backend
        self.settings = settings
        self.spec = TileSpec(tile=settings.tile, overlap=settings.tile_overlap, blend=settings.tile_blend,
                             batch_size=settings.batch_size or auto_batch_size(backend))
        prepare = getattr(backend, "prepare", None)
        if prepare is not None:  # backends that compile for the tile shapes (TensorRT): now, at replica start
            prepare(self.spec)

    @classmethod
    def load(cls, model: ModelFile, storage: Storage, settings: EngineSettings, *, device: str | None = None
             ) -> ModelReplica:
        """Build ``settings.backend`` for ``model`` (see :func:`~medsr_dist.infer.model_file.build_model_backend`).

        Raises:
            FileNotFoundError / ValueError: the model or its export is missing or stale (messages name it).
            PrecisionMismatch: see :meth:`__init__`.
        """
        if settings.threads:  # before the backend exists: onnxruntime sessions take OMP_NUM_THREADS when built
            os.environ["OMP_NUM_THREADS"] = str(settings.threads)
        backend = build_model_backend(model, settings.backend, storage, device=device, precision=settings.precision)
        set_threads = getattr(backend, "set_threads", None)
        if settings.threads and set_threads is not None:  # torch: set_num_threads (Ray's OMP_NUM_THREADS floors)
            set_threads(settings.threads)
        return cls(model, backend, settings)

    @property
    def scale(self) -> int:
        """The model's native scale."""
        return int(self.backend.scale)

    @property
    def precision(self) -> str:
        return self.settings.precision

    def describe(self) -> dict[str, Any]:
        """Provenance of what this replica computes: model name and sha256, scale, backend, precision, engine."""
        m = self.model
        return {"model": m.name if m else repr(self.backend), "model_sha256": m.sha256 if m else "",
                "scale": self.scale, "backend": self.settings.backend, "precision": self.precision,
                "engine": ENGINE_REVISION}

    def enhance_many(self, images: Iterator[np.ndarray] | Sequence[np.ndarray], *,
                     outscale: float | None | object = SETTINGS, fallbacks: list[int] | None = None
                     ) -> Iterator[np.ndarray]:
        """The engine on a stream of images (each ``(H, W[, C])`` float in [0, 1]); lazy, results in input order.

        ``outscale``: left out, ``settings.outscale``. ``fallbacks``: see :class:`~medsr_dist.infer.engine.TileBatcher`.
        Raises whatever the backend raises, mid-stream.
        """
        scale = self.settings.outscale if outscale is SETTINGS else outscale
        return enhance_many(self.backend, images, self.spec, outscale=scale, fallbacks=fallbacks)

    def enhance_each(
        self,
        images: Sequence[np.ndarray],
        *,
        outscale: float | None | object = SETTINGS,
        reraise: Callable[[BaseException], bool] | None = None,
        fallbacks: dict[int, int] | None = None,
    ) -> Iterator[tuple[int, np.ndarray | BaseException]]:
        """Enhance ``images`` together (tiles batched across them); if that fails, each not yet finished image
        again alone, so one bad image fails alone.

        Yields ``(index, result)`` in input order, each as soon as it is done: ``result`` is the
        ``(H*s, W*s[, C])`` float32 output in [0, 1], or the exception the image failed with
        (:class:`NonFiniteOutput` for NaN/Inf outputs). An exception for which ``reraise(exc)`` is true (a fatal
        device error: the process must restart) is raised instead of retried.

        ``fallbacks``: if given, ``fallbacks[index]`` is set before each yield to the number of batches holding the
        image's tiles that an fp16/bf16 backend recomputed in fp32 (non-finite output; see ``TorchBackend``).
        """
        done, counts = 0, []
        try:
            for out in self.enhance_many(images, outscale=outscale, fallbacks=counts):
                if fallbacks is not None:
                    fallbacks[done] = counts[done]
                yield done, _checked(out)
                done += 1
        except Exception as exc:  # noqa: BLE001 - the rest is retried image by image
            if reraise is not None and reraise(exc):
                raise
            if done >= len(images):
                return
            log.warning("batch inference failed (%s); retrying image by image", type(exc).__name__)
            for index in range(done, len(images)):
                try:
                    one: list[int] = []
                    (out,) = list(self.enhance_many([images[index]], outscale=outscale, fallbacks=one))
                    if fallbacks is not None:
                        fallbacks[index] = one[0]
                    yield index, _checked(out)
                except Exception as one:  # noqa: BLE001
                    if reraise is not None and reraise(one):
                        raise
                    yield index, one

    def self_check(self, side: int = 24) -> None:
        """Run the backend once, through the engine, on a small deterministic RGB image.

        Raises:
            RuntimeError: the backend raised, returned the wrong shape, or non-finite values (the message says which).
        """
        rng = np.random.default_rng(0)
        m = int(getattr(self.backend, "size_multiple", 1))
        side = -(-side // m) * m
        image = rng.random((side, side, 3), dtype=np.float32)
        try:
            out = next(enhance_many(self.backend, [image], TileSpec(batch_size=1)))
        except Exception as exc:  # noqa: BLE001 - reported as the reason the replica is unhealthy
            raise RuntimeError(f"backend self-check failed: {type(exc).__name__}: {exc}") from exc
        want = (side * self.scale, side * self.scale, 3)
        if out.shape != want:
            raise RuntimeError(f"backend self-check: output shape {out.shape}, expected {want}")
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise RuntimeError(f"backend self-check: {bad} non-finite output values")


def _checked(out: np.ndarray) -> np.ndarray | NonFiniteOutput:
    # a float64 sum answers the usual (finite) case without a full-size boolean temporary
    if math.isfinite(float(np.sum(out, dtype=np.float64))):
        return out
    return NonFiniteOutput(int(np.count_nonzero(~np.isfinite(out))))
