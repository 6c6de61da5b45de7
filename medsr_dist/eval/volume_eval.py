"""`medsr eval` for volume protocols (``mri-aniso-x{k}``): isotropic volume -> thick slices -> reconstruction, scored in 3-D.

Per volume (a ``.nii``/``.nii.gz`` under ``eval.dataset``; ``eval.split: null``), one Ray Data actor task
(:class:`VolumeScorer`, ``eval.replicas`` actors, one GPU each when the cluster has GPUs):

1. ground truth and thick-slice input by the :class:`~medsr_dist.eval.protocols.VolumeProtocol` (refused, as an
   error row naming the file, when the volume is not isotropic, not 3-D or unreadable);
2. every method on the input: ``trilinear`` and ``bspline`` (cubic B-spline, scipy.ndimage order 3) interpolation
   along the thick axis, and each network model through :func:`~medsr_dist.mri.reconstruct.reconstruct`, i.e. one
   :class:`~medsr_dist.infer.replica.ModelReplica` (the one engine; tiles batched across slices);
3. scores inside the ground truth's foreground mask (:mod:`medsr_dist.mri.metrics`): 3-D PSNR and SSIM of the
   volume, the same per *slab* (the ``k`` fine slices one thick slice became), and the consistency score (the
   output re-degraded with the slice profile against the input, inside the input's mask; with
   ``profile_known: false`` ("profile unknown") the profile estimated from the input, reported beside the true one
   under ``slice_profile``);
4. for the figure volumes, one PNG: axial / coronal / sagittal views through the mask's centre, each a row of
   input (nearest) | trilinear | B-spline | models | ground truth with a magnified region below (where the best
   model and B-spline disagree most, or ``eval.crop_box``).

Paired comparisons with the baseline (``bspline``) resample *slabs* (all volumes pooled) with the suite's paired
bootstrap (:func:`medsr_dist.eval.stats.paired_bootstrap`): with one or a few volumes the slabs are the units that
exist. Neighbouring slabs are correlated, so these intervals are narrower than intervals over subjects would be;
the report says so. The report is :func:`~medsr_dist.eval.results.build_report`'s, written by
:mod:`medsr_dist.eval.html_report` (LPIPS, a 2-D perceptual metric, is not computed).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import ray
from skimage.metrics import structural_similarity

from medsr_dist.config import EvalConfig, MedsrConfig, StorageConfig, through_plane_refiner_problem
from medsr_dist.eval.html_report import write_eval_report
from medsr_dist.eval.perceptual import LpipsStatus
from medsr_dist.eval.plan import ROW_FIELDS, EvalInputError, EvalModel
from medsr_dist.eval.protocols import VolumeProtocol
from medsr_dist.eval.report import CropBox, side_by_side
from medsr_dist.eval.results import EvalResult, build_report, figure_key, plain_row, runs_precision
from medsr_dist.eval.stats import paired_bootstrap
from medsr_dist.infer.replica import EngineSettings, ModelReplica
from medsr_dist.mri.metrics import foreground_mask, interpolation_baseline, psnr_3d
from medsr_dist.mri.profile import resolve_profile
from medsr_dist.mri.reconstruct import reconstruct
from medsr_dist.mri.simulate import crop_to_multiple, degrade_axis, simulate_anisotropic
from medsr_dist.mri.volume import VolumeError, check_orthonormal, plane_normal_axes, read_volume
from medsr_dist.runtime import cluster_has_gpus, cluster_nodes, size_replicas
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

#: The interpolation baselines every volume evaluation includes; comparisons are made against BASELINE.
INTERPOLATIONS = ("trilinear", "bspline")
BASELINE = "bspline"
LPIPS_REASON = "LPIPS is a 2-D perceptual metric; volumes are scored by 3-D PSNR/SSIM inside the foreground mask"
SLAB_FIELD = "slabs"  # per-row JSON: {"psnr": [...], "ssim": [...]} per slab (null: no foreground in that slab),
#                       and "slice_profile": the true profile and, in "profile unknown" mode, the estimate


@dataclass(frozen=True)
class VolumePair:
    """What a volume protocol makes of one isotropic volume.

    Attributes:
        hr: the ground truth (:class:`~medsr_dist.mri.volume.Volume`, physical float32 values).
        thick: the simulated thick-slice input, its affine the thick grid's.
        axis: the voxel axis made thick.
        profile: what the methods' consistency is scored with: the true profile's name, or (``profile_known``
            false) the estimate from the thick input.
        profile_record: the true profile and, when not told, the estimate (family, FWHM mm, shape, residual).
    """

    hr: Any
    thick: Any
    axis: int
    profile: Any = "gaussian"
    profile_record: dict = field(default_factory=dict)


def make_volume_pair(volume, protocol: VolumeProtocol):
    """Ground truth and thick-slice input of ``volume`` under ``protocol`` (see the protocol's doc).

    Raises:
        VolumeError: the volume is not isotropic (its voxel sizes differ by more than 10 %), or too short along the
            thick axis (fewer than ``2 * scale`` voxels).
    """
    check_orthonormal(volume.affine, volume.source)
    spacing = volume.spacing
    if spacing.max() > 1.1 * spacing.min():
        raise VolumeError(f"{volume.source}: {protocol.name} needs an isotropic volume (the ground truth); voxel sizes "
                          f"are {[round(float(s), 4) for s in spacing]} mm")
    axis = plane_normal_axes(volume.affine)[protocol.axis]
    k = protocol.scale
    if volume.shape[axis] < 2 * k:
        raise VolumeError(f"{volume.source}: {volume.shape[axis]} voxels along the {protocol.axis} normal; x{k} thick "
                          f"slices need at least {2 * k}")
    hr = volume.with_data(np.ascontiguousarray(crop_to_multiple(volume.data, axis, k)))
    thick = simulate_anisotropic(hr, axis, k, protocol.profile)
    if protocol.lr_quantization == "source" and np.issubdtype(volume.stored_dtype, np.integer):
        info = np.iinfo(volume.stored_dtype)
        slope = volume.scl_slope if np.isfinite(volume.scl_slope) and volume.scl_slope else 1.0
        stored = np.clip(np.rint((thick.data.astype(np.float64) - volume.scl_inter) / slope), info.min, info.max)
        thick = thick.with_data((stored * slope + volume.scl_inter).astype(np.float32), thick.affine)
    record: dict[str, Any] = {"true": {"family": protocol.profile, "fwhm_mm": round(float(k * volume.spacing[axis]), 4)},
                              "known_to_methods": protocol.profile_known}
    profile: Any = protocol.profile
    if not protocol.profile_known:
        profile, record["estimated"] = resolve_profile("estimate", thick.data, thick.spacing, axis, k)
    return VolumePair(hr=hr, thick=thick, axis=axis, profile=profile, profile_record=record)


def slab_scores(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray, ssim_map: np.ndarray, axis: int, k: int,
                data_range: float) -> dict[str, list[float | None]]:
    """PSNR (dB) and mean SSIM inside ``mask`` of each slab of ``k`` slices along ``axis`` (``None``: the slab has
    no foreground voxel)."""
    psnrs: list[float | None] = []
    ssims: list[float | None] = []
    for n in range(reference.shape[axis] // k):
        index = (slice(None),) * axis + (slice(n * k, (n + 1) * k),)
        m = mask[index]
        if not m.any():
            psnrs.append(None)
            ssims.append(None)
            continue
        diff = (pred[index].astype(np.float64) - reference[index])[m]
        mse = float(np.mean(diff * diff))
        psnrs.append(math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse))
        ssims.append(float(ssim_map[index][m].mean()))
    return {"psnr": psnrs, "ssim": ssims}


def score_volume(pred: np.ndarray, pair: VolumePair, protocol: VolumeProtocol, mask: np.ndarray,
                 thick_mask: np.ndarray) -> dict[str, Any]:
    """Volume PSNR/SSIM inside ``mask``, per-slab scores and the consistency score of one method's output."""
    reference = pair.hr.data
    r = float(reference.max() - reference.min())
    _, smap = structural_similarity(reference.astype(np.float64), pred.astype(np.float64), data_range=r, full=True)
    again = degrade_axis(pred, pair.axis, protocol.scale, pair.profile)
    return {"psnr": psnr_3d(pred, reference, mask, r), "ssim": float(smap[mask].mean()),
            "consistency_psnr_db": psnr_3d(again, pair.thick.data, thick_mask, r),
            SLAB_FIELD: slab_scores(pred, reference, mask, smap, pair.axis, protocol.scale, r)}


# ------------------------------------------------------------------------------------------------------------
# Figure: orthogonal views with a magnified region
# ------------------------------------------------------------------------------------------------------------
def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane ``index`` along ``axis``, drawn with the first remaining axis across and the second upwards."""
    return np.rot90(np.take(volume, index, axis=axis))


def orthogonal_views_figure(panels: list[tuple[str, np.ndarray]], affine: np.ndarray, mask: np.ndarray, *,
                            compare: tuple[int, int] | None, window: tuple[float, float], zoom: int = 4,
                            crop_box=None, max_panel: int | None = 512) -> bytes:
    """One PNG: a row per anatomical plane (axial, coronal, sagittal; through the centre of the mask's bounding
    box), each row the ``panels`` (caption, (I, J, K) volume on the fine grid) side by side with the region where
    panels ``compare`` disagree most (or ``crop_box``) magnified below (:func:`~medsr_dist.eval.report.side_by_side`).

    ``window``: physical (low, high) mapped to black and white.
    """
    lo, hi = window
    scale = 1.0 / max(hi - lo, 1e-12)
    where = np.argwhere(mask)
    centre = ((where.min(axis=0) + where.max(axis=0)) // 2) if where.size else np.array(mask.shape) // 2
    rows = []
    for plane, axis in sorted(plane_normal_axes(affine).items(), key=lambda p: ("axial", "coronal", "sagittal").index(p[0])):
        index = int(centre[axis])
        shown = [(f"{plane}: {caption}" if i == 0 else caption,
                  np.clip((_view(v, axis, index) - lo) * scale, 0.0, 1.0).astype(np.float32))
                 for i, (caption, v) in enumerate(panels)]
        box = None
        if crop_box is not None:  # the same box on every view, kept inside it
            h, w = shown[0][1].shape
            y, x = min(max(crop_box.y, 0), h - 1), min(max(crop_box.x, 0), w - 1)
            box = type(crop_box)(y, x, max(1, min(crop_box.height, h - y)), max(1, min(crop_box.width, w - x)))
        png = side_by_side(shown, compare=list(compare) if compare else None, zoom=zoom, crop_box=box,
                           max_panel=max_panel)
        rows.append(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=24) for r in rows]
    ok, encoded = cv2.imencode(".png", np.concatenate(rows, axis=0))
    if not ok:
        raise RuntimeError("cv2 failed to encode the orthogonal-views PNG")
    return encoded.tobytes()


# ------------------------------------------------------------------------------------------------------------
# The Ray Data stage
# ------------------------------------------------------------------------------------------------------------
def method_names(models) -> list[str]:
    """The methods a volume evaluation scores, in report order: the interpolations, then the network models."""
    return [*INTERPOLATIONS, *(m.name for m in models if m.model_file is not None or m.factory is not None)]


class VolumeScorer:
    """Stage (actor pool): ``{"key", "name", "figure"}`` rows (one volume each) -> one row per (volume, method) with
    the fields of :data:`~medsr_dist.eval.plan.ROW_FIELDS` plus :data:`SLAB_FIELD` (JSON). A volume that cannot
    be read or simulated is an error row for every method; a model that fails on a volume is an error for that cell.
    """

    def __init__(self, models, protocol: VolumeProtocol, e: EvalConfig, storage_cfg: StorageConfig, output: str,
                 precision: str | None = None, threads: int | None = None):
        self.protocol, self.e, self.output = protocol, e, output
        self.storage = Storage(storage_cfg)
        settings = EngineSettings.of(e, precision=precision or e.precision, threads=threads)
        self.networks: list[tuple[str, ModelReplica]] = []
        for m in models:
            if m.factory is not None:
                backend = m.factory()
                self.networks.append((m.name, ModelReplica(None, backend, replace(
                    settings, precision=getattr(backend, "precision", settings.precision)))))
            elif m.model_file is not None:
                self.networks.append((m.name, ModelReplica.load(m.model_file, self.storage, settings)))

    def __call__(self, batch: dict) -> dict:
        rows: list[dict] = []
        for j in range(len(batch["key"])):
            rows += self.one(str(batch["key"][j]), str(batch["name"][j]), bool(batch["figure"][j]))
        return {k: np.asarray([r[k] for r in rows]) for k in (*ROW_FIELDS, SLAB_FIELD)}

    def one(self, key: str, name: str, figure: bool) -> list[dict]:
        methods = [*INTERPOLATIONS, *(n for n, _ in self.networks)]
        rows = [{"image": name, "key": key, "model": m, "model_index": i, "status": "ok", "error": "",
                 "psnr": math.nan, "ssim": math.nan, "lpips": math.nan, "consistency_psnr_db": math.nan,
                 "seconds": 0.0, "figure": "", SLAB_FIELD: "{}"} for i, m in enumerate(methods)]
        p = self.protocol
        try:
            pair = make_volume_pair(read_volume(self.storage.read_bytes(key), name), p)
            mask = foreground_mask(pair.hr.data)
            thick_mask = foreground_mask(pair.thick.data)
        except Exception as exc:  # noqa: BLE001 - an unusable volume is an error row for every method
            for row in rows:
                row.update(status="error", error=f"input: {type(exc).__name__}: {exc}")
            return rows
        outputs: dict[int, np.ndarray] = {}
        for i, method in enumerate(methods):
            t0 = time.perf_counter()
            try:
                if method in INTERPOLATIONS:
                    pred = interpolation_baseline(pair.thick.data, pair.axis, p.scale, method)
                else:
                    replica = dict(self.networks)[method]
                    pred = reconstruct(pair.thick, replica.backend, p.scale, tile=replica.spec, fusion=p.fusion,
                                       lr_axis=pair.axis).data
                    if not np.isfinite(pred).all():
                        raise ValueError(f"the model output {int((~np.isfinite(pred)).sum()):,} non-finite values")
                rows[i]["seconds"] = time.perf_counter() - t0
                scores = score_volume(pred, pair, p, mask, thick_mask)
                scores[SLAB_FIELD]["slice_profile"] = pair.profile_record  # true vs estimated, for the report
                rows[i].update({k: v for k, v in scores.items() if k != SLAB_FIELD},
                               **{SLAB_FIELD: json.dumps(scores[SLAB_FIELD])})
                if figure:
                    outputs[i] = pred
            except Exception as exc:  # noqa: BLE001 - this method fails on this volume alone
                log.warning("%s on %s failed: %s", method, name, exc)
                rows[i].update(status="error", error=f"{'inference' if method not in INTERPOLATIONS else 'interpolation'}: "
                                                     f"{type(exc).__name__}: {exc}")
        if figure and outputs:
            try:
                fkey = figure_key(name)
                self.storage.write_bytes(self.storage.join(self.output, fkey), self._figure(pair, methods, outputs, mask))
                for row in rows:
                    row["figure"] = fkey
            except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is not a failed evaluation
                log.warning("figure of %s failed: %s", name, exc)
        return rows

    def _figure(self, pair: VolumePair, methods: list[str], outputs: dict[int, np.ndarray], mask: np.ndarray) -> bytes:
        k = self.protocol.scale
        nearest = np.repeat(pair.thick.data, k, axis=pair.axis)
        panels = [(f"input x1/{k} (nearest)", nearest)]
        panels += [(m if i in outputs else f"{m}: error", outputs.get(i, np.zeros_like(pair.hr.data)))
                   for i, m in enumerate(methods)]
        panels.append(("ground truth", pair.hr.data))
        # the region: where the last network (else trilinear) and B-spline disagree most
        bspline = 1 + methods.index(BASELINE)
        other = max((1 + i for i in outputs if methods[i] not in INTERPOLATIONS), default=1)
        lo, hi = float(pair.hr.data.min()), float(np.percentile(pair.hr.data[mask], 99.5))
        box = CropBox(*self.e.crop_box) if self.e.crop_box else None
        return orthogonal_views_figure(panels, pair.hr.affine, mask, compare=(bspline, other), window=(lo, hi),
                                       zoom=self.e.zoom, crop_box=box, max_panel=self.e.figure_panel)


# ------------------------------------------------------------------------------------------------------------
# Plan, run, report
# ------------------------------------------------------------------------------------------------------------
def check_volume_plan(plan) -> None:
    """Volume-protocol checks of an :class:`~medsr_dist.eval.plan.EvalPlan` (before Ray).

    Raises:
        EvalInputError: a prepared split (volumes are files), a file that is not NIfTI, a model name that clashes
            with an interpolation, or a network model that is not scale 1 (through-plane refinement) or cannot be a
            through-plane refiner (RRDBNet x1: :func:`~medsr_dist.config.through_plane_refiner_problem`).
    """
    if plan.split:
        raise EvalInputError(f"{plan.protocol.name} evaluates NIfTI volumes under eval.dataset: set eval.split=null")
    bad = [item["name"] for item in plan.items if not item["key"].endswith((".nii", ".nii.gz"))]
    if bad:
        raise EvalInputError(f"eval.dataset: {plan.protocol.name} needs .nii/.nii.gz volumes; {bad[:3]} are not "
                             f"(set eval.include, e.g. ['*.nii.gz'])")
    for m in plan.models:
        if m.name in INTERPOLATIONS and not m.is_bicubic:
            raise EvalInputError(f"eval.models[{m.name}]: the name is taken by the interpolation baseline")
        if m.model_file is not None and m.model_file.scale != 1:
            raise EvalInputError(f"eval.models[{m.name}]: a x{m.model_file.scale} model; {plan.protocol.name} "
                                 "reconstructs through-plane slices with a scale-1 refinement model "
                                 "(`medsr mri prepare` pairs, model.scale=1)")
        problem = m.model_file and through_plane_refiner_problem(m.model_file.generator.get("type", "RRDBNet"), 1)
        if problem:
            raise EvalInputError(f"eval.models[{m.name}]: {problem}")


def run_volume_evaluation(cfg: MedsrConfig, storage: Storage, plan):
    """Evaluate a volume protocol ``plan`` on Ray Data (Ray running) and write the report; an
    :class:`~medsr_dist.eval.results.EvalResult` like the 2-D evaluation's."""
    check_volume_plan(plan)
    e = cfg.eval
    t0 = time.perf_counter()
    gpu = 1 if cluster_has_gpus() else 0
    precision = runs_precision(plan, e, gpu)
    figures = set(plan.figures)
    # the scorers read, reconstruct and score: no other stage to keep CPUs for
    sizing = size_replicas(cluster_nodes(), cpus_per_replica=e.cpus_per_replica, min_replicas=1,
                           max_replicas=e.replicas, section="eval", reserve=0)
    log.info("eval volume scorers: up to %d, %d intra-op thread(s) (%s)", sizing.max_replicas, sizing.threads, sizing.how)
    ds = ray.data.from_items([{"key": it["key"], "name": it["name"], "figure": it["name"] in figures} for it in plan.items],
                             override_num_blocks=max(1, len(plan.items)))
    ds = ds.map_batches(VolumeScorer, fn_constructor_args=(plan.models, plan.protocol, e, cfg.storage, plan.output,
                                                           precision, sizing.threads),
                        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sizing.max_replicas),
                        num_gpus=gpu, num_cpus=0 if gpu else sizing.cpus)
    raw = ds.take_all()
    slabs = {(str(r["image"]), str(r["model"])): json.loads(str(r[SLAB_FIELD])) for r in raw}
    order = {item["name"]: n for n, item in enumerate(plan.items)}
    rows = sorted((plain_row(r) for r in raw), key=lambda r: (order.get(r["image"], len(order)), r["model_index"]))
    report = build_volume_report(cfg, plan, rows, slabs, seconds=time.perf_counter() - t0, precision=precision)
    blobs = {key: storage.read_bytes(storage.join(plan.output, key)) for key in sorted({r["figure"] for r in rows if r["figure"]})}
    files = write_eval_report(report, blobs, lambda key, data: storage.write_bytes(storage.join(plan.output, key), data))
    return EvalResult(plan.output, report, rows, {k: storage.join(plan.output, k) for k in files})


def build_volume_report(cfg: MedsrConfig, plan, rows: list[dict], slabs: dict[tuple[str, str], dict],
                        seconds: float = 0.0, precision: str | None = None) -> dict[str, Any]:
    """:func:`~medsr_dist.eval.results.build_report` over the methods, with comparisons against ``bspline``
    resampling slabs (module doc) and the volume protocol's captions."""
    networks = [m for m in plan.models if m.model_file is not None or m.factory is not None]
    methods = [EvalModel(name, name, baseline=name == BASELINE) for name in INTERPOLATIONS] + networks
    report = build_report(cfg, replace(plan, models=methods), rows, seconds=seconds, precision=precision)
    p = plan.protocol
    report["models"] = [
        {"name": "trilinear", "source": "trilinear", "baseline": False, "kind": "interpolation",
         "note": "linear interpolation along the thick axis (= trilinear: the other axes are on the grid)"},
        {"name": "bspline", "source": "bspline", "baseline": True, "kind": "interpolation",
         "note": "cubic B-spline (scipy.ndimage order 3) along the thick axis; the reconstruction's starting point"},
        *({**m.describe(p), "note": f"cross-plane reconstruction, {p.fusion} fusion"} for m in networks)]
    b = cfg.eval.bootstrap
    common = [image["name"] for image in report["images"]
              if all(c["status"] == "ok" for c in image["models"].values())]

    def pooled(method: str, metric: str) -> list[float | None]:
        return [v for image in common for v in slabs.get((image, method), {}).get(metric, [])]

    comparisons = {}
    for m in (x.name for x in methods if x.name != BASELINE):
        comparisons[m] = {metric: paired_bootstrap(pooled(m, metric), pooled(BASELINE, metric), samples=b.samples,
                                                   confidence=b.confidence, seed=b.seed).to_dict()
                          for metric in ("psnr", "ssim")}
        values = [report["images"][i]["models"][m]["consistency_psnr_db"] for i, im in enumerate(report["images"])
                  if im["name"] in common]
        base = [report["images"][i]["models"][BASELINE]["consistency_psnr_db"] for i, im in enumerate(report["images"])
                if im["name"] in common]
        comparisons[m]["consistency_psnr_db"] = paired_bootstrap(values, base, samples=b.samples,
                                                                 confidence=b.confidence, seed=b.seed).to_dict()
    report.update(
        comparisons=comparisons,
        bootstrap_unit=("slab (the k fine slices of one thick slice; all volumes pooled) for PSNR/SSIM, volume for "
                        "consistency; neighbouring slabs are correlated, so the intervals are narrower than "
                        "intervals over subjects"),
        figure_caption=("Rows: axial, coronal, sagittal views through the centre of the foreground. Columns: thick-slice "
                        "input (nearest) | trilinear | cubic B-spline | models | ground truth; below each row the "
                        "outlined region magnified (where the last model and B-spline disagree most, unless configured)."),
        consistency_note=("Consistency: the output re-degraded along the thick axis with the slice profile against the "
                          "input, inside the input's mask (a safeguard against contradicting the input, not a fidelity proof)."),
        volume={"mask": "Otsu threshold of the ground truth, holes filled in 3-D", "baseline": BASELINE},
        slice_profile={image["name"]: slabs.get((image["name"], BASELINE), {}).get("slice_profile")
                       for image in report["images"]},
    )
    report["lpips"] = {**report["lpips"], "available": False, "reason": LPIPS_REASON}
    return report


def volume_lpips_status():
    return LpipsStatus(False, LPIPS_REASON)


__all__ = ["VolumePair", "VolumeScorer", "build_volume_report", "make_volume_pair", "orthogonal_views_figure",
           "run_volume_evaluation", "score_volume", "slab_scores"]
