"""The ``onnxruntime`` backend: runs the ONNX export of a model (``medsr export --format onnx``) with ONNX Runtime.

Importing this module registers the backend under ``"onnxruntime"`` (``enhance.backend: onnxruntime``).

A runtime backend needs two things, and a TensorRT backend would provide the same two (building its engine from
the same ONNX export, with an optimisation profile over the tile sizes the engine produces):

* ``__call__(batch)``: (B, 3, h, w) float32 RGB in [0, 1] -> (B, 3, h*scale, w*scale) float32 in [0, 1], plus the
  ``scale`` and ``size_multiple`` attributes (the :class:`~medsr_dist.infer.backends.Backend` protocol);
* ``from_model_file(model, storage, *, device, precision)``: build itself for a
  :class:`~medsr_dist.infer.model_file.ModelFile` (see :func:`~medsr_dist.infer.model_file.build_model_backend`).
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from medsr_dist.infer.registry import register_backend
from medsr_dist.infer.export import INPUT_NAME, META_SCALE, META_SIZE_MULTIPLE, META_SOURCE_SHA256

if TYPE_CHECKING:
    from medsr_dist.infer.model_file import ModelFile
    from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class StaleExportError(ValueError):
    """The ONNX export was made from other weights than the model it is used for."""


@register_backend("onnxruntime")
class OnnxRuntimeBackend:
    """A :class:`~medsr_dist.infer.backends.Backend` running an ONNX model in an ONNX Runtime session.

    The CUDA execution provider is used when ``device`` is ``"cuda"`` (required then) or ``None`` and this
    onnxruntime build has it (package ``onnxruntime-gpu``); otherwise the CPU provider. The network output is
    clamped to [0, 1], like the torch backend does. Only fp32 graphs are run: a reduced-precision request is logged
    and ignored (an fp16 export is future work; TensorRT would build fp16 engines from the fp32 export).
    """

    def __init__(
        self,
        model: bytes | str | os.PathLike,
        scale: int | None = None,
        size_multiple: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
    ) -> None:
        """
        Args:
            model: serialised ONNX model, or a local path to one.
            scale: native upscaling factor; ``None`` reads the export's ``medsr:scale`` metadata.
            size_multiple: input sides must be multiples of this; ``None`` reads ``medsr:size_multiple`` (else 1).
            device: ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or ``None`` (CUDA when available).
            precision: only ``"fp32"`` runs; others fall back to fp32 with a warning.
            threads: intra-op threads on CPU; ``None`` follows ``OMP_NUM_THREADS`` (which Ray sets to the actor's
                CPUs), else ONNX Runtime's default (all cores).

        Raises:
            ValueError: scale unknown (neither given nor in the metadata), or CUDA requested but unavailable.
        """
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device is not None and device.startswith("cuda"):
            if CUDA_PROVIDER not in available:
                raise ValueError(f"device {device!r} requested but this onnxruntime has no CUDA provider "
                                 f"(install onnxruntime-gpu); available: {available}")
            # "cuda:N" picks GPU N (a Ray GPU actor sees its own GPU as 0)
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
        elif device is None and CUDA_PROVIDER in available and _cuda_visible():
            providers = [CUDA_PROVIDER, CPU_PROVIDER]
        else:
            providers = [CPU_PROVIDER]
        if precision != "fp32":
            log.warning("onnxruntime backend runs the fp32 export; precision %s ignored", precision)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        if threads:
            options.intra_op_num_threads = threads
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else bytes(model)
        self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if scale is None:
            if META_SCALE not in self.metadata:
                raise ValueError("the ONNX model has no medsr:scale metadata; pass scale=")
            scale = int(self.metadata[META_SCALE])
        if size_multiple is None:
            size_multiple = int(self.metadata.get(META_SIZE_MULTIPLE, 1))
        self.scale = int(scale)
        self.size_multiple = int(size_multiple)
        self.providers = self.session.get_providers()
        self.precision = "fp32"

    @staticmethod
    def runnable_precision(requested: str, *, gpu: bool) -> str:
        """Always ``"fp32"``: the export is an fp32 graph (see the class docstring)."""
        return "fp32"

    @classmethod
    def from_model_file(
        cls, model: ModelFile, storage: Storage, *, device: str | None = None, precision: str = "fp32"
    ) -> OnnxRuntimeBackend:
        """The backend for ``model``'s ONNX export at ``model.onnx_uri``.

        Raises:
            FileNotFoundError: no export there (the message gives the command that makes one).
            StaleExportError: the export records other source weights than ``model.sha256``.
        """
        uri = model.onnx_uri
        if not uri or not storage.exists(uri):
            raise FileNotFoundError(
                f"backend onnxruntime: no ONNX export {uri or '(no default place for ' + model.uri + ')'}; make it with "
                f"`medsr export --format onnx -c <config>` (or set enhance.onnx_model)"
            )
        backend = cls(storage.read_bytes(uri), device=device, precision=precision)
        recorded = backend.metadata.get(META_SOURCE_SHA256)
        if recorded != model.sha256:
            raise StaleExportError(f"{uri} was exported from weights with sha256 {recorded}, not from {model.uri} "
                                   f"(sha256 {model.sha256}); export again with `medsr export --format onnx`")
        if backend.scale != model.scale:
            raise StaleExportError(f"{uri} is a x{backend.scale} model, {model.uri} is x{model.scale}")
        return backend

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """See :meth:`medsr_dist.infer.backends.Backend.__call__`."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, h, w) batch, got shape {batch.shape}")
        out = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.clip(out, 0.0, 1.0, out=out)

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(scale={self.scale}, size_multiple={self.size_multiple}, providers={self.providers})"


def _cuda_visible() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset") not in ("", "-1")
