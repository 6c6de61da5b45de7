"""3-D evaluation: PSNR/SSIM inside a foreground mask, and the interpolation baselines a reconstruction must beat.

* Mask: Otsu's threshold (skimage) of the reference volume, holes filled in 3-D (scipy): the head, not the air
  around it, which would otherwise dominate and flatter every method. :func:`foreground_mask` also takes a fixed
  threshold.
* PSNR: ``10 log10(R^2 / MSE)`` with MSE over the mask and ``R`` = the reference's range (max - min over the whole
  volume) unless given.
* SSIM: skimage's ``structural_similarity`` on the 3-D volumes (7^3 Gaussian-free uniform window, its defaults)
  with the same data range; the SSIM map averaged over the mask.
* Baselines: the thick-slice volume interpolated back along its low-resolution axis, linear (= trilinear here:
  the other axes are already on the grid) and cubic B-spline (scipy.ndimage order 3): the same operator the
  reconstruction starts from (:func:`medsr_dist.mri.simulate.interpolate_axis`).
"""
from __future__ import annotations

import numpy as np

from medsr_dist.mri.simulate import interpolate_axis

BASELINES = {"trilinear": 1, "bspline": 3}


def foreground_mask(reference: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Boolean mask of ``reference`` > threshold (Otsu's when None), 3-D holes filled.

    Raises:
        ValueError: the mask is empty (a constant volume).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    ref = np.asarray(reference, dtype=np.float32)
    level = float(threshold_otsu(ref)) if threshold is None else float(threshold)
    mask = ndimage.binary_fill_holes(ref > level)
    if not mask.any():
        raise ValueError(f"empty foreground mask (threshold {level:g}); is the reference constant?")
    return mask


def _range(reference: np.ndarray, data_range: float | None) -> float:
    r = float(np.max(reference) - np.min(reference)) if data_range is None else float(data_range)
    if r <= 0:
        raise ValueError("data range must be > 0")
    return r


def psnr_3d(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
            data_range: float | None = None) -> float:
    """PSNR in dB over the mask (all voxels when None); ``inf`` for identical volumes.

    Raises:
        ValueError: shapes differ.
    """
    pred, reference = np.asarray(pred, np.float64), np.asarray(reference, np.float64)
    if pred.shape != reference.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs reference {reference.shape}")
    r = _range(reference, data_range)
    diff = (pred - reference)[mask] if mask is not None else pred - reference
    mse = float(np.mean(diff ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(r * r / mse)


def ssim_3d(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
            data_range: float | None = None) -> float:
    """Mean 3-D SSIM (skimage, 7^3 window) over the mask (all voxels when None)."""
    from skimage.metrics import structural_similarity

    pred, reference = np.asarray(pred, np.float64), np.asarray(reference, np.float64)
    if pred.shape != reference.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs reference {reference.shape}")
    _, smap = structural_similarity(reference, pred, data_range=_range(reference, data_range), full=True)
    return float(smap[mask].mean() if mask is not None else smap.mean())


def interpolation_baseline(thick: np.ndarray, axis: int, k: int, method: str = "bspline") -> np.ndarray:
    """The thick-slice volume back on the fine grid along ``axis``: ``"trilinear"`` or ``"bspline"`` (cubic)."""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {sorted(BASELINES)}, got {method!r}")
    return interpolate_axis(thick, axis, k, order=BASELINES[method])


def score(candidates: dict[str, np.ndarray], reference: np.ndarray, mask: np.ndarray | None = None,
          data_range: float | None = None, with_ssim: bool = True) -> dict[str, dict[str, float]]:
    """``{name: {"psnr": dB, "ssim": ...}}`` for each candidate volume against ``reference`` inside ``mask``
    (default :func:`foreground_mask` of the reference)."""
    mask = foreground_mask(reference) if mask is None else mask
    r = _range(reference, data_range)
    out = {}
    for name, pred in candidates.items():
        out[name] = {"psnr": psnr_3d(pred, reference, mask, r)}
        if with_ssim:
            out[name]["ssim"] = ssim_3d(pred, reference, mask, r)
    return out
