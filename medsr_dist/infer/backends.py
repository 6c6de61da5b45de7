"""Inference backends: the part of inference that actually runs a network on a batch of tiles.

Everything else (tiling, batching, blending, channel handling, resizing) lives in
:mod:`medsr_dist.infer.engine` and is shared by every backend. A backend only has to satisfy
:class:`Backend`. Backends are registered by name in :data:`medsr_dist.infer.registry.BACKENDS` so a config can
say ``backend: torch``; :class:`TorchBackend` registers itself here, other runtimes (onnxruntime, TensorRT) with
:func:`~medsr_dist.infer.registry.register_backend` in their own module.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from medsr_dist.infer.registry import PRECISIONS, backend_factory, register_backend

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions in hardware (oneDNN with AVX512-BF16 or AMX).

    oneDNN also *emulates* bf16 on plain AVX-512, which is slower than fp32, so the CPU's own flags decide;
    where they cannot be read (not Linux) the answer is no.
    """
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return False
    return bool(_cpu_flags() & NATIVE_BF16_FLAGS)


def torch_precision(requested: str, device: str | torch.device) -> str:
    """The precision :class:`TorchBackend` runs when ``requested`` on ``device``.

    CUDA runs what is asked. A CPU runs bf16 only where it has bf16 in hardware (:func:`cpu_has_native_bf16`:
    about 2x fp32 there, see docs/PERFORMANCE.md) and fp32 otherwise; fp16 convolutions have no fast CPU path.

    Raises:
        ValueError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp32" or torch.device(device).type == "cuda":
        return requested
    if requested == "bf16" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


@runtime_checkable
class Backend(Protocol):
    """Runs a super-resolution network on a batch of same-sized RGB tiles.

    Attributes:
        scale: native upscaling factor of the network (output side = input side * scale).
        size_multiple: input height and width must be multiples of this (e.g. 2 for RRDBNet x2, which
            pixel-unshuffles by 2; 4 for RRDBNet x1). The engine pads to satisfy it; 1 means any size.
    """

    scale: int
    size_multiple: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Upscale a batch.

        Args:
            batch: (B, 3, h, w) float32 RGB in [0, 1], C-contiguous; h and w are multiples of
                ``size_multiple``.

        Returns:
            (B, 3, h * scale, w * scale) float32 RGB in [0, 1].
        """
        ...


@register_backend("torch")
class TorchBackend:
    """A :class:`Backend` that runs a ``torch.nn.Module`` under ``torch.inference_mode``.

    The backend takes the module over: it is set to eval mode, moved to ``device``, converted to
    channels_last memory format and, for fp16/bf16, cast to that dtype (as RealESRGANer does with
    ``model.half()``). On CPU only bf16 on a CPU with bf16 hardware is honoured; other reduced-precision
    requests fall back to fp32 (logged; see :func:`torch_precision`). :attr:`precision` is what runs. The
    network output is clamped to [0, 1] and returned as float32 whatever the compute precision.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: int,
        device: str | None = None,
        precision: str = "fp32",
        size_multiple: int | None = None,
    ) -> None:
        """
        Args:
            model: maps (B, 3, h, w) float RGB in [0, 1] to (B, 3, h*scale, w*scale).
            scale: the model's native upscaling factor (>= 1).
            device: torch device string; ``None`` picks ``"cuda"`` when available, else ``"cpu"``.
            precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; see :func:`torch_precision` for what runs where.
            size_multiple: input sides must be multiples of this; ``None`` reads ``model.size_multiple``
                if the model defines it, else 1.

        Raises:
            ValueError: unknown precision, scale < 1 or size_multiple < 1.
        """
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if size_multiple is None:
            size_multiple = int(getattr(model, "size_multiple", 1))
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        self.scale = int(scale)
        self.size_multiple = int(size_multiple)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runs = torch_precision(precision, self.device)
        if runs != precision:
            logger.warning("precision %s requested on %s, which has no fast path for it; running %s",
                           precision, self.device, runs)
        self.precision = precision = runs
        self.dtype = _TORCH_DTYPES[precision]
        model.eval().requires_grad_(False)
        self.model = model.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        #: batches whose fp16/bf16 output had NaN/Inf and were computed again in fp32 (see :meth:`__call__`)
        self.fp32_fallbacks = 0
        self._fp32_model: nn.Module | None = None

    @staticmethod
    def runnable_precision(requested: str, *, gpu: bool) -> str:
        """The precision a replica of this backend will run for ``requested`` (on a GPU, or on this CPU)."""
        return torch_precision(requested, "cuda" if gpu else "cpu")

    @staticmethod
    def set_threads(threads: int) -> None:
        """Intra-op threads of this process's torch (the CPUs a replica was granted)."""
        set_torch_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """See :meth:`Backend.__call__`.

        fp16/bf16: a batch whose output has NaN/Inf (fp16 RRDBNet overflows on some inputs) is computed again in
        fp32 (an fp32 copy of the network, made on first need), counted in :attr:`fp32_fallbacks` and logged; the
        replica's finiteness check still fails an image whose fp32 output is not finite either."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, h, w) batch, got shape {batch.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x32 = x.to(device=self.device, memory_format=torch.channels_last)
            y = self._forward(x32.to(self.dtype)).float()
            if self.dtype != torch.float32 and not bool(torch.isfinite(y).all()):
                self.fp32_fallbacks += 1
                logger.warning("%s output had NaN/Inf for a batch of %d tile(s); computed again in fp32 (%d such "
                               "batch(es) so far)", self.precision, len(batch), self.fp32_fallbacks)
                if self._fp32_model is None:
                    self._fp32_model = copy.deepcopy(self.model).float()
                y = self._fp32_model(x32)
            return np.ascontiguousarray(y.clamp_(0.0, 1.0).cpu().numpy())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a (B, 3, h, w) batch already on the device in the compute dtype."""
        return self.model(x)

    def __repr__(self) -> str:
        return (
            f"TorchBackend({type(self.model).__name__}, scale={self.scale}, size_multiple={self.size_multiple}, "
            f"device={self.device}, precision={self.precision})"
        )


def set_torch_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when it differs (Ray's OMP_NUM_THREADS gives an actor of 1.5 CPUs one
    thread: the whole CPUs, floored)."""
    if threads >= 1 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch intra-op threads: %d", threads)


def build_backend(name: str, /, **kwargs: Any) -> Backend:
    """Build the backend registered as ``name`` with the factory's keyword arguments.

    Raises:
        ValueError: no backend of that name; the message lists the available ones.
    """
    return backend_factory(name)(**kwargs)
