"""Slice profiles of any width and shape, thick-slice geometry with gaps and non-integer factors, and the
estimation of the profile from the thick volume alone (ESPRESO's idea, parametric).

**Profile family.** A :class:`SliceProfile` is a generalised Gaussian along the slice normal, in fine (in-plane)
voxels: ``w(x) = exp(-ln 2 * |2 x / fwhm| ** shape)``. ``shape = 2`` is a Gaussian, larger shapes are flattened
(flat-topped) Gaussians, and ``shape = inf`` is a box of width ``fwhm``; every member has full width at half
maximum ``fwhm``. A fine voxel ``j`` gets the profile's integral over its extent ``[j - 1/2, j + 1/2]`` (so a box
of 3.3 voxels gives its edge voxels 0.15 each), rows renormalised to sum 1 (also where they meet the border).

**Geometry** (:func:`thick_matrix`): thick slice ``n`` sits at fine index ``c_n = (n + 1/2) * spacing - 1/2`` (its
slab ``[n * spacing, (n + 1) * spacing)`` in voxel-edge coordinates, the geometry of
:func:`medsr_dist.mri.volume.resampled_affine` with factor ``spacing``). ``spacing`` (slice distance) and
``fwhm`` (slice thickness) are independent and need not be integers: thickness < spacing is a gap, thickness >
spacing an overlap. :func:`upsample_matrix` interpolates back onto any fine grid with a cubic B-spline; with
``n_fine = round(n * spacing)`` the field of view is kept exactly and each thick voxel's centre is the centroid of
the fine extent it covers.

**Estimation** (:func:`estimate_profile`). The through-plane axis ``a`` of a thick volume was blurred by the
unknown profile and sampled every ``spacing`` fine voxels; its in-plane axes are fine. Take planes spanned by ``a``
and an in-plane axis ``d`` and blur and sample them along ``d`` with a candidate profile (the matching
downsampling): with the right profile the plane is blurred alike both ways, so its mean power spectrum along ``a``
matches the one along ``d`` (anatomy is close to isotropic in its statistics). The fit minimises the RMS
difference of the two log10 spectra (foreground-weighted lines, mean removed, Hann window; the lowest quarter of the
band, where anatomy rather than the profile dominates, left out; an overall gain removed) over 11 widths for each
of 5 shapes (2, 3, 4, 6, box), then refines each shape's width with a bounded scalar search. The residual
(decades) is the fit quality.

**Ties.** The shape is only loosely determined: inside the band a narrower Gaussian and a wider flat-topped
profile respond alike, and on the MNI152 T1 their residuals differ by less than the residual's spread between
random choices of planes (~3 %; an earlier version took the bare minimum and its FWHM moved by -32 % .. +26 %
with the choice of planes). So every shape whose best residual is within ``TIE`` (3 %) of the best is a tie, and
among the ties the estimate is the one whose FWHM is nearest the **prior** width: the header's slice thickness
(DICOM SliceThickness) when there is one, else the slice spacing (contiguous slices, the usual 2-D
acquisition). A clearly better fit always wins over the prior; the provenance records the prior, the tied shapes
and their FWHM range. Self-supervised training does not bet on the pick: its pairs take every tied fit in turn
(:func:`training_profiles`). On an isotropic random field the fit at the true shape is unbiased (0 %, 3-D ``1/f^1.5``
field, 160^3); on the MNI152 T1 the anatomy itself moves the best width by up to ~10 % (docs/RESULTS.md).

Deterministic (a seeded choice of at most ``max_planes`` planes per in-plane axis, which also bounds memory and
time: a few seconds on the 197 x 233 x 47 thick MNI152).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)
BOX_SHAPE = math.inf
#: shapes of the coarse search grid (2 = Gaussian; inf = box)
SHAPES = (2.0, 3.0, 4.0, 6.0, BOX_SHAPE)
#: the lowest quarter of the coarse band is left out of the fit: there the anatomy, not the profile, dominates
LOW_BAND = 0.25
#: shapes whose best residual is within this fraction of the best one are tied (module doc)
TIE = 0.03
_SUB = 32  # sub-samples per fine voxel when integrating a profile


@dataclass(frozen=True)
class SliceProfile:
    """A slice profile: generalised Gaussian of ``fwhm`` fine voxels and ``shape`` (2 Gaussian, inf box)."""

    fwhm: float
    shape: float = 2.0

    def __post_init__(self) -> None:
        if not (self.fwhm > 0 and math.isfinite(self.fwhm)):
            raise ValueError(f"slice profile fwhm must be a positive number of voxels, got {self.fwhm}")
        if not self.shape > 0:
            raise ValueError(f"slice profile shape must be > 0, got {self.shape}")

    @property
    def family(self) -> str:
        if math.isinf(self.shape) or self.shape >= 40:
            return "box"
        if abs(self.shape - 2.0) <= 0.25:
            return "gaussian"
        return "flattened-gaussian" if self.shape > 2.0 else "peaked"

    @classmethod
    def named(cls, name: str, width: float) -> SliceProfile:
        """``"box"`` or ``"gaussian"`` of ``width`` fine voxels."""
        if name == "box":
            return cls(float(width), BOX_SHAPE)
        if name == "gaussian":
            return cls(float(width), 2.0)
        raise ValueError(f"profile must be 'box' or 'gaussian', got {name!r}")

    def extent(self) -> float:
        """Half-width beyond which the weights are negligible (< 1e-6 of the peak)."""
        if math.isinf(self.shape):
            return self.fwhm / 2.0
        return self.fwhm / 2.0 * (math.log(1e6) / LN2) ** (1.0 / self.shape)

    def density(self, x: np.ndarray) -> np.ndarray:
        """The profile (peak 1) at offsets ``x`` in fine voxels."""
        r = np.abs(np.asarray(x, dtype=np.float64)) * (2.0 / self.fwhm)
        if math.isinf(self.shape):
            return (r < 1.0).astype(np.float64) + 0.5 * (r == 1.0)
        return np.exp(-LN2 * r ** self.shape)

    def describe(self, fine_spacing_mm: float | None = None) -> dict:
        """For provenance: family, fwhm (voxels and, given the fine spacing, mm), shape."""
        out = {"family": self.family, "fwhm_voxels": round(self.fwhm, 4),
               "shape": "inf" if math.isinf(self.shape) else round(self.shape, 3)}
        if fine_spacing_mm is not None:
            out["fwhm_mm"] = round(self.fwhm * fine_spacing_mm, 4)
        return out


def _check_spacing(spacing: float) -> float:
    spacing = float(spacing)
    if not (spacing > 1.0 and math.isfinite(spacing)):
        raise ValueError(f"slice spacing must be > 1 fine voxel, got {spacing}")
    return spacing


def coarse_count(n_fine: int, spacing: float) -> int:
    """Thick slices whose slab fits inside ``n_fine`` fine voxels."""
    return int(math.floor(n_fine / _check_spacing(spacing) + 1e-9))


@functools.lru_cache(maxsize=128)
def thick_matrix(n_fine: int, spacing: float, profile: SliceProfile) -> np.ndarray:
    """The thick-slice operator (module doc): ``(coarse_count, n_fine)`` float64, rows summing to 1.

    Raises:
        ValueError: spacing <= 1, or an axis shorter than one slab.
    """
    spacing = _check_spacing(spacing)
    n_coarse = coarse_count(n_fine, spacing)
    if n_coarse < 1:
        raise ValueError(f"an axis of {n_fine} voxels is shorter than the slice spacing {spacing}")
    half = profile.extent() + 1.0
    m = np.zeros((n_coarse, n_fine))
    sub = (np.arange(_SUB) + 0.5) / _SUB - 0.5  # sub-sample offsets inside a voxel
    for n in range(n_coarse):
        c = (n + 0.5) * spacing - 0.5
        lo, hi = max(0, int(math.floor(c - half))), min(n_fine, int(math.ceil(c + half)) + 1)
        idx = np.arange(lo, hi)
        if math.isinf(profile.shape):  # a box: each voxel's overlap with the slab, exactly
            half_w = profile.fwhm / 2
            w = np.clip(np.minimum(idx + 0.5, c + half_w) - np.maximum(idx - 0.5, c - half_w), 0, None)
        else:
            w = profile.density(idx[:, None] + sub[None, :] - c).mean(axis=1)
        m[n, lo:hi] = w / w.sum()
    return m


@functools.lru_cache(maxsize=64)
def upsample_matrix(n_coarse: int, n_fine: int, order: int = 3, spacing: float | None = None) -> np.ndarray:
    """Cubic B-spline (``order`` 3) from ``n_coarse`` voxels onto ``n_fine`` fine voxels: fine voxel ``j`` sits at
    coarse index ``(j + 1/2) / spacing - 1/2`` (mirror boundary), ``spacing`` (fine voxels per coarse voxel)
    defaulting to ``n_fine / n_coarse`` (the same extent: the field of view kept exactly). With the true slice
    spacing instead, fine voxel ``j`` is the original grid's voxel ``j`` (training pairs of a non-integer factor:
    interpolated and fine slices aligned exactly). ``(n_fine, n_coarse)`` float64, rows summing to 1; for
    ``n_fine = k * n_coarse`` it equals :func:`medsr_dist.mri.simulate.upsample_matrix` (to 1e-6)."""
    from scipy import ndimage

    if n_coarse < 2:
        raise ValueError(f"cannot interpolate an axis of {n_coarse} voxel(s)")
    coords = (np.arange(n_fine) + 0.5) / (float(spacing) if spacing else n_fine / n_coarse) - 0.5
    m = np.empty((n_fine, n_coarse))
    eye = np.eye(n_coarse)
    for j in range(n_coarse):
        m[:, j] = ndimage.map_coordinates(eye[j], coords[None, :], order=order, mode="reflect")
    return m


def fine_count(n_coarse: int, spacing: float) -> int:
    """Fine voxels for ``n_coarse`` thick slices of ``spacing`` fine voxels: the field of view kept exactly."""
    return int(round(n_coarse * _check_spacing(spacing)))


def apply_along_axis(matrix: np.ndarray, data: np.ndarray, axis: int) -> np.ndarray:
    out = np.tensordot(matrix.astype(np.float32), np.asarray(data, dtype=np.float32), axes=([1], [axis]))
    return np.moveaxis(out, 0, axis)


def degrade(data: np.ndarray, axis: int, spacing: float, profile: SliceProfile) -> np.ndarray:
    """Thick slices along ``axis`` (float32), trailing fine voxels that do not fill a slab dropped."""
    return apply_along_axis(thick_matrix(data.shape[axis], float(spacing), profile), data, axis)


def interpolate(data: np.ndarray, axis: int, n_fine: int, order: int = 3) -> np.ndarray:
    return apply_along_axis(upsample_matrix(data.shape[axis], int(n_fine), order), data, axis)


# --------------------------------------------------------------------------------------------- estimation
@dataclass(frozen=True)
class ProfileEstimate:
    """The estimated profile, its residual (RMS of the log10 spectra's difference, decades; lower is better), the
    residuals of the best Gaussian and best box (to judge how much the shape is determined), the prior width that
    broke a tie and the FWHM range of the tied fits (module doc)."""

    profile: SliceProfile
    residual: float
    spacing: float
    gaussian_residual: float
    box_residual: float
    best_residual: float = math.nan
    prior_fwhm: float = math.nan
    tied: tuple[SliceProfile, ...] = ()

    def provenance(self, fine_spacing_mm: float | None = None) -> dict:
        scale = fine_spacing_mm or 1.0
        out = {"method": "estimate (spectrum match, generalised Gaussian)", **self.profile.describe(fine_spacing_mm),
               "residual_log10": round(self.residual, 5), "gaussian_residual_log10": round(self.gaussian_residual, 5),
               "box_residual_log10": round(self.box_residual, 5), "slice_spacing_voxels": round(self.spacing, 4)}
        if self.tied:
            widths = [p.fwhm * scale for p in self.tied]
            out.update(best_residual_log10=round(self.best_residual, 5), tie_tolerance=TIE,
                       prior_fwhm_voxels=round(self.prior_fwhm, 4), tied_families=sorted({p.family for p in self.tied}),
                       tied_fwhm_range=[round(min(widths), 4), round(max(widths), 4)])
        if len(self.tied) > 1:  # what training_profiles() makes the self-supervised pairs with
            out.update(tied_profiles=[p.describe(fine_spacing_mm) for p in self.tied],
                       training_pairs="every tied fit, taking turns by slice")
        return out


def _log_spectrum(lines: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean power spectrum (log10) of the rows, each detrended and Hann-windowed."""
    x = lines - lines.mean(axis=1, keepdims=True)
    x = x * np.hanning(x.shape[1])[None, :]
    p = (np.abs(np.fft.rfft(x, axis=1)) ** 2 * weights[:, None]).sum(axis=0) / max(weights.sum(), 1e-12)
    return np.log10(p + 1e-12 * p.max())


@dataclass
class _Target:
    planes: list[tuple[np.ndarray, np.ndarray]]  # per in-plane axis d: (planes (m, n_a, n_d), foreground (m, n_a, n_d))


def _prepare(data: np.ndarray, lr_axis: int, spacing: float, max_planes: int, seed: int) -> _Target:
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        raise ValueError("volume has no finite values")
    lo, hi = float(data[finite].min()), float(data[finite].max())
    data = np.where(finite, data, lo)
    mask = (data > lo + 0.1 * (hi - lo)).astype(np.float32)
    rng = np.random.default_rng(seed)
    planes = []
    for d in (a for a in range(3) if a != lr_axis):
        e = 3 - lr_axis - d
        if coarse_count(data.shape[d], spacing) < 8:
            continue
        order = [e, lr_axis, d]
        stack, fg = np.transpose(data, order), np.transpose(mask, order)
        keep = np.flatnonzero(fg.mean(axis=(1, 2)) >= 0.05)
        if len(keep) > max_planes:
            keep = np.sort(rng.choice(keep, max_planes, replace=False))
        if len(keep):
            planes.append((np.ascontiguousarray(stack[keep]), np.ascontiguousarray(fg[keep])))
    if not planes or data.shape[lr_axis] < 8:
        raise ValueError(f"too few voxels to estimate the slice profile: shape {data.shape}, through-plane axis "
                         f"{lr_axis}, slice spacing {spacing:.3g} in-plane voxels (need >= 8 slices both ways)")
    return _Target(planes)


def _residual(t: _Target, spacing: float, profile: SliceProfile) -> float:
    """Blur and sample each (through-plane, in-plane) plane along its in-plane axis: with the right profile the
    result is blurred alike both ways, so its spectra along the two axes match. Every plane is cropped to one
    common square (the in-plane axes may give different numbers of coarse samples)."""
    diffs = []
    n = min(min(planes.shape[1], coarse_count(planes.shape[2], spacing)) for planes, _ in t.planes)
    for planes, fg in t.planes:
        m = thick_matrix(planes.shape[2], spacing, profile).T.astype(np.float32)
        y = planes @ m  # (m, n_a, n_coarse)
        w = (fg @ (m > 0).astype(np.float32)) / np.float32(max(1.0, (m > 0).sum(axis=0).max()))
        a0, d0 = (y.shape[1] - n) // 2, (y.shape[2] - n) // 2
        y, w = y[:, a0:a0 + n, d0:d0 + n], w[:, a0:a0 + n, d0:d0 + n]
        along_a = np.swapaxes(y, 1, 2).reshape(-1, n)
        wa = np.swapaxes(w, 1, 2).reshape(-1, n).mean(axis=1)
        along_d = y.reshape(-1, n)
        wd = w.reshape(-1, n).mean(axis=1)
        diff = _log_spectrum(along_d, wd) - _log_spectrum(along_a, wa)
        diffs.append(diff)
    diff = np.mean(diffs, axis=0)
    diff = diff[max(1, int(LOW_BAND * len(diff))):]
    diff = diff - diff.mean()  # an overall gain (the anatomy's power along an axis) is not the profile
    return float(np.sqrt(np.mean(diff ** 2)))


def estimate_profile(data: np.ndarray, lr_axis: int, spacing: float, *, thickness: float | None = None,
                     max_planes: int = 32, seed: int = 0) -> ProfileEstimate:
    """Estimate the slice profile of a thick volume (module doc).

    Args:
        data: the thick volume (3-D).
        lr_axis: its through-plane axis.
        spacing: slice spacing in in-plane voxels (through-plane spacing / in-plane spacing; need not be an integer).
        thickness: the header's slice thickness in in-plane voxels, if known: the prior width that breaks ties
            (default: ``spacing``, contiguous slices).
        max_planes: planes sampled per in-plane axis (bounds the work; a fixed ``seed`` keeps it deterministic).

    Raises:
        ValueError: a volume too small to estimate from.
    """
    spacing = _check_spacing(spacing)
    prior = float(thickness) if thickness and thickness > 0 else spacing
    t = _prepare(data, lr_axis, spacing, max_planes, seed)
    widths = spacing * np.linspace(0.5, 2.0, 11)
    best: dict[float, tuple[float, float]] = {}
    for shape in SHAPES:  # each shape's best width: grid, then a bounded refinement
        r0, w0 = min((_residual(t, spacing, SliceProfile(float(w), shape)), float(w)) for w in widths)
        best[shape] = _refine(t, spacing, shape, w0, widths[1] - widths[0], r0)
    top = min(r for _, r in best.values())
    tied = {shape: wr for shape, wr in best.items() if wr[1] <= top * (1.0 + TIE)}
    shape, (w, r) = min(tied.items(), key=lambda kv: (abs(math.log(kv[1][0] / prior)), kv[1][1]))
    return ProfileEstimate(SliceProfile(w, shape), r, spacing, gaussian_residual=best[2.0][1],
                           box_residual=best[BOX_SHAPE][1], best_residual=top, prior_fwhm=prior,
                           tied=tuple(SliceProfile(wr[0], s) for s, wr in sorted(tied.items())))


def _refine(t: _Target, spacing: float, shape: float, w0: float, step: float, r0: float) -> tuple[float, float]:
    from scipy.optimize import minimize_scalar

    lo, hi = max(w0 - step, 0.2), w0 + step
    res = minimize_scalar(lambda w: _residual(t, spacing, SliceProfile(float(w), shape)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-3 * spacing})
    if res.fun < r0:
        return float(res.x), float(res.fun)
    return w0, r0



def resolve_profile(name: str, data: np.ndarray, spacing, lr_axis: int, factor: int,
                    thickness_mm: float | None = None) -> tuple[str | SliceProfile, dict]:
    """The profile a thick volume's training pairs and consistency check use, and its provenance record.

    ``name`` ``"estimate"``: :func:`estimate_profile` of ``data`` with the slice spacing from the voxel sizes
    (``spacing``, mm: the through-plane one over the mean in-plane one; a header ``thickness_mm`` is the prior that
    breaks ties between shapes); the record gives family, FWHM (in-plane voxels and mm), shape, fit residuals and
    the ties. ``"box"``/``"gaussian"`` with a header slice thickness
    (``thickness_mm``: DICOM SliceThickness; the spacing comes from the slice positions) that differs from the
    spacing: that profile with FWHM = the thickness, a gap (thinner) or an overlap (thicker) simulated as such.
    A volume too small to estimate from (fewer than 8 slices either way)
    gets the Gaussian of width ``factor``, its record saying why (``estimate_failed``). Deterministic: every stage
    that resolves the same volume gets the same profile. ``"box"``/``"gaussian"``: as named, width ``factor`` voxels.
    """
    spacing = [float(s) for s in spacing]
    inplane = float(np.mean([s for a, s in enumerate(spacing) if a != lr_axis]))
    if name != "estimate":
        if thickness_mm and abs(float(thickness_mm) - spacing[lr_axis]) > 1e-3 * spacing[lr_axis]:
            profile = SliceProfile.named(name, float(thickness_mm) / inplane)
            return profile, {"method": "given", **profile.describe(inplane), "from": "header slice thickness",
                             "slice_thickness_mm": float(thickness_mm), "slice_spacing_mm": spacing[lr_axis]}
        return name, {"method": "given", "family": name, "fwhm_voxels": float(factor)}
    prior = float(thickness_mm) / inplane if thickness_mm else None  # the header's thickness breaks ties
    try:
        est = estimate_profile(data, lr_axis, spacing[lr_axis] / inplane, thickness=prior)
    except ValueError as exc:  # too small to estimate from: say so in the record and use the Gaussian
        return "gaussian", {"method": "given", "family": "gaussian", "fwhm_voxels": float(factor),
                            "estimate_failed": str(exc)}
    return est.profile, est.provenance(inplane)


def training_profiles(profile: str | SliceProfile, record: dict) -> str | SliceProfile | tuple[SliceProfile, ...]:
    """What a thick volume's self-supervised training pairs are made with: every tied fit of an estimate (the
    record's ``tied_profiles``; :func:`~medsr_dist.mri.simulate.self_supervised_pairs` gives them turns by slice),
    else ``profile``, the one :func:`resolve_profile` chose (which the consistency check always uses).

    Why: the shape among the ties is not determined by the thick volume (module doc), and a network trained on the
    one picked by the prior pays for a wrong pick; trained on all of them it pays less. On the full MNI152 T1 made
    4 mm thick (700 iterations, against being told the true profile; docs/RESULTS.md): box slices -0.38 dB with
    the tie-broken estimate, -0.17 dB with every tied fit; Gaussian -0.28 / -0.27; flattened (shape 4) +0.01 /
    -0.11: the worst case of the three goes from -0.38 to -0.27 dB.
    """
    tied = record.get("tied_profiles") or []
    if len(tied) < 2:
        return profile
    return tuple(_from_description(d) for d in tied)


def _from_description(d: dict) -> SliceProfile:
    return SliceProfile(float(d["fwhm_voxels"]), math.inf if d["shape"] == "inf" else float(d["shape"]))


def profile_from_record(record: dict) -> str | SliceProfile:
    """The profile a :func:`resolve_profile` record describes (what a later stage re-degrades with)."""
    if record.get("method") == "given" and "shape" not in record:
        return str(record["family"])
    return _from_description(record)
