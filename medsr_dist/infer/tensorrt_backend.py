"""The ``tensorrt`` backend: a TensorRT engine built from the model's ONNX export (``medsr export --format onnx``).

Importing this module registers the backend under ``"tensorrt"``; the ``tensorrt`` package (PyPI ``tensorrt``,
several GB of CUDA libraries, so not a dependency of medsr-dist) is imported only when an engine is built or run.

* **Precision.** TensorRT 11 networks are strongly typed (``BuilderFlag.FP16`` is gone): the precision is the ONNX
  graph's. fp32 runs the export as it is; fp16 runs :func:`fp16_onnx` of it — convolutions and activations in fp16,
  the nodes where values can outgrow fp16's 65504 (residual additions and scalings, reductions, divisions, powers,
  exponentials) kept fp32, inputs and outputs fp32.
* **Profiles.** The engine's one optimisation profile covers exactly the tiles the inference engine will send:
  :func:`plan_profile` from the replica's :class:`~medsr_dist.infer.engine.TileSpec` (batch 1..batch_size x window
  sides from the size multiple up to the inner tile window).
* **Cache.** Built engines (plans) are cached on the object store beside the export, under
  ``<export dir>/tensorrt/<key>.plan`` with :func:`engine_cache_key` = sha256 of (ONNX sha256, GPU name and compute
  capability, TensorRT version, profile, precision): a plan is only ever loaded where it was built for.
* **Lifecycle.** :meth:`TensorRTBackend.prepare` (called by :class:`~medsr_dist.infer.replica.ModelReplica` when a
  replica starts) loads or builds the plan. A cached plan that does not deserialise is rebuilt; a build that fails
  raises :class:`TensorRTError` with the parser's/builder's reason (a Serve replica reports it as unhealthy).
  Batches run with ``execute_async_v3`` on the replica's own CUDA stream; outputs are clamped to [0, 1] (the engine
  and the replica check finiteness: fp16 RRDBNet can overflow to NaN on some inputs).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr_dist.infer.registry import register_backend
from medsr_dist.infer.engine import TileSpec, plan_axis
from medsr_dist.infer.export import INPUT_NAME, META_SCALE, META_SIZE_MULTIPLE, META_SOURCE_SHA256, OUTPUT_NAME

if TYPE_CHECKING:
    from medsr_dist.infer.model_file import ModelFile
    from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

CACHE_DIR = "tensorrt"
#: ONNX ops kept in fp32 in an fp16 graph: residual accumulation/scaling (RRDBNet's ``x + 0.2 * out`` chains grow
#: past fp16's range on bright inputs), and the ops of other families' normalisation/attention that overflow.
FP32_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "ReduceMean", "ReduceSum", "Softmax",
            "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Resize", "Upsample")
WORKSPACE_BYTES = 4 << 30


class TensorRTError(RuntimeError):
    """An engine could not be built, loaded or run; the message says which step and why."""


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile of the input ``(B, 3, H, W)``: min / opt / max shapes."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def covers(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def text(self) -> str:
        return "/".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))


def plan_profile(spec: TileSpec, size_multiple: int = 1, max_image_side: int = 2048) -> Profile:
    """The profile covering every batch the engine sends for ``spec``.

    With tiling, a window side is at most the inner window (``plan_axis`` of a long axis) — images shorter than it
    go through whole, padded to a multiple of ``size_multiple`` — so sides range from ``size_multiple`` to that.
    Without tiling (``spec.tile == 0``) whole images go through: sides up to ``max_image_side`` (rounded up to the
    multiple), optimised for 512. Batches range from 1 to ``spec.batch_size`` (optimised for the full batch).

    Raises:
        ValueError: size_multiple < 1 or max_image_side < 1.
    """
    if size_multiple < 1 or max_image_side < 1:
        raise ValueError(f"size_multiple and max_image_side must be >= 1, got {size_multiple}, {max_image_side}")
    m = size_multiple
    if spec.tile:
        longest = plan_axis(8 * (spec.tile + 2 * (spec.overlap + spec.blend)) + 8 * m, spec, m)
        side = opt = longest.window
    else:
        side = -(-max_image_side // m) * m
        opt = min(side, -(-512 // m) * m)
    b = spec.batch_size
    return Profile(min=(1, 3, m, m), opt=(b, 3, opt, opt), max=(b, 3, side, side))


def engine_cache_key(onnx_sha256: str, gpu_name: str, compute_capability: tuple[int, int] | str,
                     tensorrt_version: str, profile: Profile, precision: str) -> str:
    """32 hex digits identifying a plan: it is valid only for this ONNX graph, GPU model and compute capability,
    TensorRT version, profile and precision (TensorRT plans are not portable across any of them)."""
    cc = compute_capability if isinstance(compute_capability, str) else ".".join(map(str, compute_capability))
    text = json.dumps({"onnx": onnx_sha256, "gpu": gpu_name, "cc": cc, "trt": tensorrt_version,
                       "profile": asdict(profile), "precision": precision}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def fp16_onnx(model_bytes: bytes, keep_fp32_ops: tuple[str, ...] = FP32_OPS) -> bytes:
    """An fp16 copy of an fp32 ONNX graph: weights and every op not in ``keep_fp32_ops`` in fp16, inputs and
    outputs fp32 (casts inserted), ``medsr:*`` metadata kept plus ``medsr:precision = fp16``.

    Uses ONNX Runtime's converter (``onnxruntime.transformers.float16``), which also clamps initialisers to fp16's
    range. Raises ``onnx`` errors for an invalid graph.
    """
    import onnx
    from onnxruntime.transformers import float16

    model = onnx.load_from_string(model_bytes)
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _sort_nodes(converted.graph)  # the converter appends its input casts at the end
    props = {p.key: p.value for p in converted.metadata_props}
    props["medsr:precision"] = "fp16"
    del converted.metadata_props[:]
    for key, value in props.items():
        entry = converted.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def _sort_nodes(graph) -> None:
    """Reorder ``graph.node`` topologically (ONNX requires it; a node keeps its place among the ready ones)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"ONNX graph has a cycle or a dangling input at {rest[0].name}")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def onnx_metadata(model_bytes: bytes) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}


@register_backend("tensorrt")
class TensorRTBackend:
    """A :class:`~medsr_dist.infer.backends.Backend` running a TensorRT engine on one CUDA GPU.

    Built in two steps: the constructor takes the ONNX export (cheap, no GPU work); :meth:`prepare` plans the
    profile from the replica's TileSpec and loads (or builds and caches) the engine. ``__call__`` prepares with a
    default profile if nobody did.
    """

    def __init__(self, onnx_bytes: bytes, *, precision: str = "fp32", storage: Storage | None = None,
                 cache_prefix: str | None = None, device: str | None = None, max_image_side: int = 2048):
        """
        Args:
            onnx_bytes: the fp32 ONNX export (its ``medsr:scale``/``medsr:size_multiple`` metadata are read).
            precision: ``fp32`` or ``fp16`` (``bf16`` is refused: TensorRT runs it, RRDBNet's outputs in it are not
                fit for archives, see README).
            storage / cache_prefix: where plans are cached (none: built at every start).
            device: ``cuda`` / ``cuda:N`` or None (the current CUDA device).
            max_image_side: profile bound for untiled use (``tile: 0``).

        Raises:
            ValueError: unknown precision, missing scale metadata, or a CPU device.
        """
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"backend tensorrt runs fp32 or fp16, not {precision!r}")
        if device is not None and not str(device).startswith("cuda"):
            raise ValueError(f"backend tensorrt runs on a CUDA GPU, not on {device!r}")
        meta = onnx_metadata(onnx_bytes)
        if META_SCALE not in meta:
            raise ValueError("the ONNX model has no medsr:scale metadata (export it with `medsr export --format onnx`)")
        self.scale = int(meta[META_SCALE])
        self.size_multiple = int(meta.get(META_SIZE_MULTIPLE, 1))
        self.precision = precision
        self.metadata = meta
        self._onnx = onnx_bytes
        self.onnx_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        self.storage, self.cache_prefix = storage, cache_prefix
        self.device_name = device or "cuda"
        self.max_image_side = max_image_side
        self.profile: Profile | None = None
        self.cache_hit: bool | None = None
        self._context = None

    @staticmethod
    def runnable_precision(requested: str, *, gpu: bool) -> str:
        """fp16 and fp32 run as asked (on a GPU: there is no CPU TensorRT); bf16 is refused, not silently changed.

        Raises:
            ValueError: ``requested`` is bf16.
        """
        if requested not in ("fp32", "fp16"):
            raise ValueError(f"backend tensorrt runs fp32 or fp16, not {requested!r}")
        return requested

    @classmethod
    def from_model_file(cls, model: ModelFile, storage: Storage, *, device: str | None = None,
                        precision: str = "fp32") -> TensorRTBackend:
        """The backend for ``model``'s ONNX export at ``model.onnx_uri``; plans cached in ``tensorrt/`` beside it.

        Raises:
            FileNotFoundError: no export (the message gives the command that makes one).
            ValueError: the export records other weights than ``model.sha256``, or another scale.
        """
        uri = model.onnx_uri
        if not uri or not storage.exists(uri):
            raise FileNotFoundError(f"backend tensorrt: no ONNX export {uri or '(none for ' + model.uri + ')'}; make it "
                                    f"with `medsr export --format onnx -c <config>`")
        data = storage.read_bytes(uri)
        meta = onnx_metadata(data)
        if meta.get(META_SOURCE_SHA256) != model.sha256:
            raise ValueError(f"{uri} was exported from weights with sha256 {meta.get(META_SOURCE_SHA256)}, not from "
                             f"{model.uri} (sha256 {model.sha256}); export again with `medsr export --format onnx`")
        prefix = uri.rsplit("/", 1)[0] + "/" + CACHE_DIR if "/" in uri else CACHE_DIR
        backend = cls(data, precision=precision, storage=storage, cache_prefix=prefix, device=device)
        if backend.scale != model.scale:
            raise ValueError(f"{uri} is a x{backend.scale} model, {model.uri} is x{model.scale}")
        return backend

    # ---- engine ---------------------------------------------------------------------------------------------
    def prepare(self, spec: TileSpec) -> None:
        """Load or build the engine whose profile covers ``spec``'s tiles (see :func:`plan_profile`).

        Raises:
            TensorRTError: no CUDA GPU / no tensorrt package, or the parse/build failed (with TensorRT's reasons).
        """
        profile = plan_profile(spec, self.size_multiple, self.max_image_side)
        if self._context is not None and self.profile == profile:
            return
        trt, torch = _import_runtime()
        if not torch.cuda.is_available():
            raise TensorRTError("backend tensorrt needs a CUDA GPU; none is visible")
        device = torch.device(self.device_name)
        torch.cuda.set_device(device)
        gpu = torch.cuda.get_device_name(device)
        cc = torch.cuda.get_device_capability(device)
        key = engine_cache_key(self.onnx_sha256, gpu, cc, trt.__version__, profile, self.precision)
        uri = f"{self.cache_prefix}/{key}.plan" if self.cache_prefix else None
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = None
        self.cache_hit = False
        if uri and self.storage is not None and self.storage.exists(uri):
            engine = runtime.deserialize_cuda_engine(self.storage.read_bytes(uri))
            if engine is None:  # a plan of a damaged upload, or one TensorRT no longer reads: rebuild it
                log.warning("cached TensorRT plan %s does not deserialise; rebuilding", uri)
            else:
                self.cache_hit = True
        if engine is None:
            plan = self._build(trt, logger, profile)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise TensorRTError("TensorRT built a plan it cannot deserialise (see the TensorRT log above)")
            if uri and self.storage is not None:
                self.storage.write_bytes(uri, plan)
        self._engine, self._context = engine, engine.create_execution_context()
        self._stream = torch.cuda.Stream(device)
        self._device = device
        self.profile = profile
        log.info("TensorRT engine %s (%s, %s, profile %s, cache %s)", key, gpu, self.precision, profile.text(),
                 "hit" if self.cache_hit else "miss")

    def _build(self, trt, logger, profile: Profile) -> bytes:
        graph = fp16_onnx(self._onnx) if self.precision == "fp16" else self._onnx
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # TensorRT 10 needs the flag; 11 is strongly typed only
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph):
            reasons = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"TensorRT could not parse the ONNX export: {reasons}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        opt = builder.create_optimization_profile()
        opt.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(opt)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TensorRTError(f"TensorRT could not build an engine for profile {profile.text()} ({self.precision}); "
                                f"see the TensorRT log above")
        return bytes(plan)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """See :meth:`medsr_dist.infer.backends.Backend.__call__`. Raises :class:`TensorRTError` for a batch outside
        the profile."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, h, w) batch, got shape {batch.shape}")
        if self._context is None:
            self.prepare(TileSpec(batch_size=max(1, len(batch))))
        if not self.profile.covers(batch.shape):
            raise TensorRTError(f"batch {batch.shape} is outside the engine's profile {self.profile.text()}")
        _, torch = _import_runtime()
        ctx = self._context
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device, non_blocking=True)
            if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise TensorRTError(f"TensorRT refused input shape {tuple(x.shape)}")
            y = torch.empty(tuple(ctx.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=self._device)
            ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
            ctx.set_tensor_address(OUTPUT_NAME, y.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise TensorRTError("TensorRT execute_async_v3 failed")
            y.clamp_(0.0, 1.0)
            out = y.cpu()  # synchronises the stream
        return out.numpy()

    def describe(self) -> dict[str, Any]:
        return {"onnx_sha256": self.onnx_sha256, "precision": self.precision,
                "profile": self.profile.text() if self.profile else None, "cache_hit": self.cache_hit}

    def __repr__(self) -> str:
        return (f"TensorRTBackend(scale={self.scale}, size_multiple={self.size_multiple}, precision={self.precision}, "
                f"profile={self.profile.text() if self.profile else 'not built'})")


def _import_runtime():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTError(f"backend tensorrt needs the `tensorrt` package (pip install tensorrt): {exc}") from None
    import torch

    return trt, torch
