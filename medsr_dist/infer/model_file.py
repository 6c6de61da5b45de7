"""A model for inference, described without loading it: where its weights are, what network they fit, their hash.

Three kinds of source are understood:

* a model exported by training (any family): ``model.pth`` (BasicSR layout) with ``meta.json`` beside it, which
  says the family and architecture (written by :func:`medsr_dist.train.trainer.export_checkpoint`);
* a plain BasicSR RRDBNet checkpoint (e.g. a copy of ``RealESRGAN_x4plus.pth``) on any store: the architecture
  (scale, width, depth, growth) is read from the tensor shapes;
* a model-zoo name (``RealESRGAN_x4plus``, see :mod:`medsr_dist.models.zoo`): fetched into the node's weights
  cache, sha256-checked.

An inference replica rebuilds the network from a :class:`ModelFile` alone (it pickles), and
:func:`build_model_backend` turns it into any registered :class:`~medsr_dist.infer.backends.Backend`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from medsr_dist.config import SamplingConfig, StorageConfig
from medsr_dist.infer.registry import AUTO_BACKEND, FAMILY_BACKENDS, PRECISIONS, backend_factory
from medsr_dist.models import zoo
from medsr_dist.models.registry import load_family
from medsr_dist.storage import Storage

if TYPE_CHECKING:
    from torch import nn

    from medsr_dist.infer.backends import Backend

META_FILE = "meta.json"
ONNX_FILE = "model.onnx"

#: Families exported to ONNX as several networks (``medsr export --format onnx`` of an ``ldm`` export writes
#: ``<stem>.<part>.onnx`` for each part, :func:`onnx_part_uri`); the others as one ``model.onnx``.
ONNX_PARTS = {"ldm": ("unet", "vae_encoder", "vae_decoder")}

# RRDBNet pixel-unshuffles its input by 4 / 2 for scale 1 / 2, so input sides must be multiples of this.
_RRDBNET_SIZE_MULTIPLE = {1: 4, 2: 2, 4: 1}
_RRDBNET_SCALE_FOR_IN_CH = {3: 4, 12: 2, 48: 1}  # conv_first in-channels: 3 * (pixel-unshuffle factor)**2

@dataclass(frozen=True)
class ModelFile:
    """An inference model on the store.

    Attributes:
        uri: the weights (``model.pth`` or a BasicSR checkpoint): local path, ``file://``, ``s3://`` or a zoo name.
        name: human-readable name (``<run>@<iteration>`` for trained exports, the file stem otherwise).
        sha256: hex digest of the weights file's bytes: the model's identity in output keys and provenance.
        family: model family (``realesrgan``, ``esrgan``, ``srgan``, ``psnr``): rebuilds the inference module.
        scale: native upscaling factor.
        generator: generator architecture (``model.generator`` fields: ``type`` RRDBNet or MSRResNet, widths).
        onnx_uri: the ONNX export used by the onnxruntime backend (default ``model.onnx`` beside the weights).
    """

    uri: str
    name: str
    sha256: str
    family: str
    scale: int
    generator: dict = field(hash=False)
    onnx_uri: str | None = None

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (RRDBNet x2: 2, x1: 4, x4: 1; MSRResNet: 1; a family
        whose meta records ``size_multiple`` in its architecture, e.g. ldm's VAE x U-Net downsampling / scale: that)."""
        if "size_multiple" in self.generator:
            return int(self.generator["size_multiple"])
        if self.generator.get("type", "RRDBNet") != "RRDBNet":
            return 1
        return _RRDBNET_SIZE_MULTIPLE.get(self.scale, 1)

    @property
    def is_zoo(self) -> bool:
        return "/" not in self.uri and ":" not in self.uri and zoo.is_zoo_name(self.uri)

    def read_weights(self, storage: Storage) -> bytes:
        """The weights file's bytes (a zoo model is fetched into this node's cache first)."""
        if self.is_zoo:
            with open(zoo.fetch(self.uri), "rb") as f:
                return f.read()
        return storage.read_bytes(self.uri)

    def build(self, storage: Storage) -> nn.Module:
        """The family's inference module (EMA weights when present), float32 on CPU, in eval mode.

        The family named in meta.json rebuilds its networks from ``scale`` + ``generator`` and loads the export
        (:meth:`medsr_dist.models.base.ModelFamily.load_export`); no family-specific code lives here.

        Raises:
            ValueError: the family is unknown here.
            RuntimeError: the weights do not fit the architecture (strict loading; a ``WeightsError``).
        """
        try:
            family = load_family(self.family)
        except ValueError as exc:
            raise ValueError(f"{self.uri}: {exc}") from None
        nets = family.inference_networks(self.scale, dict(self.generator))
        family.load_export(nets, self.read_weights(storage), self.uri)
        return family.inference_module(nets).float().eval()

    @property
    def sampling(self) -> dict | None:
        """The sampling settings an iterative-sampler family (``ldm``) runs with; None for one-forward families."""
        s = self.generator.get("sampling")
        return dict(s) if isinstance(s, dict) else None

    def with_sampling(self, overrides: dict | None, where: str = "sampling") -> ModelFile:
        """This model with some sampling settings replaced (``sampler``, ``steps``, ``samples``, ``output``,
        ``seed``; see :class:`~medsr_dist.config.SamplingConfig`); the same weights and sha256. The networks built
        from the result (:meth:`build`, in any replica it is pickled to) sample with the new settings.

        Raises:
            ValueError: (message starts with ``where``) the model does not sample, or the merged settings are
                invalid (e.g. more steps than the schedule's training timesteps).
        """
        if not overrides:
            return self
        if self.sampling is None:
            raise ValueError(f"{where}: {sorted(overrides)} apply to iterative-sampler models (family ldm); "
                             f"{self.uri} is a {self.family} model")
        try:
            merged = SamplingConfig.model_validate({**self.sampling, **overrides}).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError(f"{where}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        steps_max = int(self.generator.get("schedule", {}).get("num_train_timesteps", merged["steps"]))
        if merged["steps"] > steps_max:
            raise ValueError(f"{where}.steps: {merged['steps']} exceeds the model's num_train_timesteps {steps_max}")
        return dataclasses.replace(self, generator={**self.generator, "sampling": merged})

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (for logs and the ONNX export's metadata)."""
        return {"uri": self.uri, "name": self.name, "sha256": self.sha256, "family": self.family, "scale": self.scale,
                "generator": dict(self.generator)}


def build_model_backend(
    model: ModelFile, backend: str, storage: Storage, *, device: str | None = None, precision: str = "fp32"
) -> Backend:
    """A ready :class:`~medsr_dist.infer.backends.Backend` for ``model``.

    ``torch`` builds the network from the weights. Every other backend is looked up in the registry
    (:data:`medsr_dist.infer.registry.BACKENDS`: its module is imported first so it can register itself) and must
    offer ``from_model_file(model, storage, *, device, precision)``: that is the whole contract a new runtime has to
    meet, usually by reading the ONNX export at ``model.onnx_uri``. A family whose inference is not one forward
    (diffusion: an iterative sampler) supplies its own Backend (:data:`~medsr_dist.infer.registry.FAMILY_BACKENDS`).

    ``auto``: :func:`choose_backend` for ``device`` (a caller that keys or labels outputs by backend chooses
    first and passes the name).

    Raises:
        ValueError: unknown backend, or a backend that cannot be built from a model file.
        ImportError: the backend's runtime package is not installed.
    """
    if backend == AUTO_BACKEND:  # callers that key outputs choose first (enhance job, Serve): this is for the others
        on_gpu = (device or "").startswith("cuda") or (device is None and _cuda_available())
        backend = choose_backend(backend, model, storage, gpu=on_gpu).name
    if model.family in FAMILY_BACKENDS:
        return FAMILY_BACKENDS.get(model.family)(model, backend, storage, device=device, precision=precision)
    if backend == "torch":
        return backend_factory("torch")(model.build(storage), scale=model.scale, device=device, precision=precision,
                                        size_multiple=model.size_multiple)
    factory = backend_factory(backend)
    from_model_file = getattr(factory, "from_model_file", None)
    if from_model_file is None:
        raise ValueError(f"backend {backend!r} ({factory!r}) has no from_model_file(); it cannot load {model.uri}")
    return from_model_file(model, storage, device=device, precision=precision)


def _cuda_available() -> bool:
    import torch  # lazy: this module is imported by config checks that must not pay for torch

    return bool(torch.cuda.is_available())


def onnx_part_uri(onnx_uri: str, part: str) -> str:
    """``.../model.onnx`` -> ``.../model.<part>.onnx`` (where a multi-network family's ONNX export writes each)."""
    stem = onnx_uri[:-5] if onnx_uri.endswith(".onnx") else onnx_uri
    return f"{stem}.{part}.onnx"


def onnx_export_uris(model: ModelFile) -> list[str]:
    """The ONNX files the onnxruntime backend reads for ``model`` (one, or one per part of :data:`ONNX_PARTS`)."""
    onnx_uri = model.onnx_uri or ONNX_FILE
    parts = ONNX_PARTS.get(model.family)
    return [onnx_part_uri(onnx_uri, p) for p in parts] if parts else [onnx_uri]


@dataclass(frozen=True)
class BackendChoice:
    """The backend replicas of one model run, and why (logged; ``auto`` choices are also in the run's metadata)."""

    name: str
    reason: str


#: Measured on CPU (docs/PERFORMANCE.md, "Enhancement" section 1 and "Latent diffusion"): onnxruntime ran x4plus
#: 1.02-1.22x and the ldm U-Net 1.2-1.5x (DDIM-50 1.2-1.4x) the speed of torch at the same tiles, outputs within
#: 0.002/255 and 1e-5.
AUTO_CPU_REASON = ("CPU replicas run the ONNX export with onnxruntime (measured on CPU: 1.02-1.22x torch on "
                   "RealESRGAN_x4plus, 1.2-1.5x on the ldm U-Net; docs/PERFORMANCE.md)")


def choose_backend(requested: str, model: ModelFile, storage: Storage, *, gpu: bool) -> BackendChoice:
    """``requested`` itself unless it is ``auto``; then, from measurements on each kind of hardware:

    * GPU replicas: ``torch`` (the onnxruntime installed here has no GPU provider; TensorRT is not offered yet);
    * CPU replicas: ``onnxruntime`` when it is installed and ``model``'s ONNX export exists
      (:func:`onnx_export_uris`), else ``torch`` (the reason says what is missing and how to make it).

    Raises nothing: a missing export is a reason, not an error (``torch`` always runs).
    """
    if requested != AUTO_BACKEND:
        return BackendChoice(requested, "configured")
    if gpu:
        return BackendChoice("torch", "auto: GPU replicas run torch (onnxruntime here runs on CPU only)")
    try:
        backend_factory("onnxruntime")
    except (ImportError, ValueError):
        return BackendChoice("torch", "auto: onnxruntime is not installed; CPU replicas run torch")
    missing = [uri for uri in onnx_export_uris(model) if not storage.exists(uri)]
    if missing:
        return BackendChoice("torch", f"auto: no ONNX export at {missing[0]}, so CPU replicas run torch "
                                      f"(`medsr export --format onnx` makes it; onnxruntime is faster on CPU)")
    return BackendChoice("onnxruntime", f"auto: {AUTO_CPU_REASON}")


def runnable_precision(backend: str, requested: str, *, gpu: bool) -> str:
    """The precision replicas of ``backend`` will actually run for ``requested``, on GPUs or on this machine's
    CPU: what an output's identity and provenance must record (a CPU asked for fp16 runs fp32).

    A backend states it with ``runnable_precision(requested, *, gpu)``; one that does not runs what is asked.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    decide = getattr(backend_factory(backend), "runnable_precision", None)
    return requested if decide is None else decide(requested, gpu=gpu)


# ----------------------------------------------------------------------------------------------------------
def _dirname(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def rrdbnet_architecture(state: dict) -> tuple[int, dict]:
    """(scale, generator config) of a BasicSR RRDBNet state dict, read from its tensor shapes.

    Raises:
        ValueError: not an RRDBNet state dict (e.g. SRVGGNetCompact weights).
    """
    try:
        first = state["conv_first.weight"]  # (num_feat, 3 * f**2, 3, 3)
        grow = state["body.0.rdb1.conv1.weight"]  # (num_grow_ch, num_feat, 3, 3)
        out = state["conv_last.weight"]  # (num_out_ch, num_feat, 3, 3)
    except KeyError as missing:
        raise ValueError(f"not a BasicSR RRDBNet checkpoint (no {missing} tensor)") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    in_ch = int(first.shape[1])
    if in_ch not in _RRDBNET_SCALE_FOR_IN_CH:
        raise ValueError(f"RRDBNet conv_first takes {in_ch} channels; expected 3, 12 or 48 (RGB at scale 4, 2, 1)")
    generator = {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": int(out.shape[0]), "num_feat": int(first.shape[0]),
                 "num_block": len(blocks), "num_grow_ch": int(grow.shape[0])}
    return _RRDBNET_SCALE_FOR_IN_CH[in_ch], generator


def read_model_file(uri: str, storage_cfg: StorageConfig | None = None, onnx_uri: str | None = None) -> ModelFile:
    """Describe the model at ``uri`` (see the module docstring for the kinds of source).

    The sha256 is computed from the weights' bytes. When ``meta.json`` records a sha256 too, the two must agree
    (a half-copied export is refused rather than enhanced with).

    Raises:
        FileNotFoundError: no such weights file (the message says how to make one).
        ValueError: meta.json disagrees with the weights, or a checkpoint without meta.json is not an RRDBNet.
    """
    storage = Storage(storage_cfg)
    if "/" not in uri and zoo.is_zoo_name(uri):
        entry = zoo.zoo_entry(uri)
        if entry.net != "generator":
            raise ValueError(f"enhance.checkpoint: zoo model {uri} is a {entry.net}, not a generator")
        with open(zoo.fetch(uri), "rb") as f:
            data = f.read()
        return _from_checkpoint_bytes(uri, data, uri, onnx_uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"enhance.checkpoint: model file {uri} does not exist (run `medsr train` first, "
                                f"or name a model-zoo model such as RealESRGAN_x4plus)")
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    meta_uri = Storage.join(_dirname(uri), META_FILE) if "/" in uri else META_FILE
    onnx_uri = onnx_uri or (Storage.join(_dirname(uri), ONNX_FILE) if "/" in uri else ONNX_FILE)
    if not storage.exists(meta_uri):
        stem = posixpath.basename(uri).rsplit(".", 1)[0]
        return _from_checkpoint_bytes(uri, data, stem, onnx_uri, digest)
    meta = json.loads(storage.read_bytes(meta_uri))
    if meta.get("sha256") and meta["sha256"] != digest:
        raise ValueError(f"enhance.checkpoint: {uri} has sha256 {digest} but {meta_uri} records {meta['sha256']} "
                         f"(incomplete copy or mismatched files)")
    return ModelFile(uri=uri, name=str(meta.get("name", meta.get("run", "model"))), sha256=digest,
                     family=meta["family"], scale=int(meta["scale"]), generator=dict(meta["generator"]), onnx_uri=onnx_uri)


def _from_checkpoint_bytes(uri: str, data: bytes, name: str, onnx_uri: str | None, digest: str | None = None) -> ModelFile:
    # lazy: imports torch; model files are read (and their meta checked) by CPU stages that never run a network
    from medsr_dist.models.weights import load_state_dict_bytes

    try:
        scale, generator = rrdbnet_architecture(load_state_dict_bytes(data, uri))
    except ValueError as exc:
        raise ValueError(f"enhance.checkpoint: {uri} has no {META_FILE} beside it and {exc}") from None
    return ModelFile(uri=uri, name=name, sha256=digest or hashlib.sha256(data).hexdigest(), family="realesrgan",
                     scale=scale, generator=generator, onnx_uri=onnx_uri)
