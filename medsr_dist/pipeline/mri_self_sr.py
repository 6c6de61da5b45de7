"""``medsr mri self-sr``: SMORE-style self-supervised SR of one volume alone — its own in-plane slices -> slice
pairs (:mod:`medsr_dist.mri.prepare`) -> a bounded training (:mod:`medsr_dist.train`) -> reconstruction of its
through-plane slices (:func:`medsr_dist.mri.job.reconstruct_volume`). It trains, so it lives above the training
layer, with the other stage runners.
"""
from __future__ import annotations

import posixpath
import time

from medsr_dist.config import MedsrConfig, MriConfig, check_through_plane_model
from medsr_dist.mri.job import NIFTI_SUFFIXES, ReconstructionResult, load_volume, reconstruct_volume
from medsr_dist.mri.prepare import prepare_slice_pairs
from medsr_dist.mri.reconstruct import plan_reconstruction
from medsr_dist.mri.volume import VolumeError, write_nifti
from medsr_dist.runtime import init_ray
from medsr_dist.storage import Storage


def _stem(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name or "volume"


def self_sr(cfg: MedsrConfig, mri: MriConfig, volume_uri: str, output_uri: str,
            storage: Storage | None = None) -> tuple[ReconstructionResult, dict]:
    """SMORE-style self-supervised SR of one volume: its own in-plane slices -> pairs -> a bounded training
    (``train.iterations``) -> reconstruction of its through-plane slices. Work folders live under
    ``<run.root>/self-sr/<volume stem>/`` (input copy as NIfTI, dataset, train). Ray is started (or joined).

    Returns:
        (the reconstruction result, a summary: pairs per split, training iterations and final losses, export,
        ``train_wall_seconds`` (the training stage, Ray start-up of the stream included) and ``train_cpu_seconds``
        (CPU seconds of the training worker process, all threads: the budget on a shared machine)).

    Raises:
        ValueError: ``model`` is RRDBNet x1 (before any work; MSRResNet x1 is the refiner), or not scale 1 later.
    """
    check_through_plane_model(cfg)  # refused before any work, not after a training run
    storage = storage or Storage(cfg.storage)
    volume, _ = load_volume(storage, volume_uri)
    plan_reconstruction(volume, mri.factor)  # refuse a bad volume before any Ray work
    work = storage.join(cfg.run.root, "self-sr", _stem(volume_uri))
    inp, dataset, train = (storage.join(work, p) for p in ("input", "dataset", "train"))
    storage.write_bytes(storage.join(inp, _stem(volume_uri) + ".nii.gz"), write_nifti(volume))
    data = cfg.model_dump(mode="json")
    data["prepare"].update(input=inp, output=dataset)
    data["train"].update(dataset=dataset, output=train)
    data["run"]["name"] = f"{cfg.run.name}-self-{_stem(volume_uri)}"
    mri = mri.model_copy(update={"mode": "self"})
    data["mri"] = mri.model_dump(mode="json")  # the run's recorded config says what was done
    cfg = type(cfg).model_validate(data)
    init_ray(cfg)
    prepared = prepare_slice_pairs(cfg, mri, storage)
    if prepared.errors:
        raise VolumeError(f"{volume_uri}: {prepared.errors[0]['error']}")
    t0 = time.perf_counter()
    # lazy: the training stack imports torch and basicsr; importing medsr_dist.pipeline does not need it
    from medsr_dist.train.trainer import run_training

    trained = run_training(cfg, storage)
    train_wall = time.perf_counter() - t0
    result = reconstruct_volume(cfg, mri, volume_uri, output_uri, trained.export, storage)
    metrics = {k: v for k, v in trained.metrics.items() if isinstance(v, (int, float))}
    summary = {"pairs": prepared.counts, "iterations": trained.iterations, "export": trained.export,
               "train_wall_seconds": round(train_wall, 1),
               "train_cpu_seconds": round(float(metrics.get("worker_cpu_seconds", float("nan"))), 1),
               "metrics": metrics}
    return result, summary
