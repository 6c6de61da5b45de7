"""`medsr mri prepare`: NIfTI volumes on the store -> sharded Parquet of slice pairs, split by volume (patient).

Flow (Ray Data, like :mod:`medsr_dist.data.prepare` for 2-D, whose split and encoding helpers it reuses): list
the volumes -> group each by patient (file-name pattern of ``prepare.split``) and assign groups to train/val/test
on the driver -> one task per volume reads it and makes its pairs (:mod:`medsr_dist.mri.simulate`: the six
pairings of an isotropic volume, or SMORE pairs of an anisotropic one); an unreadable or unusable volume becomes
one error row naming the file -> one Parquet folder per split under ``prepare.output``.

In ``self`` mode there is one volume per patient and no hold-out volume: every ``val_every``-th pair goes to val
(monitoring only), the rest to train.

Row schema (``<output>/<split>/*.parquet``; the 2-D paired schema, so ``medsr train`` streams it with the paired
crop and a scale-1 model): ``key`` (``<volume>#<slice axis>/<degraded axis>#<index>``, plus ``#<top>,<left>``
for a sub-image when ``mri.subimage`` > 0), ``rel_key``, ``group``
(the split group: the file-name pattern's patient part, like the 2-D ``group``; no DICOM PatientID is read),
``volume``, ``orientation``, ``slice_index``, ``degraded_axis``, ``image`` (ground
truth, 16-bit gray PNG), ``lq_image`` (interpolated degraded slice, same size), ``pair_scale`` (1), ``height``,
``width``, ``channels`` (1), ``bits`` (16), ``format`` (``nifti``), ``meta`` (JSON: factor, profile, slice_profile (the profile used: estimate record or given), mode,
intensity window, voxel sizes, low-resolution axis, which voxel axis is normal to the axial/coronal/sagittal
planes, so an orientation ``b/a`` reads e.g. "coronal slice, degraded along the axial normal"). Both images are
in the volume's intensity window (:func:`medsr_dist.mri.simulate.intensity_window`) with the degraded axis as rows.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from medsr_dist.config import MedsrConfig, MriConfig, check_through_plane_model
from medsr_dist.data.prepare import SPLITS, PrepareResult, _write_table, assign_splits, patient_of, to_training_png
from medsr_dist.mri.profile import resolve_profile, training_profiles
from medsr_dist.mri.simulate import _foreground_level, intensity_window, self_supervised_pairs, supervised_pairs
from medsr_dist.mri.volume import VolumeError, low_resolution_axis, plane_normal_axes, read_volume
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

COLUMNS = ("key", "rel_key", "group", "volume", "orientation", "slice_index", "degraded_axis", "image",
           "lq_image", "pair_scale", "height", "width", "channels", "bits", "format", "meta", "split", "ok", "error")


def _png(unit: np.ndarray) -> bytes:
    return to_training_png(unit[:, :, None], 16)


def volume_pairs(data: bytes, rel_key: str, group: str, split: str, mri: MriConfig, min_side: int = 1) -> list[dict]:
    """All slice-pair rows of one volume (module doc), ``split`` on each; ``mri.mode`` picks the pairing.
    Pairs with a side shorter than ``min_side`` (the training crop, ``degradation.gt_size``) are left out: the
    paired crop could not take them (e.g. the planes across a 12-slice volume).

    Raises:
        VolumeError / ValueError: unreadable volume, wrong dimensionality, not isotropic enough for supervised
            mode (its voxel sizes must agree within 20 %) or not anisotropic for self mode.
    """
    vol = read_volume(data, rel_key)
    k = mri.factor
    spacing = [round(float(s), 5) for s in vol.spacing]
    if mri.mode == "supervised":
        if max(spacing) > 1.2 * min(spacing):
            raise VolumeError(f"{rel_key}: supervised pairs need an isotropic volume, voxel sizes are {spacing} mm")
        lr_axis = None
        window = intensity_window(vol.data, k, min(vol.shape) // k)
        profile_record = {"method": "given", "family": "gaussian" if mri.profile == "estimate" else mri.profile,
                          "fwhm_voxels": float(k)}
        pairs = supervised_pairs(vol.data, k, profile_record["family"], skip_empty=mri.skip_empty, window=window)
    else:
        lr_axis = low_resolution_axis(vol.spacing, rel_key)
        window = intensity_window(vol.data, k, vol.shape[lr_axis])
        profile, profile_record = resolve_profile(mri.profile, vol.data, vol.spacing, lr_axis, k,
                                                  vol.facts.get("slice_thickness"))
        pairs = self_supervised_pairs(vol.data, lr_axis, k, training_profiles(profile, profile_record),
                                      skip_empty=mri.skip_empty, window=window)
    meta = json.dumps({"factor": k, "profile": mri.profile, "slice_profile": profile_record, "mode": mri.mode,
                       "window": [window.low, window.high],
                       "spacing_mm": spacing, "lr_axis": lr_axis, "shape": list(vol.shape),
                       "plane_normal_axes": plane_normal_axes(vol.affine)})
    rows = []
    pairs = (p for p in pairs if min(p.gt.shape) >= min_side)
    level = _foreground_level(vol.data, window)
    for n, pair in enumerate(pairs):
        row_split = split
        if mri.mode == "self":  # whole slices go to val, so no val crop overlaps a train crop
            row_split = "val" if n % mri.val_every == mri.val_every - 1 else "train"
        for (top, left), gt, lq in subimages(pair.gt, pair.lq, mri.subimage, max(min_side, 1)):
            if mri.subimage and mri.skip_empty and (gt > level).mean() <= mri.skip_empty:
                continue
            where = f"#{top},{left}" if mri.subimage else ""
            rows.append(dict(
                key=f"{rel_key}#{pair.orientation}#{pair.index}{where}", rel_key=rel_key, group=group,
                volume=rel_key, orientation=pair.orientation, slice_index=pair.index,
                degraded_axis=pair.degraded_axis, image=_png(gt), lq_image=_png(lq), pair_scale=1,
                height=gt.shape[0], width=gt.shape[1], channels=1, bits=16, format="nifti", meta=meta,
                split=row_split, ok=True, error=""))
    if not rows:
        raise VolumeError(f"{rel_key}: no slice pair has foreground (mri.skip_empty={mri.skip_empty}) and both "
                          f"sides >= {min_side} px (degradation.gt_size)")
    return rows


def _starts(length: int, size: int) -> list[int]:
    step = max(size // 2, 1)
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)  # the last one flush with the border: every pixel is in some sub-image
    return starts


def subimages(gt: np.ndarray, lq: np.ndarray, size: int, min_side: int = 1):
    """``((top, left), gt, lq)`` sub-images of an aligned pair: ``size`` x ``size`` at half-size steps, the last
    row/column of them flush with the border (``size`` 0, or a slice no larger than it: the whole pair once). A
    side shorter than ``size`` keeps its full length; ``size`` below ``min_side`` is raised to it."""
    if not size or (gt.shape[0] <= size and gt.shape[1] <= size):
        yield (0, 0), gt, lq
        return
    size = max(size, min_side)
    hs, ws = min(size, gt.shape[0]), min(size, gt.shape[1])
    for top in _starts(gt.shape[0], hs):
        for left in _starts(gt.shape[1], ws):
            yield (top, left), gt[top:top + hs, left:left + ws], lq[top:top + hs, left:left + ws]


class MakeVolumePairs:
    """Ray Data stage: ``{"key", "rel_key", "group", "split"}`` rows (one per volume) -> its slice-pair rows, or
    one error row (``ok`` false, ``error`` naming the file and the problem)."""

    def __init__(self, storage: Storage, mri: MriConfig, min_side: int = 1):
        self.storage, self.mri, self.min_side = storage, mri, min_side

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {c: [] for c in COLUMNS}
        for key, rel, group, split in zip(batch["key"], batch["rel_key"], batch["group"], batch["split"]):
            try:
                rows = volume_pairs(self.storage.read_bytes(str(key)), str(rel), str(group), str(split), self.mri,
                                    self.min_side)
            except Exception as exc:  # noqa: BLE001 - a bad volume is an error row, never a failed job
                rows = [dict(key=str(key), rel_key=str(rel), group=str(group), volume=str(rel), orientation="",
                             slice_index=-1, degraded_axis=-1, image=b"", lq_image=b"", pair_scale=1, height=0,
                             width=0, channels=0, bits=0, format="", meta="", split=str(split), ok=False,
                             error=f"{type(exc).__name__}: {exc}")]
            for row in rows:
                for c in COLUMNS:
                    out[c].append(row[c])
        return out


def prepare_slice_pairs(cfg: MedsrConfig, mri: MriConfig, storage: Storage | None = None,
                        overwrite: bool = True) -> PrepareResult:
    """Run the MRI prepare stage (Ray must be initialised): ``prepare.input`` volumes -> ``prepare.output``.

    ``counts``/``patients`` of the result are pairs/volume groups per split; ``errors`` one row per volume that
    could not be used.

    Raises:
        FileNotFoundError: no volume under ``prepare.input`` matches ``mri.include``.
        ConfigError: ``model`` (what trains on these pairs) cannot be a through-plane refiner (RRDBNet x1).
    """
    import ray

    check_through_plane_model(cfg)
    storage = storage or Storage(cfg.storage)
    p = cfg.prepare
    keys = storage.list_files(p.input, include=mri.include, exclude=p.exclude)
    if not keys:
        raise FileNotFoundError(f"prepare.input: no volumes under {p.input} match {mri.include}")
    prefix = p.input.rstrip("/")
    rels = {k: k[len(prefix):].lstrip("/") if k.startswith(prefix) else k.rsplit("/", 1)[-1] for k in keys}
    groups = {k: patient_of(rels[k], "", p.split) for k in keys}
    mapping = assign_splits(list(groups.values()), p.split, cfg.run.seed) if mri.mode == "supervised" else {}
    items = [{"key": k, "rel_key": rels[k], "group": groups[k], "split": mapping.get(groups[k], "train")} for k in keys]
    log.info("mri prepare: %d volumes under %s (%s, x%d, %s profile)", len(keys), p.input, mri.mode, mri.factor,
             mri.profile)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    pairs = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        MakeVolumePairs, fn_constructor_args=(storage, mri, cfg.degradation.gt_size), batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(cpus, len(items))),
    ).materialize()
    index = pairs.select_columns(["key", "volume", "group", "split", "ok", "error"]).take_all()
    errors = [{"key": r["key"], "error": r["error"]} for r in index if not r["ok"]]
    pafs, out_path = storage.pyarrow_fs(p.output)
    counts, patients = {}, {}
    for split in SPLITS:
        rows = [r for r in index if r["ok"] and r["split"] == split]
        counts[split], patients[split] = len(rows), len({r["group"] for r in rows})
        if not rows:
            continue
        part = pairs.filter(lambda row, _s=split: row["ok"] and row["split"] == _s).drop_columns(["ok", "error", "split"])
        part.write_parquet(f"{out_path.rstrip('/')}/{split}", filesystem=pafs, min_rows_per_file=p.rows_per_shard,
                           mode="overwrite" if overwrite else "error")
    _write_table(storage, storage.join(p.output, "errors.parquet"), errors, {"key": pa.string(), "error": pa.string()})
    summary = {"input": p.input, "volumes": len(keys), "pairs": counts, "groups": patients, "errors": len(errors),
               "split": p.split.model_dump(), "mri": mri.model_dump()}
    storage.write_bytes(storage.join(p.output, "summary.json"), json.dumps(summary, indent=2).encode())
    return PrepareResult(output=p.output, counts=counts, patients=patients, errors=errors)
