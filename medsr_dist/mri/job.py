"""Volume jobs behind ``medsr mri``: reconstruct one volume with a trained model (self-supervised SR of one volume
alone, which also trains, is :mod:`medsr_dist.pipeline.mri_self_sr`).

Volumes are read from and written to the store (:class:`~medsr_dist.storage.Storage`): a ``.nii``/``.nii.gz`` file,
or a folder of single-frame DICOM slices of one series. The output is NIfTI when its name ends in ``.nii`` or
``.nii.gz`` (source dtype, scaling and orientation kept), otherwise a folder with a derived DICOM series (DICOM
sources only). A ``<output>.provenance.json`` beside it records the model, its sha256, factor, fusion, engine
revision, the source's sha256 and the consistency score: the output re-degraded along the low-resolution axis
with the slice profile, against the input (PSNR in dB inside the input's foreground mask; a reconstruction that
contradicts its own input scores low).
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass

from medsr_dist.config import MedsrConfig, MriConfig, through_plane_refiner_problem
from medsr_dist.infer.engine import ENGINE_REVISION, TileSpec, auto_batch_size
from medsr_dist.infer.model_file import build_model_backend, read_model_file
from medsr_dist.mri.metrics import foreground_mask, psnr_3d
from medsr_dist.mri.profile import resolve_profile
from medsr_dist.mri.reconstruct import plan_reconstruction, reconstruct
from medsr_dist.mri.simulate import check_factor, degrade_axis
from medsr_dist.mri.volume import Volume, read_dicom_series, read_volume, write_dicom_series, write_nifti
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_volume(storage: Storage, uri: str) -> tuple[Volume, str]:
    """A NIfTI file or a folder holding one DICOM series -> (volume, sha256 of the source bytes).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        VolumeError: see :func:`~medsr_dist.mri.volume.read_nifti` / :func:`~medsr_dist.mri.volume.read_dicom_series`.
    """
    if uri.endswith(NIFTI_SUFFIXES) or (storage.exists(uri) and not storage.list_files(uri)):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such volume")
        data = storage.read_bytes(uri)
        return read_volume(data, uri), hashlib.sha256(data).hexdigest()
    keys = sorted(storage.list_files(uri))
    if not keys:
        raise FileNotFoundError(f"{uri}: no such volume file or DICOM series folder")
    files = [(posixpath.basename(k), storage.read_bytes(k)) for k in keys]
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return read_dicom_series(files, uri), digest.hexdigest()


def save_volume(storage: Storage, volume: Volume, uri: str, derivation: str) -> list[str]:
    """Write ``volume`` to ``uri`` (module doc); returns the URIs written.

    Raises:
        VolumeError: a DICOM output asked for a volume that did not come from DICOM.
    """
    if uri.endswith(NIFTI_SUFFIXES):
        storage.write_bytes(uri, write_nifti(volume, gz=uri.endswith(".gz"), description=derivation))
        return [uri]
    written = []
    for name, data in write_dicom_series(volume, derivation=derivation):
        target = storage.join(uri, name)
        storage.write_bytes(target, data)
        written.append(target)
    return written


def consistency_psnr(output: Volume, source: Volume, lr_axis: int, factor: float, profile) -> float:
    """PSNR (dB) of the output re-degraded along ``lr_axis`` (``profile``) against the source, in the source's
    foreground mask, data range = the source's range. A non-integer ``factor`` re-degrades with the output's own
    spacing of the thick slices (output over source voxels: the fine grid keeps the field of view)."""
    k = check_factor(factor)
    if isinstance(k, float):
        k = output.shape[lr_axis] / source.shape[lr_axis]
    again = degrade_axis(output.data, lr_axis, k, profile)
    return psnr_3d(again, source.data, foreground_mask(source.data))


@dataclass
class ReconstructionResult:
    output: str
    written: list[str]
    provenance: dict


def reconstruct_volume(cfg: MedsrConfig, mri: MriConfig, volume_uri: str, output_uri: str, model_uri: str,
                       storage: Storage | None = None) -> ReconstructionResult:
    """Reconstruct one stored volume with the exported scale-1 model at ``model_uri`` (module doc).

    Tiling and batching come from ``cfg.enhance`` (``tile``, ``tile_overlap``, ``tile_blend``, ``batch_size``).

    Raises:
        ValueError: the model is not scale 1, or is RRDBNet x1 (no identity: MSRResNet x1 is the refiner);
            VolumeError / FileNotFoundError for the input.
    """
    storage = storage or Storage(cfg.storage)
    volume, source_sha = load_volume(storage, volume_uri)
    plan = plan_reconstruction(volume, mri.factor)  # geometry checked before the model is loaded
    model = read_model_file(model_uri, cfg.storage)
    if model.scale != 1:
        raise ValueError(f"{model_uri}: a x{model.scale} model; through-plane refinement needs a scale-1 model "
                         "(train one with model.scale=1 on `medsr mri prepare` pairs)")
    problem = through_plane_refiner_problem(model.generator.get("type", "RRDBNet"), model.scale)
    if problem:
        raise ValueError(f"{model_uri}: {problem}")
    backend = build_model_backend(model, "torch", storage)
    e = cfg.enhance
    batch = e.batch_size or auto_batch_size(backend)
    tile = TileSpec(tile=e.tile, overlap=e.tile_overlap, blend=e.tile_blend, batch_size=batch)
    out = reconstruct(volume, backend, mri.factor, tile=tile, fusion=mri.fusion)
    profile, profile_record = resolve_profile(mri.profile, volume.data, volume.spacing, plan.lr_axis, plan.factor,
                                              volume.facts.get("slice_thickness"))
    score = consistency_psnr(out, volume, plan.lr_axis, mri.factor, profile)
    derivation = (f"Through-plane SR x{mri.factor} ({mri.fusion} fusion) by model {model.name} "
                  f"(sha256 {model.sha256[:16]}); enhanced volume, not a new acquisition")
    written = save_volume(storage, out, output_uri, derivation)
    provenance = {"source": volume_uri, "source_sha256": source_sha, "model": model.name, "model_sha256": model.sha256,
                  "factor": mri.factor, "fusion": mri.fusion, "profile": mri.profile, "slice_profile": profile_record,
                  "lr_axis": plan.lr_axis,
                  "input_shape": list(plan.input_shape), "output_shape": list(plan.output_shape),
                  "output_spacing_mm": list(plan.output_spacing), "engine_revision": ENGINE_REVISION,
                  "tile": tile.tile, "tile_overlap": tile.overlap, "precision": getattr(backend, "precision", "fp32"),
                  "consistency_psnr_db": round(score, 3), "note": "enhanced volume, not a new acquisition"}
    storage.write_bytes(output_uri.rstrip("/") + ".provenance.json", json.dumps(provenance, indent=2).encode())
    return ReconstructionResult(output_uri, written, provenance)
