"""`medsr eval`: score models under an evaluation protocol with Ray Data, and write the report.

One pass over the dataset, three Ray Data stages (plain callables, runnable without Ray too):

1. :class:`ProtocolPairs` (CPU tasks): read and decode each image (a file under a prefix, or a prepared
   dataset's row), make its (ground truth, input) pair with the :class:`~medsr_dist.eval.protocols.Protocol`,
   and the bicubic baseline.
2. :class:`EvalReplica` (actor pool, one GPU each when the cluster has GPUs): every model, through the one
   inference engine (:mod:`medsr_dist.infer.engine`), on every input. A model that fails on an image leaves
   an error for that (image, model) cell and goes on.
3. :class:`ScoreImages` (CPU actors): PSNR/SSIM (basicsr's), LPIPS when its weights are available, the
   consistency score; the comparison figure of the images chosen for figures (written under
   ``<output>/figures/``). Emits one row per (image, model): :data:`ROW_FIELDS`.

The driver then summarises the rows (:mod:`medsr_dist.eval.stats`) and writes ``results.{csv,json,md}``
and a self-contained ``report.html`` (:mod:`medsr_dist.eval.html_report`).

Everything that can be checked before Ray starts is checked by :func:`plan_evaluation` (protocol,
dataset, model files, LPIPS weights, figure names), so a typo costs seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr_dist import __version__
from medsr_dist.config import EvalConfig, MedsrConfig, StorageConfig
from medsr_dist.eval.protocols import Protocol, VolumeProtocol, resolve_protocol
from medsr_dist.infer.engine import ENGINE_REVISION
from medsr_dist.storage import Storage

if TYPE_CHECKING:  # torch is imported only where a network runs (stage 1 workers never load it)
    from medsr_dist.infer.model_file import ModelFile

log = logging.getLogger(__name__)

BICUBIC = "bicubic"
UNAVAILABLE = "unavailable"
EMPTY = np.zeros((0, 0, 1), np.float32)  # placeholder pixels of rows that failed
#: Columns of the result rows, one row per (image, model).
ROW_FIELDS = ("image", "key", "model", "model_index", "status", "error", "psnr", "ssim", "lpips",
              "consistency_psnr_db", "seconds", "figure")
METRICS = ("psnr", "ssim", "lpips", "consistency_psnr_db")

# torchvision's ImageNet backbone files for LPIPS; torchvision names each file after its sha256 prefix.
LPIPS_BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "7be5be79"),
    "vgg": ("vgg16-397923af.pth", "397923af"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "b8a52dc0"),
}


class EvalInputError(ValueError):
    """The dataset, a model or a figure name cannot be found; the message names the key and the path."""


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------
BackendFactory = Callable[[], Any]


@dataclass(frozen=True)
class EvalModel:
    """A model to evaluate.

    Exactly one of: bicubic (``source == "bicubic"``, no file); ``model_file`` (a network the engine runs);
    ``factory`` (a zero-argument callable returning a :class:`~medsr_dist.infer.backends.Backend`, for
    models built in Python, e.g. in a notebook; it is pickled to the Ray workers).
    """

    name: str
    source: str
    baseline: bool = False
    model_file: ModelFile | None = None
    factory: BackendFactory | None = None

    @property
    def is_bicubic(self) -> bool:
        return self.model_file is None and self.factory is None

    @property
    def sha256(self) -> str:
        return self.model_file.sha256 if self.model_file else ""

    def describe(self, protocol: Protocol) -> dict[str, Any]:
        """JSON-ready description for the report."""
        info: dict[str, Any] = {"name": self.name, "source": self.source, "baseline": self.baseline}
        if self.is_bicubic:
            info.update(kind=BICUBIC, note="OpenCV bicubic (INTER_CUBIC) upscaling of the input")
        elif self.model_file is not None:
            mf = self.model_file
            info.update(kind="network", uri=mf.uri, sha256=mf.sha256, family=mf.family, native_scale=mf.scale,
                        generator=mf.generator)
            if mf.sampling is not None:
                info["sampling"] = mf.sampling
            if mf.scale != protocol.scale:
                info["note"] = f"native x{mf.scale}; output Lanczos-resized to x{protocol.scale}"
        else:
            info.update(kind="python", factory=getattr(self.factory, "__qualname__", repr(self.factory)))
        return info


def _looks_like_path(source: str) -> bool:
    return "/" in source or "://" in source or source.endswith((".pth", ".pt", ".safetensors"))


def weights_dirs(cfg: MedsrConfig) -> list[str]:
    """Where zoo names are looked up: ``eval.weights_dir``, else ``<run.root>/weights`` then the torch hub cache."""
    if cfg.eval.weights_dir:
        return [cfg.eval.weights_dir]
    import torch

    return [Storage.join(cfg.run.root, "weights"), os.path.join(torch.hub.get_dir(), "checkpoints")]


def resolve_models(cfg: MedsrConfig, storage: Storage | None = None) -> list[EvalModel]:
    """The configured models, with their files found and hashed (no network is built here).

    A source is ``bicubic``; a model file (:func:`~medsr_dist.infer.model_file.read_model_file`: a training
    export with meta.json, or a plain RRDBNet checkpoint); or a zoo name, looked up as ``<dir>/<name>/model.pth``
    or ``<dir>/<name>.pth`` in :func:`weights_dirs` (where ``medsr weights import-ncnn`` can put it), then in the
    model zoo's cache. Nothing is downloaded.

    Raises:
        EvalInputError: a model file or zoo name that cannot be found, or a file that is no known network.
    """
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.models import zoo

    storage = storage or Storage(cfg.storage)
    models = []
    for m in cfg.eval.models:
        if m.source == BICUBIC:
            if m.sampling is not None:
                raise EvalInputError(f"eval.models[{m.name}].sampling: bicubic does not sample")
            models.append(EvalModel(m.name, m.source, m.baseline))
            continue
        if _looks_like_path(m.source):
            if not storage.exists(m.source):
                raise EvalInputError(f"eval.models[{m.name}]: model file {m.source} does not exist")
            uri = m.source
        else:
            tried = []
            for folder in weights_dirs(cfg):
                tried += [Storage.join(folder, m.source, "model.pth"), Storage.join(folder, f"{m.source}.pth")]
            uri = next((t for t in tried if storage.exists(t)), None)
            if uri is None and zoo.is_zoo_name(m.source) and zoo.cache_state(m.source) != "missing":
                uri = m.source  # the zoo's verified cache
            if uri is None:
                cached = f", {zoo.cached_path(m.source)}" if zoo.is_zoo_name(m.source) else ""
                raise EvalInputError(
                    f"eval.models[{m.name}]: model {m.source!r} not found (looked for {', '.join(tried)}{cached}); "
                    f"import it (`medsr weights import-ncnn`), fetch it (`medsr weights fetch`), or give the path "
                    f"of its model.pth"
                )
        try:
            model_file = read_model_file(uri, storage.config)
            # ldm: one entry per sampler compares them on the same weights (the report records each one's settings)
            model_file = model_file.with_sampling(m.sampling.overrides() if m.sampling else None,
                                                  f"eval.models[{m.name}].sampling")
        except (ValueError, FileNotFoundError) as exc:
            raise EvalInputError(f"eval.models[{m.name}]: {exc}") from None
        models.append(EvalModel(m.name, m.source, m.baseline, model_file=model_file))
    return models


# ------------------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LpipsStatus:
    """Whether LPIPS can be computed, and with what.

    Attributes:
        available: the lpips package and the backbone weights are there (and load).
        reason: why LPIPS is unavailable, or a note on the weights used.
        net: LPIPS backbone ("alex", "vgg", "squeeze").
        backbone: the backbone weights file used.
        sha256: its sha256.
        imagenet: whether the file is torchvision's ImageNet release (its sha256 starts with the published
            prefix); LPIPS values from other weights are not comparable with published ones.
    """

    available: bool
    reason: str
    net: str = "alex"
    backbone: str = ""
    sha256: str = ""
    imagenet: bool | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("available", "reason", "net", "backbone", "sha256", "imagenet")}


def check_lpips(lp: EvalConfig.Lpips, storage: Storage | None = None) -> LpipsStatus:
    """Find the LPIPS backbone weights and load them once; never raises, the status says what is missing."""
    if not lp.enabled:
        return LpipsStatus(False, "disabled by eval.lpips.enabled=false", lp.net)
    storage = storage or Storage()
    file_name, prefix = LPIPS_BACKBONES[lp.net]
    try:
        import lpips  # noqa: F401
    except ImportError:
        return LpipsStatus(False, "the lpips package is not installed (pip install lpips)", lp.net)
    if lp.backbone == "torchvision":
        import torch

        uri = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        how = (f"download https://download.pytorch.org/models/{file_name} on a machine with internet access and copy "
               f"it there (or set TORCH_HOME), or set eval.lpips.backbone to a path/URI of that file")
    else:
        uri, how = lp.backbone, "check eval.lpips.backbone"
    try:
        exists = storage.exists(uri)
    except Exception as exc:  # noqa: BLE001 - an unreachable store is a reason, not a crash
        return LpipsStatus(False, f"cannot check the {lp.net} backbone weights {uri}: {exc}", lp.net, uri)
    if not exists:
        return LpipsStatus(False, f"the ImageNet {lp.net} backbone weights LPIPS needs are not at {uri}: {how}",
                           lp.net, uri)
    try:
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        build_lpips(lp.net, data, uri)
    except Exception as exc:  # noqa: BLE001
        return LpipsStatus(False, f"the {lp.net} backbone weights at {uri} do not load: {exc}", lp.net, uri)
    imagenet = digest.startswith(prefix)
    note = (f"LPIPS v0.1 ({lp.net}; linear layers shipped in the lpips package; backbone {uri})" if imagenet else
            f"LPIPS computed with backbone weights {uri} (sha256 {digest[:12]}…) that are NOT torchvision's ImageNet "
            f"{lp.net} ({file_name}): values are not comparable with published LPIPS")
    return LpipsStatus(True, note, lp.net, uri, digest, imagenet)


def build_lpips(net: str, backbone_bytes: bytes, source: str = "<backbone>"):
    """LPIPS v0.1 with the package's linear layers and the given torchvision backbone state dict (CPU, eval).

    Only the ``features.*`` tensors of the torchvision file are used (a file holding just those is enough).

    Raises:
        ValueError: the file lacks backbone tensors or their shapes differ.
    """
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation inside lpips
        import lpips

        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(io.BytesIO(backbone_bytes), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    wanted = {name: re.sub(r"^slice\d+\.", "features.", name) for name in model.net.state_dict()}
    missing = sorted(src for src in wanted.values() if src not in state)
    if missing:
        raise ValueError(f"{source}: not a torchvision {net} state dict (missing {', '.join(missing[:4])})")
    model.net.load_state_dict({name: state[src] for name, src in wanted.items()}, strict=True)
    return model.eval().requires_grad_(False)


class LpipsScorer:
    """LPIPS distance (lower is closer) of two images, as the lpips package computes it."""

    def __init__(self, status: LpipsStatus, storage: Storage):
        self.model = build_lpips(status.net, storage.read_bytes(status.backbone), status.backbone)

    def __call__(self, image: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
        """Args: (H, W, C) float in [0, 1], C in {1, 3} (gray is replicated to RGB); same shapes."""
        import torch

        if crop_border:
            image = image[crop_border:-crop_border, crop_border:-crop_border]
            reference = reference[crop_border:-crop_border, crop_border:-crop_border]

        def tensor(x: np.ndarray) -> torch.Tensor:
            x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None] * 2 - 1

        with torch.inference_mode():
            return float(self.model(tensor(image), tensor(reference)).item())


# ------------------------------------------------------------------------------------------------------------
# The plan: everything checked before Ray
# ------------------------------------------------------------------------------------------------------------
@dataclass
class EvalPlan:
    """What an evaluation will do; made by :func:`plan_evaluation` without Ray."""

    protocol: Protocol
    models: list[EvalModel]
    dataset: str
    split: str | None
    items: list[dict[str, str]]  # {"name", "key"[, "shard"]} in evaluation order
    figures: list[str]  # image names shown as figures
    lpips: LpipsStatus
    output: str

    @property
    def baseline(self) -> str:
        return next((m.name for m in self.models if m.baseline), self.models[0].name)


def protocol_of(e: EvalConfig) -> Protocol:
    return resolve_protocol(e.protocol, {k: getattr(e.params, k) for k in e.params.model_fields_set})


def eval_output(cfg: MedsrConfig) -> str:
    return cfg.eval.output or Storage.join(cfg.run.root, "eval", cfg.eval.protocol)


def _split_uri(dataset: str, split: str, storage: Storage) -> str:
    return storage.join(dataset, split)


def list_items(cfg: MedsrConfig, storage: Storage) -> tuple[str, list[dict[str, str]]]:
    """(dataset, items): the images to evaluate, sorted by name, ``eval.limit`` applied.

    Raises:
        EvalInputError: no dataset or no images.
    """
    e = cfg.eval
    dataset = e.dataset or cfg.prepare.output
    if e.split:
        import pyarrow.parquet as pq

        uri = _split_uri(dataset, e.split, storage)
        files = [f for f in storage.list_files(uri) if f.endswith(".parquet")] if storage.exists(uri) else []
        if not files:
            raise EvalInputError(f"eval.dataset: no prepared split {e.split!r} at {uri} (Parquet shards expected; "
                                 f"set eval.split=null to evaluate a folder of images)")
        items = []
        for f in files:
            with storage.open(f) as handle:
                table = pq.read_table(handle, columns=["key", "rel_key"])
            items += [{"name": r["rel_key"] or r["key"], "key": r["key"], "shard": f} for r in table.to_pylist()]
    else:
        keys = storage.list_files(dataset, include=e.include, exclude=e.exclude) if storage.exists(dataset) else []
        root = dataset.rstrip("/")
        items = [{"name": k[len(root):].lstrip("/") or PurePosixPath(k).name, "key": k} for k in keys]
    if not items:
        raise EvalInputError(f"eval.dataset: no images under {dataset}" + (f" (split {e.split})" if e.split else
                             f" matching include={e.include} exclude={e.exclude}"))
    items.sort(key=lambda item: item["name"])
    return dataset, items[: e.limit] if e.limit else items


def plan_evaluation(cfg: MedsrConfig, storage: Storage | None = None,
                    models: list[EvalModel] | None = None) -> EvalPlan:
    """Check everything that can be checked before Ray starts and say what will be evaluated.

    Args:
        cfg: the config (``cfg.eval`` is the evaluation).
        storage: where everything lives (default: from ``cfg.storage``).
        models: models given in Python instead of ``eval.models`` (e.g. with a ``factory``).

    Raises:
        EvalInputError: missing dataset, model file, or figure image name.
    """
    storage = storage or Storage(cfg.storage)
    e = cfg.eval
    protocol = protocol_of(e)
    models = list(models) if models is not None else resolve_models(cfg, storage)
    if not models and not isinstance(protocol, VolumeProtocol):  # volumes always score their interpolations
        raise EvalInputError("no models to evaluate")
    if len({m.name for m in models}) != len(models):
        raise EvalInputError(f"model names must be unique, got {[m.name for m in models]}")
    dataset, items = list_items(cfg, storage)
    names = [item["name"] for item in items]
    if e.figure_images:
        unknown = [n for n in e.figure_images if n not in set(names)]
        if unknown:
            raise EvalInputError(f"eval.figure_images: no image named {unknown} among the {len(names)} evaluated "
                                 f"(names look like {names[:3]})")
        figures = list(e.figure_images)
    else:
        figures = names[: e.figures]
    if isinstance(protocol, VolumeProtocol):  # volumes (mri-aniso-x*): medsr_dist/eval/volume_eval.py
        from medsr_dist.eval.volume_eval import check_volume_plan, volume_lpips_status

        plan = EvalPlan(protocol, models, dataset, e.split, items, figures, volume_lpips_status(), eval_output(cfg))
        check_volume_plan(plan)
        return plan
    return EvalPlan(protocol, models, dataset, e.split, items, figures, check_lpips(e.lpips, storage),
                    eval_output(cfg))


# ------------------------------------------------------------------------------------------------------------
# Ray Data stages
# ------------------------------------------------------------------------------------------------------------
def _object_array(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ProtocolPairs:
    """Stage 1 (CPU tasks): ``{"key"[, "image"]}`` rows -> protocol pairs.

    Input rows carry ``key`` (a file on the store) and, for a prepared dataset, ``image`` (lossless PNG
    bytes). Output columns: ``image`` (name), ``key``, ``status`` ("ok"/"error"), ``error``, ``hr``, ``lr``
    (arrays (h, w, C) float32 in [0, 1]; empty on error), ``figure`` (bool).
    """

    def __init__(self, storage: Storage, protocol: Protocol, names: dict[str, str], figures: list[str]):
        self.storage, self.protocol, self.names, self.figures = storage, protocol, names, set(figures)

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.io.image import decode_image, single_frame_pixels

        out: dict[str, list] = {k: [] for k in ("image", "key", "status", "error", "hr", "lr", "figure")}
        images = batch.get("image")
        for i, key in enumerate(batch["key"]):
            key = str(key)
            name = self.names.get(key, key)
            row = {"image": name, "key": key, "status": "ok", "error": "", "hr": EMPTY, "lr": EMPTY,
                   "figure": name in self.figures}
            try:
                data = bytes(images[i]) if images is not None else self.storage.read_bytes(key)
                decoded = decode_image(data, key)
                pair = self.protocol.make_pair(single_frame_pixels(decoded, key, "evaluation"),
                                               source_levels(data, decoded.meta))
                row.update(hr=pair.hr, lr=pair.lr)
            except Exception as exc:  # noqa: BLE001 - an unreadable image is an error row for every model
                row.update(status="error", error=f"input: {_error_text(exc)}")
            for k, v in row.items():
                out[k].append(v)
        return {k: _object_array(v) if k in ("hr", "lr") else np.asarray(v) for k, v in out.items()}


def source_levels(data: bytes, meta) -> int:
    """The largest stored value of a source image (what its LR is rounded to): ``2**bits - 1`` of a PNG's
    ``sBIT`` chunk (a prepared dataset's 16-bit PNG of a 12-bit DICOM says 12), else the format's (``ImageMeta.maxval``:
    BitsStored for DICOM, the sample type otherwise)."""
    from medsr_dist.data.prepare import significant_bits

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return (1 << significant_bits(data)) - 1
    return int(meta.maxval)


def _column(i: int, what: str) -> str:
    return f"m{i}_{what}"


class EvalReplica:
    """Stage 2 (actor pool): every network model on every input, each model through one
    :class:`~medsr_dist.infer.replica.ModelReplica` (the tiled engine, per-image retry, finiteness check).

    Adds ``bicubic`` (the OpenCV bicubic upscaling of the input, the figures' bicubic panel) and, per model
    ``i``, columns ``m{i}_sr`` (the output, (H, W, C) float32 in [0, 1], the ground truth's shape; empty for
    failures and bicubic models), ``m{i}_error`` and ``m{i}_seconds``. A failing batch is retried image by image, so
    one bad image fails alone.
    """

    def __init__(self, models: list[EvalModel], protocol: Protocol, e: EvalConfig, storage_cfg: StorageConfig,
                 precision: str | None = None):
        """``precision``: the one the report records (:func:`_runs_precision`; default ``eval.precision``); a
        replica whose backend would run another refuses to start
        (:class:`~medsr_dist.infer.replica.PrecisionMismatch`). Models built in Python (``factory``) run and are
        labelled with their own backend's precision."""
        from dataclasses import replace

        from medsr_dist.infer.replica import EngineSettings, ModelReplica

        self.models, self.protocol = models, protocol
        settings = EngineSettings.of(e, precision=precision or e.precision)
        storage = Storage(storage_cfg)
        self.replicas: dict[int, ModelReplica] = {}
        for i, m in enumerate(models):
            if m.factory is not None:
                backend = m.factory()
                own = replace(settings, precision=getattr(backend, "precision", settings.precision))
                self.replicas[i] = ModelReplica(None, backend, own)
            elif m.model_file is not None:
                self.replicas[i] = ModelReplica.load(m.model_file, storage, settings)

    def _outscale(self, i: int) -> float | None:
        return None if self.replicas[i].scale == self.protocol.scale else float(self.protocol.scale)

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.eval.metrics import bicubic_upscale
        from medsr_dist.infer.replica import NonFiniteOutput

        n = len(batch["key"])
        ok = [j for j in range(n) if batch["status"][j] == "ok"]
        result = dict(batch)
        bicubic, bicubic_seconds = [EMPTY] * n, [0.0] * n
        for j in ok:
            t0 = time.perf_counter()
            bicubic[j] = bicubic_upscale(batch["lr"][j], self.protocol.scale).reshape(batch["hr"][j].shape)
            bicubic_seconds[j] = time.perf_counter() - t0
        result["bicubic"] = _object_array(bicubic)
        for i, m in enumerate(self.models):
            outputs, errors, seconds = [EMPTY] * n, [""] * n, [0.0] * n
            if m.is_bicubic:
                seconds = bicubic_seconds  # its output is the bicubic column
            elif ok:
                t0 = time.perf_counter()
                ran = []
                for k, out in self.replicas[i].enhance_each([batch["lr"][j] for j in ok], outscale=self._outscale(i)):
                    j = ok[k]
                    if isinstance(out, NonFiniteOutput):
                        errors[j] = f"output contains {out.count:,} NaN or infinite values"
                        ran.append(j)
                    elif isinstance(out, BaseException):
                        log.warning("model %s failed on an image: %s", m.name, type(out).__name__)
                        errors[j] = f"inference: {_error_text(out)}"
                    else:
                        out = out if out.ndim == 3 else out[:, :, None]
                        hr = batch["hr"][j]
                        if out.shape != hr.shape:
                            errors[j] = f"output shape {out.shape} differs from the ground truth's {hr.shape}"
                        else:
                            outputs[j] = out
                        ran.append(j)
                per_image = (time.perf_counter() - t0) / len(ok)
                for j in ran:
                    seconds[j] = per_image
            result[_column(i, "sr")] = _object_array(outputs)
            result[_column(i, "error")] = np.asarray(errors)
            result[_column(i, "seconds")] = np.asarray(seconds, dtype=np.float64)
        return result


def figure_key(name: str) -> str:
    """``figures/<sanitised name>-<8 hex of its sha1>.png``: unique per image name, safe as a file name."""
    base = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "image"
    return f"figures/{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.png"


class ScoreImages:
    """Stage 3 (CPU actors): per (image, model) scores, and the figures of the chosen images.

    Returns one row per (image, model) with :data:`ROW_FIELDS`; ``lpips`` is NaN where LPIPS is unavailable
    (the report writes "unavailable" there), metric cells are NaN for errors. LPIPS failing on one image
    (e.g. too small for AlexNet) leaves that cell NaN with the reason in ``error`` and the row ``ok``.
    """

    def __init__(self, models: list[EvalModel], protocol: Protocol, lpips: LpipsStatus, storage: Storage,
                 output: str, crop_box: tuple[int, int, int, int] | None, zoom: int, max_panel: int | None = None):
        self.models, self.protocol, self.storage, self.output = models, protocol, storage, output
        self.crop_box, self.zoom, self.max_panel = crop_box, zoom, max_panel
        self.lpips = LpipsScorer(lpips, storage) if lpips.available else None

    def _scores(self, sr: np.ndarray, hr: np.ndarray, lr: np.ndarray) -> dict[str, float | str]:
        from medsr_dist.eval.metrics import psnr, ssim
        from medsr_dist.infer.consistency import consistency_psnr

        p = self.protocol
        args = {"crop_border": p.crop_border, "test_y_channel": p.test_y_channel, "max_value": 1.0}
        scores = {"psnr": psnr(sr, hr, **args), "ssim": ssim(sr, hr, **args), "lpips": math.nan,
                  "consistency_psnr_db": consistency_psnr(sr, lr)}
        if self.lpips is not None:
            try:
                scores["lpips"] = self.lpips(sr, hr, p.crop_border)
            except Exception as exc:  # noqa: BLE001 - e.g. an image too small for AlexNet: PSNR/SSIM still count
                scores["error"] = f"lpips: {_error_text(exc)}"
        return scores

    def __call__(self, batch: dict) -> dict:
        rows: list[dict] = []
        for j in range(len(batch["key"])):
            image, key = str(batch["image"][j]), str(batch["key"][j])
            figure = figure_key(image) if bool(batch["figure"][j]) and batch["status"][j] == "ok" else ""
            outputs: dict[int, np.ndarray] = {}
            for i, m in enumerate(self.models):
                row = {"image": image, "key": key, "model": m.name, "model_index": i, "status": "ok", "error": "",
                       "psnr": math.nan, "ssim": math.nan, "lpips": math.nan, "consistency_psnr_db": math.nan,
                       "seconds": 0.0, "figure": figure}
                if batch["status"][j] != "ok":
                    row.update(status="error", error=str(batch["error"][j]))
                elif str(batch[_column(i, "error")][j]):
                    row.update(status="error", error=str(batch[_column(i, "error")][j]))
                else:
                    sr = batch["bicubic"][j] if m.is_bicubic else batch[_column(i, "sr")][j]
                    row["seconds"] = float(batch[_column(i, "seconds")][j])
                    try:
                        row.update(self._scores(sr, batch["hr"][j], batch["lr"][j]))
                        outputs[i] = sr
                    except Exception as exc:  # noqa: BLE001
                        row.update(status="error", error=f"metrics: {_error_text(exc)}")
                rows.append(row)
            if figure:
                try:
                    self.storage.write_bytes(self.storage.join(self.output, figure), self._figure(batch, j, outputs))
                except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is not a failed evaluation
                    log.warning("figure of %s failed: %s", image, exc)
                    for row in rows[-len(self.models):]:
                        row["figure"] = ""
        return {k: np.asarray([r[k] for r in rows]) for k in ROW_FIELDS}

    def _figure(self, batch: dict, j: int, outputs: dict[int, np.ndarray]) -> bytes:
        """LR | bicubic | models... | ground truth, with the region where the models disagree most magnified."""
        from medsr_dist.eval.report import CropBox, side_by_side

        hr, lr = batch["hr"][j], batch["lr"][j]
        bicubic_index = next((i for i, m in enumerate(self.models) if m.is_bicubic), None)
        panels = [(f"LR x1/{self.protocol.scale}", lr),
                  (self.models[bicubic_index].name if bicubic_index is not None else BICUBIC, batch["bicubic"][j])]
        compare = [1]
        for i, m in enumerate(self.models):
            if i == bicubic_index:
                continue
            if i in outputs:
                compare.append(len(panels))
                panels.append((m.name, outputs[i]))
            else:
                panels.append((f"{m.name}: error", np.zeros_like(hr)))
        panels.append(("ground truth", hr))
        box = None
        if self.crop_box is not None:
            y, x, h, w = self.crop_box
            height, width = hr.shape[:2]
            y, x = min(max(y, 0), height - 1), min(max(x, 0), width - 1)
            box = CropBox(y, x, max(1, min(h, height - y)), max(1, min(w, width - x)))
        return side_by_side(panels, crop_box=box, compare=compare if len(compare) >= 2 else None, zoom=self.zoom,
                            max_panel=self.max_panel)


# ------------------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What :func:`run_evaluation` wrote and found."""

    output: str
    report: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # "report.html" -> its URI, ...

    @property
    def n_errors(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")


class ReadShards:
    """Stage 0 for a prepared dataset (CPU tasks): ``{"shard"}`` rows -> ``{"key", "image"}`` rows of the
    wanted images in that Parquet shard (only those two columns are read)."""

    def __init__(self, storage: Storage, keys: frozenset[str]):
        self.storage, self.keys = storage, keys

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as pq

        keys, images = [], []
        for shard in batch["shard"]:
            with self.storage.open(str(shard)) as handle:
                for row in pq.read_table(handle, columns=["key", "image"]).to_pylist():
                    if row["key"] in self.keys:
                        keys.append(row["key"])
                        images.append(row["image"])
        return {"key": np.asarray(keys, dtype=object), "image": _object_array(images)}


def _dataset_of(plan: EvalPlan, storage: Storage):
    """The input rows: ``{"key"}`` per image file, or ``{"key", "image"}`` read from a prepared split's shards.

    The shards are read by our own task rather than ``ray.data.read_parquet``, whose file-listing task
    wants a whole CPU that the pre-started actor pools may already hold on a small machine.
    """
    import ray

    if plan.split:
        shards = sorted({item["shard"] for item in plan.items})
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        return ds.map_batches(ReadShards(storage, frozenset(item["key"] for item in plan.items)), batch_size=1,
                              num_cpus=0.5)
    keys = [item["key"] for item in plan.items]
    return ray.data.from_items([{"key": k} for k in keys], override_num_blocks=min(len(keys), 200))


def run_evaluation(cfg: MedsrConfig, storage: Storage | None = None, *, plan: EvalPlan | None = None) -> EvalResult:
    """Evaluate ``plan`` (default: :func:`plan_evaluation` of ``cfg``) and write the report (Ray must be running)."""
    import ray

    from medsr_dist.eval.html_report import write_eval_report
    from medsr_dist.runtime import cluster_has_gpus

    storage = storage or Storage(cfg.storage)
    plan = plan or plan_evaluation(cfg, storage)
    if isinstance(plan.protocol, VolumeProtocol):
        from medsr_dist.eval.volume_eval import run_volume_evaluation

        return run_volume_evaluation(cfg, storage, plan)
    e = cfg.eval
    t0 = time.perf_counter()
    gpu = 1 if cluster_has_gpus() else 0
    names = {item["key"]: item["name"] for item in plan.items}
    ds = _dataset_of(plan, storage)
    # an instance (not the class) runs as tasks: no idle actor holds a CPU the other stages need
    ds = ds.map_batches(ProtocolPairs(storage, plan.protocol, names, plan.figures), batch_size=e.batch_size,
                        num_cpus=0.5)
    precision = _runs_precision(plan, e, gpu)
    ds = ds.map_batches(EvalReplica, fn_constructor_args=(plan.models, plan.protocol, e, cfg.storage, precision),
                        batch_size=e.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=e.replicas),
                        num_gpus=gpu, num_cpus=0 if gpu else e.cpus_per_replica)
    ds = ds.map_batches(ScoreImages, fn_constructor_args=(plan.models, plan.protocol, plan.lpips, storage, plan.output,
                                                          e.crop_box, e.zoom, e.figure_panel),
                        batch_size=e.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=e.score_workers),
                        num_cpus=0.5)
    order = {item["name"]: k for k, item in enumerate(plan.items)}
    rows = sorted((_plain(r) for r in ds.take_all()), key=lambda r: (order.get(r["image"], len(order)), r["model_index"]))
    report = build_report(cfg, plan, rows, seconds=time.perf_counter() - t0, precision=precision)
    figures = {}
    for key in sorted({r["figure"] for r in rows if r["figure"]}):
        figures[key] = storage.read_bytes(storage.join(plan.output, key))
    files = write_eval_report(report, figures, lambda key, data: storage.write_bytes(storage.join(plan.output, key), data))
    return EvalResult(plan.output, report, rows, {k: storage.join(plan.output, k) for k in files})


def _plain(row: dict) -> dict:
    """A Ray row with numpy scalars -> plain Python values."""
    out = {}
    for k in ROW_FIELDS:
        v = row[k]
        out[k] = v.item() if isinstance(v, np.generic) else v
    out["model_index"] = int(out["model_index"])
    return out


def _runs_precision(plan: EvalPlan, e: EvalConfig, gpu: int) -> str:
    """The precision the replicas ran the network models in (a CPU asked for fp16 runs fp32)."""
    from medsr_dist.infer.model_file import runnable_precision

    if not any(m.model_file is not None for m in plan.models):
        return e.precision
    return runnable_precision(e.backend, e.precision, gpu=bool(gpu))


def build_report(cfg: MedsrConfig, plan: EvalPlan, rows: list[dict], seconds: float = 0.0,
                 precision: str | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (NaN/inf floats are kept; writers spell them): settings, per-image values,
    per-model summaries and paired comparisons with the baseline.

    Every model is averaged over the same images: those every model scored (``common_images``); an image one
    model failed on is left out of every model's mean (and counted in that model's ``errors``), so the means stay
    comparable. ``note`` says so when that set is smaller than the dataset."""
    from medsr_dist.eval.stats import paired_bootstrap, summarize

    e = cfg.eval
    images = [item["name"] for item in plan.items]
    models = [m.name for m in plan.models]
    cell = {(r["image"], r["model"]): r for r in rows}
    metrics = [m for m in METRICS if m != "lpips" or plan.lpips.available]

    def ok(image: str, model: str) -> bool:
        r = cell.get((image, model))
        return r is not None and r["status"] == "ok"

    common = [image for image in images if all(ok(image, m) for m in models)]

    def values(model: str, metric: str) -> list[float | None]:
        return [cell[(image, model)][metric] for image in common]

    summary = {m: {metric: summarize(values(m, metric)).to_dict() for metric in metrics} for m in models}
    for m in models:
        summary[m]["errors"] = sum(1 for image in images if cell.get((image, m), {"status": "missing"})["status"] != "ok")
        summary[m]["images"] = len(images)
        summary[m]["scored"] = sum(1 for image in images if ok(image, m))
        if not plan.lpips.available:
            summary[m]["lpips"] = UNAVAILABLE
    b = e.bootstrap
    comparisons = {
        m: {metric: paired_bootstrap(values(m, metric), values(plan.baseline, metric), samples=b.samples,
                                     confidence=b.confidence, seed=b.seed).to_dict() for metric in metrics}
        for m in models if m != plan.baseline
    }
    per_image = []
    for image in images:
        entry: dict[str, Any] = {"name": image, "key": "", "figure": "", "models": {}}
        for m in models:
            r = cell.get((image, m))
            if r is None:
                entry["models"][m] = {"status": "error", "error": "no result (lost in the pipeline)"}
                continue
            entry["key"], entry["figure"] = r["key"], entry["figure"] or r["figure"]
            values_ = {metric: r[metric] for metric in METRICS}
            if not plan.lpips.available:
                values_["lpips"] = UNAVAILABLE
            entry["models"][m] = {"status": r["status"], "error": r["error"], "seconds": r["seconds"], **values_}
        per_image.append(entry)
    p = plan.protocol
    return {
        "title": f"{p.name}: {p.description}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": f"medsr-dist {__version__}",
        "protocol": {**p.parameters(), "degradation": p.degradation},
        "dataset": {"uri": plan.dataset, "split": plan.split, "images": len(images)},
        "models": [m.describe(p) for m in plan.models],
        "baseline": plan.baseline,
        "metrics": metrics,
        "lpips": plan.lpips.to_dict(),
        "bootstrap": b.model_dump(),
        "summary": summary,
        "comparisons": comparisons,
        "images": per_image,
        "common_images": len(common),
        "note": "" if len(common) == len(images) else (
            f"means and comparisons are over the {len(common)} of {len(images)} images every model scored ("
            + ", ".join(f"{m} scored {summary[m]['scored']}" for m in models if summary[m]["scored"] < len(images))
            + "); an image one model failed on is left out for all"),
        "figures": [image for image in plan.figures],
        "errors": [{"image": r["image"], "model": r["model"], "error": r["error"]} for r in rows if r["status"] != "ok"],
        "seconds": seconds,
        "engine": {"backend": e.backend, "precision": precision or e.precision, "tile": e.tile,
                   "tile_overlap": e.tile_overlap, "revision": ENGINE_REVISION},
    }


def describe_plan(plan: EvalPlan) -> str:
    """A few lines for the console: protocol, dataset, models, LPIPS."""
    lines = [f"protocol {plan.protocol.name}: {plan.protocol.degradation}",
             f"dataset {plan.dataset}{' split ' + plan.split if plan.split else ''}: {len(plan.items)} image(s), "
             f"{len(plan.figures)} figure(s)",
             "models: " + ", ".join(f"{m.name} ({m.source})" for m in plan.models) + f"; baseline {plan.baseline}",
             f"LPIPS: {'available' if plan.lpips.available else 'unavailable'}: {plan.lpips.reason}"]
    return "\n".join(lines)
