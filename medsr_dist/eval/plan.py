"""What `medsr eval` evaluates: the models (:class:`EvalModel`, :func:`resolve_models`), the images
(:func:`list_items`), the protocol, and the :class:`EvalPlan` that holds them; the result row's columns
(:data:`ROW_FIELDS`). :func:`medsr_dist.eval.evaluate.plan_evaluation` makes the plan before Ray starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow.parquet as pq

from medsr_dist.config import EvalConfig, MedsrConfig
from medsr_dist.eval.perceptual import LpipsStatus
from medsr_dist.eval.protocols import Protocol, resolve_protocol
from medsr_dist.infer.model_file import ModelFile, read_model_file
from medsr_dist.models import zoo
from medsr_dist.storage import Storage

BICUBIC = "bicubic"
UNAVAILABLE = "unavailable"
#: Columns of the result rows, one row per (image, model).
ROW_FIELDS = ("image", "key", "model", "model_index", "status", "error", "psnr", "ssim", "lpips",
              "consistency_psnr_db", "seconds", "figure")
METRICS = ("psnr", "ssim", "lpips", "consistency_psnr_db")
#: Columns the 2-D evaluation adds to :data:`ROW_FIELDS` (NaN where a metric does not apply)
IMAGE_FIELDS = ("haarpsi", "niqe")
#: The metrics of a 2-D evaluation with a ground truth, and of one without (``lr_from: no_reference``)
REFERENCE_METRICS = ("psnr", "ssim", "lpips", "haarpsi", "consistency_psnr_db")
NO_REFERENCE_METRICS = ("consistency_psnr_db", "niqe")


def metrics_of(protocol) -> tuple[str, ...]:
    """The metrics a protocol's report shows: volumes keep :data:`METRICS`; 2-D adds HaarPSI, or, without a ground
    truth, scores consistency and NIQE only."""
    if not hasattr(protocol, "has_reference"):
        return METRICS
    return REFERENCE_METRICS if protocol.has_reference else NO_REFERENCE_METRICS


class EvalInputError(ValueError):
    """The dataset, a model or a figure name cannot be found; the message names the key and the path."""


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
    validation: dict | None = None  # a training export's meta.json "validation" (medsr_dist.train.guard)

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
            if self.validation:
                info["training_validation"] = self.validation
                if self.validation.get("below_bicubic"):
                    info["warning"] = f"{self.name}: its export says {self.validation.get('warning', 'it is below bicubic')}"
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
        models.append(EvalModel(m.name, m.source, m.baseline, model_file=model_file,
                                validation=_export_validation(uri, storage)))
    return models


def _export_validation(uri: str, storage: Storage) -> dict | None:
    """The ``validation`` record of a training export's ``meta.json`` beside ``uri`` (None: none, or not an export)."""
    if "/" not in uri:
        return None
    meta_uri = Storage.join(uri.rsplit("/", 1)[0], "meta.json")
    try:
        record = json.loads(storage.read_bytes(meta_uri)).get("validation") if storage.exists(meta_uri) else None
    except (ValueError, OSError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class EvalPlan:
    """What an evaluation will do; made by :func:`~medsr_dist.eval.evaluate.plan_evaluation` without Ray."""

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
    if not e.split and getattr(protocol_of(e), "lr_from", "") == "paired":
        items = pair_items(items, e.lr_dataset, storage.list_files(e.lr_dataset)
                           if storage.exists(e.lr_dataset) else [])
    return dataset, items[: e.limit] if e.limit else items


def _stem(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else name


def pair_items(items: list[dict[str, str]], lr_dataset: str, lr_keys: list[str]) -> list[dict[str, str]]:
    """``lr_from: paired``: each ground-truth item with its low-resolution file (``lr_key``), matched by the name
    relative to the two folders without its extension (``a/b.dcm`` and ``a/b.png`` pair).

    Raises:
        EvalInputError: no LR files, two LR files of one stem, or names on one side only (the first few listed).
    """
    root = lr_dataset.rstrip("/")
    lr_by_stem: dict[str, str] = {}
    for key in lr_keys:
        stem = _stem(key[len(root):].lstrip("/") or PurePosixPath(key).name)
        if stem in lr_by_stem:
            raise EvalInputError(f"eval.lr_dataset: two low-resolution files for {stem!r}: "
                                 f"{PurePosixPath(lr_by_stem[stem]).name} and {PurePosixPath(key).name}")
        lr_by_stem[stem] = key
    if not lr_by_stem:
        raise EvalInputError(f"eval.lr_dataset: no low-resolution images under {lr_dataset}")
    hr_stems = {_stem(item["name"]) for item in items}
    no_lr = [item["name"] for item in items if _stem(item["name"]) not in lr_by_stem]
    no_hr = sorted(PurePosixPath(lr_by_stem[s]).name for s in set(lr_by_stem) - hr_stems)
    if no_lr or no_hr:
        parts = []
        if no_lr:
            parts.append(f"{len(no_lr)} ground-truth file(s) without a low-resolution file of the same name in "
                         f"{lr_dataset} (e.g. {', '.join(no_lr[:5])})")
        if no_hr:
            parts.append(f"{len(no_hr)} low-resolution file(s) without a ground truth (e.g. {', '.join(no_hr[:5])})")
        raise EvalInputError("eval.params.lr_from=paired: files are matched by name without extension; " + "; ".join(parts))
    return [{**item, "lr_key": lr_by_stem[_stem(item["name"])]} for item in items]


def describe_plan(plan: EvalPlan) -> str:
    """A few lines for the console: protocol, dataset, models, LPIPS."""
    lines = [f"protocol {plan.protocol.name}: {plan.protocol.degradation}",
             f"dataset {plan.dataset}{' split ' + plan.split if plan.split else ''}: {len(plan.items)} image(s), "
             f"{len(plan.figures)} figure(s)",
             "models: " + ", ".join(f"{m.name} ({m.source})" for m in plan.models) + f"; baseline {plan.baseline}",
             f"LPIPS: {'available' if plan.lpips.available else 'unavailable'}: {plan.lpips.reason}"]
    return "\n".join(lines)
