"""Anisotropic volumes and slice pairs for training: the slice-profile model, the six pairings, SMORE pairs.

**Slice-profile model.** A thick slice of ``k`` fine voxels is a weighted sum of them: ``"box"`` (the seed's
mean downsampling: ``k`` equal weights over the slab) or ``"gaussian"`` (weights ``exp(-d^2 / 2 sigma^2)`` around
the slab centre with FWHM = ``k`` fine voxels = the thick slice's spacing, truncated at 3 sigma and renormalised
at the borders; real RF slice profiles are bell-shaped and overlap their neighbours). Both are a matrix
:func:`slice_profile_matrix` applied along one axis. Slab ``n`` is centred on fine index ``n*k + (k-1)/2``, the
geometry of :func:`medsr_dist.mri.volume.resampled_affine`. A fine axis not divisible by ``k`` loses its last
``n mod k`` voxels (:func:`crop_to_multiple`).

**Non-integer factors** (a 3.3 mm slice spacing over 1 mm in-plane voxels: ``k = 3.3``): slab ``n`` covers the
fine extent ``[n k, (n + 1) k)`` and a named profile is the :class:`~medsr_dist.mri.profile.SliceProfile` of FWHM
``k`` there (:func:`medsr_dist.mri.profile.thick_matrix`: a box gives its edge voxels their fractional overlap);
the fine axis keeps the ``ceil(floor(n / k) * k)`` voxels the slabs touch, and the interpolation back puts fine voxel ``j`` at coarse
index ``(j + 1/2) / k - 1/2``, so interpolated and fine slices of a pair are aligned exactly. An integer factor
(``4`` or ``4.0``) takes the integer path above, unchanged.

**Through-plane formulation.** A through-plane slice is low-resolution along ONE axis only, so a 2-D x``k``
network (both axes) is wrong for it. We interpolate the low-resolution axis back onto the fine grid with a cubic
B-spline (scipy.ndimage order 3, :func:`interpolate_axis`) and train a *scale-1 refinement* network on
(interpolated slice, fine slice) pairs. In-plane slices are already fine and are never touched. Every 2-D slice
handed to a network has the low-resolution axis as its **rows** (axis 0) - pairs and inference alike - so the
network meets the degradation in one direction only.

**Six pairings** (the seed's): for an isotropic volume O and each axis ``a`` (axial, coronal, sagittal normal),
the anisotropic volume degraded along ``a`` is interpolated back, and its slices along the two *other* axes (the
planes that contain ``a``) are paired with the same slices of O: coronal+sagittal with A, axial+sagittal with C,
axial+coronal with S.

**Self-supervised pairs** (SMORE): with only an anisotropic volume (low-resolution axis ``a``, factor ``k``),
its in-plane slices (along ``a``) are degraded along each of their two axes by ``k`` with the same profile,
interpolated back and paired with themselves: the network learns the through-plane degradation from in-plane
detail.

**Intensities.** A network sees slices mapped to [0, 1] by :func:`intensity_window`: the volume's range widened
by the cubic B-spline's worst-case overshoot, so no interpolated value is clipped (the identity network gives
back the interpolation exactly).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from medsr_dist.mri.profile import SliceProfile, fine_count, thick_matrix
from medsr_dist.mri.profile import upsample_matrix as spline_matrix
from medsr_dist.mri.volume import VolumeError, resampled_affine

PROFILES = ("box", "gaussian")  # named profiles; a SliceProfile object is any other (estimated) one
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def check_factor(k: float) -> int | float:
    """``k`` as an ``int`` when it is integral (the integer path), else a ``float`` (module doc).

    Raises:
        ValueError: not a finite number > 1.
    """
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise ValueError(f"factor must be a number > 1 (the thick spacing in fine voxels), got {k!r}") from None
    if not (math.isfinite(value) and value > 1.0):
        raise ValueError(f"factor must be a number > 1 (the thick spacing in fine voxels), got {k}")
    return int(value) if value.is_integer() else value


def fine_length(n: int, k: float) -> int:
    """Fine voxels of an axis of ``n`` that whole thick slices of ``k`` touch: ``n // k * k`` for an integer
    ``k``, ``ceil(floor(n / k) * k)`` otherwise (the last slab ends inside that voxel)."""
    k = check_factor(k)
    if isinstance(k, int):
        return n // k * k
    return _touched(int(math.floor(n / k + 1e-9)), k)


def _touched(n_coarse: int, k: float) -> int:
    return int(math.ceil(n_coarse * k - 1e-9))



@functools.lru_cache(maxsize=64)
def slice_profile_matrix(n_fine: int, k: int, profile: str | SliceProfile = "box") -> np.ndarray:
    """The thick-slice operator: (n_fine // k, n_fine) float64 with rows summing to 1.

    Row ``n`` weighs fine voxels around ``n*k + (k-1)/2``: ``"box"`` = 1/k over ``n*k .. n*k+k-1``; ``"gaussian"`` =
    Gaussian of FWHM ``k`` voxels truncated at 3 sigma, renormalised where it meets the border; a
    :class:`~medsr_dist.mri.profile.SliceProfile` (any width and shape, e.g. an estimate; a width other than ``k``
    is a gap or an overlap) = :func:`~medsr_dist.mri.profile.thick_matrix` with slice spacing ``k``.
    A non-integer ``k`` is always :func:`~medsr_dist.mri.profile.thick_matrix` (a named profile of FWHM ``k``).
    """
    k = check_factor(k)
    if isinstance(profile, SliceProfile):
        return thick_matrix(n_fine, float(k), profile)
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if isinstance(k, float):
        return thick_matrix(n_fine, k, SliceProfile.named(profile, k))
    n_coarse = n_fine // k
    if n_coarse < 1:
        raise ValueError(f"an axis of {n_fine} voxels is shorter than the factor {k}")
    m = np.zeros((n_coarse, n_fine))
    if profile == "box":
        for n in range(n_coarse):
            m[n, n * k:(n + 1) * k] = 1.0 / k
        return m
    sigma = k * FWHM_TO_SIGMA
    idx = np.arange(n_fine)
    for n in range(n_coarse):
        d = idx - (n * k + (k - 1) / 2.0)
        w = np.where(np.abs(d) <= 3 * sigma, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
        m[n] = w / w.sum()
    return m


@functools.lru_cache(maxsize=64)
def upsample_matrix(n_coarse: int, k: int, order: int = 3) -> np.ndarray:
    """The interpolation operator onto the fine grid: (n_coarse * k, n_coarse) float64, rows summing to 1.

    Column ``j`` is ``scipy.ndimage.zoom`` of the unit vector ``e_j`` (spline ``order`` 3 = cubic B-spline, 1 =
    linear; ``grid_mode=True`` so coarse voxel ``j`` is the centroid of fine voxels ``j*k .. j*k+k-1``;
    mirror-symmetric boundary). zoom is linear, so ``M @ x`` equals ``zoom(x)`` up to rounding. A non-integer
    ``k``: (``ceil(n_coarse * k)``, n_coarse), fine voxel ``j`` at coarse index ``(j + 1/2) / k - 1/2``
    (:func:`medsr_dist.mri.profile.upsample_matrix` with the slice spacing).
    """
    from scipy import ndimage

    k = check_factor(k)
    if n_coarse < 2:
        raise ValueError(f"cannot interpolate an axis of {n_coarse} voxel(s)")
    if isinstance(k, float):
        return spline_matrix(n_coarse, _touched(n_coarse, k), order, spacing=k)
    m = np.empty((n_coarse * k, n_coarse))
    eye = np.eye(n_coarse)
    for j in range(n_coarse):
        m[:, j] = ndimage.zoom(eye[j], k, order=order, grid_mode=True, mode="reflect")
    return m


def apply_along_axis(matrix: np.ndarray, data: np.ndarray, axis: int) -> np.ndarray:
    """``matrix`` (m, n) applied to ``data`` along ``axis`` (length n): float32 result of length m there."""
    out = np.tensordot(matrix.astype(np.float32), np.asarray(data, dtype=np.float32), axes=([1], [axis]))
    return np.moveaxis(out, 0, axis)


def crop_to_multiple(data: np.ndarray, axis: int, k: float) -> np.ndarray:
    """``data`` without the last ``n mod k`` voxels along ``axis`` (a view; :func:`fine_length`)."""
    n = fine_length(data.shape[axis], k)
    return data[(slice(None),) * axis + (slice(0, n),)]


def degrade_axis(data: np.ndarray, axis: int, k: int, profile: str | SliceProfile = "box") -> np.ndarray:
    """Thick slices along ``axis``: (.., n // k, ..) float32 via :func:`slice_profile_matrix`."""
    return apply_along_axis(slice_profile_matrix(data.shape[axis], k, profile), data, axis)


def interpolate_axis(data: np.ndarray, axis: int, k: int, order: int = 3) -> np.ndarray:
    """Back onto the fine grid along ``axis``: (.., n * k, ..) float32 (cubic B-spline for ``order=3``)."""
    return apply_along_axis(upsample_matrix(data.shape[axis], k, order), data, axis)


def overshoot(k: float, n_coarse: int, order: int = 3) -> float:
    """The interpolator's worst-case overshoot as a fraction of the input range: ``(L - 1) / 2`` with ``L`` its
    largest absolute row sum (rows sum to 1, so the positive weights sum to ``(L + 1) / 2``). A non-integer ``k``:
    the larger of the pairs' grid (:func:`upsample_matrix`) and reconstruction's (the field of view kept,
    :func:`medsr_dist.mri.profile.fine_count` voxels), so every stage maps intensities alike."""
    k = check_factor(k)
    mats = [upsample_matrix(n_coarse, k, order)]
    if isinstance(k, float):
        mats.append(spline_matrix(n_coarse, fine_count(n_coarse, k), order))
    return float(max((np.abs(m).sum(axis=1).max() - 1.0) / 2.0 for m in mats))


@dataclass(frozen=True)
class IntensityWindow:
    """Physical values <-> network values in [0, 1]: ``(v - low) / (high - low)``."""

    low: float
    high: float

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float32) - np.float32(self.low)) / np.float32(self.high - self.low))

    def to_physical(self, unit: np.ndarray) -> np.ndarray:
        return np.asarray(unit, dtype=np.float32) * np.float32(self.high - self.low) + np.float32(self.low)


def intensity_window(data: np.ndarray, k: int, n_coarse: int | None = None, order: int = 3) -> IntensityWindow:
    """The volume's [min, max] widened on both sides by :func:`overshoot` (of the range), so interpolating any
    axis of ``n_coarse`` voxels by ``k`` stays inside [0, 1]. A constant volume gets a window of width 1.

    Raises:
        VolumeError: no finite values.
    """
    finite = np.asarray(data)[np.isfinite(data)]
    if finite.size == 0:
        raise VolumeError("volume has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return IntensityWindow(lo - 0.5, lo + 0.5)
    margin = overshoot(k, max(int(n_coarse or 64), 2), order) * (hi - lo) * 1.001 + 1e-6 * (hi - lo)
    return IntensityWindow(lo - margin, hi + margin)


def lr_rows(plane: np.ndarray, lr_axis_in_plane: int) -> np.ndarray:
    """A 2-D slice with its low-resolution axis moved to the rows (axis 0)."""
    return plane if lr_axis_in_plane == 0 else plane.T


def slices_along(volume: np.ndarray, axis: int, lr_axis: int) -> Iterator[np.ndarray]:
    """The 2-D slices of ``volume`` along ``axis`` (a plane containing ``lr_axis``), low-resolution axis as rows."""
    others = [a for a in range(3) if a != axis]
    lr_in_plane = others.index(lr_axis)
    for index in range(volume.shape[axis]):
        yield lr_rows(np.take(volume, index, axis=axis), lr_in_plane)


@dataclass
class SlicePair:
    """One training pair. ``lq``/``gt``: (H, W) float32 in [0, 1] of equal shape, low-resolution axis as rows;
    ``lq`` is the interpolated degraded slice, ``gt`` the fine one. ``orientation``: ``"<plane axis>/<lr axis>"``
    (voxel axes, e.g. ``"0/2"`` = slice along i, degraded along k); ``index``: the slice's index along its axis."""

    lq: np.ndarray
    gt: np.ndarray
    orientation: str
    index: int
    degraded_axis: int
    slice_axis: int


def _foreground_level(volume: np.ndarray, window: IntensityWindow) -> float:
    """5 % of the way from the volume's minimum to its maximum, in window units: above it is 'not background'."""
    lo, hi = float(np.nanmin(volume)), float(np.nanmax(volume))
    return float(window.to_unit(np.float32(lo + 0.05 * (hi - lo))))


def supervised_pairs(volume: np.ndarray, k: int, profile: str | SliceProfile = "box", *, skip_empty: float = 0.0,
                     window: IntensityWindow | None = None) -> Iterator[SlicePair]:
    """The six pairings of an isotropic volume (see module doc): for each degraded axis ``a`` and each slice
    axis ``b != a``, every slice of the interpolated degraded volume along ``b`` with the same slice of the
    original (cropped to a multiple of ``k`` along ``a``).

    ``skip_empty``: drop pairs whose ground truth has at most this fraction of voxels above 5 % of the window
    (background slices teach nothing); "above" = 5 % of the way from the volume's minimum to its maximum. ``window``: intensity mapping (default :func:`intensity_window`).

    Raises:
        ValueError: a non-3-D volume or an axis shorter than ``2 * k``.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    if min(volume.shape) < 2 * k:
        raise ValueError(f"volume {volume.shape} has an axis shorter than 2 x factor {k}")
    window = window or intensity_window(volume, k, min(volume.shape) // k)
    level = _foreground_level(volume, window)
    for a in range(3):
        gt_vol = window.to_unit(crop_to_multiple(volume, a, k))
        lq_vol = interpolate_axis(degrade_axis(gt_vol, a, k, profile), a, k)
        for b in (x for x in range(3) if x != a):
            for index, (lq, gt) in enumerate(zip(slices_along(lq_vol, b, a), slices_along(gt_vol, b, a))):
                if skip_empty and (gt > level).mean() <= skip_empty:
                    continue
                yield SlicePair(lq, gt, f"{b}/{a}", index, degraded_axis=a, slice_axis=b)


def self_supervised_pairs(volume: np.ndarray, lr_axis: int, k: int,
                          profile: str | SliceProfile | Sequence[SliceProfile] = "box", *,
                          skip_empty: float = 0.0, window: IntensityWindow | None = None) -> Iterator[SlicePair]:
    """SMORE pairs from an anisotropic volume alone: each in-plane slice (along ``lr_axis``) degraded along each of
    its two axes by ``k`` with ``profile``, interpolated back, paired with itself. ``orientation`` ``"<lr_axis>/<d>"``
    with ``d`` the in-plane axis degraded.

    ``profile`` a sequence of profiles (an estimate's tied fits, :func:`medsr_dist.mri.profile.training_profiles`):
    they take turns by slice, ``profiles[(index + o) % len(profiles)]`` for the ``o``-th in-plane axis, so every
    profile sees slices from the whole volume in both orientations, and memory stays that of one profile.

    Raises:
        ValueError: an in-plane axis shorter than ``2 * k``, or an empty sequence of profiles.
    """
    volume = np.asarray(volume, dtype=np.float32)
    profiles = tuple(profile) if isinstance(profile, (list, tuple)) else (profile,)
    if not profiles:
        raise ValueError("no slice profile to make training pairs with")
    inplane = [a for a in range(3) if a != lr_axis]
    if min(volume.shape[a] for a in inplane) < 2 * k:
        raise ValueError(f"volume {volume.shape}: in-plane axes shorter than 2 x factor {k}")
    window = window or intensity_window(volume, k, volume.shape[lr_axis])
    level = _foreground_level(volume, window)
    unit = window.to_unit(volume)
    for o, d in enumerate(inplane):
        gt_vol = crop_to_multiple(unit, d, k)
        if len(profiles) == 1:
            lq_vol = interpolate_axis(degrade_axis(gt_vol, d, k, profiles[0]), d, k)
        else:
            lq_front = np.empty(np.moveaxis(gt_vol, lr_axis, 0).shape, np.float32)
            for j, prof in enumerate(profiles):
                take = [i for i in range(gt_vol.shape[lr_axis]) if (i + o) % len(profiles) == j]
                if take:
                    part = interpolate_axis(degrade_axis(np.take(gt_vol, take, axis=lr_axis), d, k, prof), d, k)
                    lq_front[take] = np.moveaxis(part, lr_axis, 0)
            lq_vol = np.moveaxis(lq_front, 0, lr_axis)
        for index, (lq, gt) in enumerate(zip(slices_along(lq_vol, lr_axis, d), slices_along(gt_vol, lr_axis, d))):
            if skip_empty and (gt > level).mean() <= skip_empty:
                continue
            yield SlicePair(lq, gt, f"{lr_axis}/{d}", index, degraded_axis=d, slice_axis=lr_axis)


def simulate_anisotropic(volume, axis: int, k: int, profile: str | SliceProfile = "box"):
    """An isotropic :class:`~medsr_dist.mri.volume.Volume` -> the thick-slice volume along ``axis`` (new affine
    from :func:`~medsr_dist.mri.volume.resampled_affine`, same field of view, source dtype/scaling kept)."""
    data = degrade_axis(crop_to_multiple(volume.data, axis, k), axis, k, profile)
    return volume.with_data(data, resampled_affine(volume.affine, axis, k))
