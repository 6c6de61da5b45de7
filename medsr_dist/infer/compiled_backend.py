"""Backend ``compiled``: the torch generator through ``torch.compile`` (inductor), from PyTorch alone.

The GPU path that needs no TensorRT. :class:`CompiledBackend` is a :class:`~medsr_dist.infer.backends.TorchBackend`
(same precisions, channels_last, fp32 fallback for non-finite fp16/bf16 batches) whose forward is
``torch.compile(model, dynamic=False)``: on a GPU with ``mode="max-autotune-no-cudagraphs"`` (CUDA graphs re-recorded
per shape made conv nets ~10x slower in a PyTorch issue; without them autotuning still picks the conv/GEMM
kernels), on CPU inductor's default mode. Shapes are static: every batch is padded to the engine's
``batch_size`` tiles (zeros, dropped again), and :meth:`CompiledBackend.prepare` compiles the engine's full tile
window ``(batch_size, 3, W, W)`` at replica start, so the first image pays no compilation. Another window size
(edge tiles, whole small images) compiles on first sight and is kept (up to :data:`MAX_SHAPES`).

Compiled artefacts, two levels, both keyed by :func:`compile_cache_key` (what an engine cache is keyed by: model
sha256, torch version, device name and capability, window shape, precision, mode):

* on the node: inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) is pointed at ``$MEDSR_COMPILE_CACHE``
  (default ``~/.cache/medsr-dist/inductor``) ``/<key>``, so a replica restarted on the same node loads the kernels;
* on the object store, beside the model as TensorRT plans are (``<model dir>/compiled/<key>.bin``): PyTorch's
  portable cache (``torch.compiler.save_cache_artifacts`` after the warm-up compile, ``load_cache_artifacts``
  before it), so a fresh node reuses what another node of the same kind compiled. A missing or unreadable entry
  is compiled (and written); a store that refuses the write (read-only models) is logged, never fatal. Zoo
  models (no store folder) cache on the node only.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec, plan_axis
from medsr_dist.infer.registry import register_backend

if TYPE_CHECKING:
    from medsr_dist.infer.model_file import ModelFile
    from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

#: Distinct input shapes one replica compiles at most (torch._dynamo's recompile limit for the generator).
MAX_SHAPES = 16
#: Environment variable naming the root of the compiled-kernel caches.
CACHE_ENV = "MEDSR_COMPILE_CACHE"
#: Folder beside the model (on its store) holding the portable caches, ``<key>.bin``.
STORE_CACHE_DIR = "compiled"


def compile_cache_key(model_sha256: str, device: torch.device, shape: tuple[int, ...], precision: str, mode: str) -> str:
    """Hex key of a compiled generator: model, torch version, device name and capability, shape, precision, mode."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = "cpu", torch.backends.cpu.get_cpu_capability()
    text = "|".join([model_sha256, torch.__version__, name, cap, "x".join(map(str, shape)), precision, mode])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@register_backend("compiled")
class CompiledBackend(TorchBackend):
    """:class:`~medsr_dist.infer.backends.TorchBackend` with a ``torch.compile``'d forward (see the module docstring).

    Attributes:
        mode: the ``torch.compile`` mode (``max-autotune-no-cudagraphs`` on a GPU, ``default`` on CPU).
        batch_size: tiles every call is padded to (the engine's, set by :meth:`prepare`; 1 before).
        cache_dir: the inductor cache directory of this model/device/shape/precision (set by :meth:`prepare`).
    """

    def __init__(self, model, scale: int, device: str | None = None, precision: str = "fp32",
                 size_multiple: int | None = None, model_sha256: str = "", storage: Storage | None = None,
                 store_prefix: str | None = None) -> None:
        """``storage``/``store_prefix``: where portable caches are shared across nodes (none: the node's only)."""
        super().__init__(model, scale=scale, device=device, precision=precision, size_multiple=size_multiple)
        self.mode = "max-autotune-no-cudagraphs" if self.device.type == "cuda" else "default"
        self.model_sha256 = model_sha256
        self.batch_size = 1
        self.cache_dir: str | None = None
        self.storage, self.store_prefix = storage, store_prefix
        #: the store's portable cache: ``"hit"`` (loaded), ``"written"`` (compiled here and shared), ``"miss"``
        #: (compiled here, not shared: see the log), ``None`` (no store)
        self.store_cache: str | None = None
        self._compiled = None

    @classmethod
    def from_model_file(cls, model: ModelFile, storage: Storage, *, device: str | None = None,
                        precision: str = "fp32") -> CompiledBackend:
        """The network of ``model`` (built from its weights, as backend ``torch``), compiled at :meth:`prepare`;
        portable caches in ``compiled/`` beside the model on its store (a zoo model: none)."""
        prefix = model.uri.rsplit("/", 1)[0] + "/" + STORE_CACHE_DIR if "/" in model.uri else None
        return cls(model.build(storage), scale=model.scale, device=device, precision=precision,
                   size_multiple=model.size_multiple, model_sha256=model.sha256, storage=storage, store_prefix=prefix)

    def window(self, spec: TileSpec) -> int:
        """Side of the engine's largest tile window for ``spec`` (input pixels); 0 when it sends whole images."""
        if not spec.tile:
            return 0
        # an axis just longer than the inner window is cut, and its first window is the full one
        inner = plan_axis(10**6, spec, self.size_multiple)
        return max(b - a for a, b in zip(inner.window_starts, inner.window_stops))

    def prepare(self, spec: TileSpec) -> None:
        """Compile for ``spec``'s tile batch: ``(batch_size, 3, W, W)`` with ``W`` its full window, run once now."""
        self.batch_size = spec.batch_size
        side = self.window(spec)
        shape = (self.batch_size, 3, side or 64, side or 64)
        key = compile_cache_key(self.model_sha256, self.device, shape, self.precision, self.mode)
        root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medsr-dist" / "inductor")
        self.cache_dir = str(root / key)
        os.makedirs(self.cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.cache_dir  # read by inductor whenever it compiles
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_SHAPES)
        uri = f"{self.store_prefix}/{key}.bin" if self.storage is not None and self.store_prefix else None
        if uri is not None:
            self.store_cache = "miss"
            try:
                if self.storage.exists(uri):
                    torch.compiler.load_cache_artifacts(self.storage.read_bytes(uri))
                    self.store_cache = "hit"
            except Exception as exc:  # noqa: BLE001 - a stale or foreign entry: compile, and write it anew
                log.warning("compiled cache %s unusable (%s); compiling", uri, type(exc).__name__)
        self._compiled = torch.compile(self.model, mode=self.mode, dynamic=False)
        if side:
            with torch.inference_mode():
                self._forward(torch.zeros(shape, device=self.device, dtype=self.dtype).contiguous(
                    memory_format=torch.channels_last))
        if uri is not None and self.store_cache == "miss":
            saved = torch.compiler.save_cache_artifacts()
            try:
                if saved:
                    self.storage.write_bytes(uri, saved[0])
                    self.store_cache = "written"
            except Exception as exc:  # noqa: BLE001 - read-only model stores: the node cache still works
                log.warning("compiled cache not shared: cannot write %s (%s)", uri, type(exc).__name__)
        log.info("compiled backend ready: %s, %s, window %s, cache %s (store: %s)", self.mode, self.precision, shape,
                 self.cache_dir, self.store_cache)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            self.prepare(TileSpec(batch_size=max(1, len(x))))
        n = len(x)
        if n < self.batch_size:  # the static batch: pad with zero tiles, dropped from the output
            pad = torch.zeros((self.batch_size - n, *x.shape[1:]), device=x.device, dtype=x.dtype)
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        elif n > self.batch_size:
            return torch.cat([self._forward(x[i:i + self.batch_size]) for i in range(0, n, self.batch_size)])
        return self._compiled(x)[:n]

    def describe(self) -> dict:
        return {"mode": self.mode, "precision": self.precision, "batch_size": self.batch_size, "cache_dir": self.cache_dir,
                "store_cache": self.store_cache}

    def __repr__(self) -> str:
        return (f"CompiledBackend({type(self.model).__name__}, scale={self.scale}, device={self.device}, "
                f"precision={self.precision}, mode={self.mode})")
