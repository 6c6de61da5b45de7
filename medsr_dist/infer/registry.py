"""Registries of the inference plug-ins: backends by name, and the inference pieces a model family adds.

Standard-library only (no torch, no runtime imported), so a config check can validate ``backend:`` against
:func:`backend_names` before any Ray or torch work. Each entry registers itself in its own module with the
decorator (``@register_backend("onnxruntime")`` above the class); the lazy entries below name those modules, which
are imported on first use (:class:`medsr_dist.models.registry.Registry`).

* :data:`BACKENDS`: engine :class:`~medsr_dist.infer.backends.Backend` factories by name (``enhance.backend``,
  ``serve.backend``, ...). A factory other than ``torch`` offers ``from_model_file(model, storage, *, device,
  precision)`` and may state ``runnable_precision(requested, *, gpu)``.
* :data:`FAMILY_BACKENDS`: a model family whose inference is not one forward (diffusion: an iterative sampler)
  supplies its own Backend, ``factory(model, backend, storage, *, device, precision) -> Backend``, used whatever
  runtime ``backend`` names.
* :data:`FAMILY_EXPORTERS`: a family with several inference networks exports them itself (``medsr export
  --format onnx``), ``exporter(model, storage, output, *, opset, exporter) -> OnnxExport``.

Adding a backend: one module with ``@register_backend("name")`` on its factory, one ``register_lazy`` line here.
"""
from __future__ import annotations

from typing import Any

from medsr_dist.models.registry import Registry

#: ``enhance.backend`` / ``serve.backend: auto``: the backend is chosen per model and hardware
#: (:func:`medsr_dist.infer.model_file.choose_backend`) before any output is keyed.
AUTO_BACKEND = "auto"

#: Precisions a backend may be asked to run (``enhance.precision`` and the like).
PRECISIONS = ("fp32", "fp16", "bf16")

#: Backend factories by name (classes or callables returning a Backend).
BACKENDS: Registry[Any] = Registry("backend")
BACKENDS.register_lazy("torch", "medsr_dist.infer.backends")  # lazy: the module imports torch
BACKENDS.register_lazy("onnxruntime", "medsr_dist.infer.onnx_backend")  # lazy: optional dependency (onnxruntime)
BACKENDS.register_lazy("compiled", "medsr_dist.infer.compiled_backend")  # lazy: the module imports torch
# lazy: optional dependency (the `tensorrt` package and a CUDA GPU to run)
BACKENDS.register_lazy("tensorrt", "medsr_dist.infer.tensorrt_backend")

#: A family's own Backend factory, by family name.
FAMILY_BACKENDS: Registry[Any] = Registry("family backend")
FAMILY_BACKENDS.register_lazy("ldm", "medsr_dist.infer.diffusion_backend")  # lazy: torch + the diffusion sampler

#: A family's own ONNX exporter, by family name.
FAMILY_EXPORTERS: Registry[Any] = Registry("family ONNX exporter")
FAMILY_EXPORTERS.register_lazy("ldm", "medsr_dist.infer.diffusion_export")  # lazy: torch + the diffusion sampler


def register_backend(name: str):
    """Decorator that registers a backend class/factory under ``name``.

    Raises:
        ValueError: ``name`` is already registered to a different factory.
    """
    return BACKENDS.register(name)


def register_family_backend(family: str):
    """Decorator that registers the Backend factory of model family ``family`` (see :data:`FAMILY_BACKENDS`)."""
    return FAMILY_BACKENDS.register(family)


def register_family_exporter(family: str):
    """Decorator that registers the ONNX exporter of model family ``family`` (see :data:`FAMILY_EXPORTERS`)."""
    return FAMILY_EXPORTERS.register(family)


#: Registered backends that a config may not name yet, with the reason (README, "TensorRT").
NOT_OFFERED = {"tensorrt": "it has not run on a GPU yet (jobs/gpu_check.sh)"}


def backend_names() -> list[str]:
    """Every backend name (registered or importable on first use), sorted; imports nothing."""
    return BACKENDS.names()


def offered_backend_names() -> list[str]:
    """The backends ``enhance.backend``, ``eval.backend`` and ``serve.backend`` may name: every registered one but
    those in :data:`NOT_OFFERED`, the default (``torch``) first; imports nothing."""
    return sorted((name for name in BACKENDS.names() if name not in NOT_OFFERED), key=lambda name: name != "torch")


def backend_factory(backend: str) -> Any:
    """The factory registered as ``backend``, importing its module first if it registers itself there.

    Raises:
        ValueError: unknown or not yet implemented backend.
        ImportError: the backend's runtime package is not installed.
    """
    if backend in BACKENDS:
        try:
            return BACKENDS.get(backend)
        except ModuleNotFoundError as exc:
            if exc.name == BACKENDS.module_of(backend):
                raise ValueError(f"backend {backend!r} is not implemented yet (available: torch, onnxruntime)") from None
            raise
        except KeyError:
            pass
    raise ValueError(f"unknown backend {backend!r}; available: {backend_names()}")
