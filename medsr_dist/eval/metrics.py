"""Image-quality metrics and the bicubic baseline, on the project's array conventions.

PSNR and SSIM are basicsr's own ``calculate_psnr`` / ``calculate_ssim`` (so numbers match papers and
basicsr validation logs); this module only adapts the inputs. basicsr expects (H, W, C) arrays on a
[0, 255] scale in BGR order; medsr-dist arrays are RGB, either float in [0, 1] or native integers
(uint8, uint16 for 12/16-bit medical images) with a known ``max_value``. Both images are converted to
float64 on basicsr's [0, 255] scale (``x * 255 / max_value``; no integer arithmetic, so no uint16
overflow) and flipped to BGR. Rescaling leaves PSNR unchanged (peak and error scale together) and makes
SSIM's stabilising constants relative to ``max_value``, which is SSIM's definition for that data range.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["bicubic_downscale", "bicubic_upscale", "default_max_value", "psnr", "ssim", "to_basicsr_scale"]


def default_max_value(dtype: np.dtype) -> float:
    """Peak value of an image dtype: 1.0 for floats, the type's maximum for unsigned integers.

    Raises:
        TypeError: signed integers and other dtypes (their range is not implied; pass ``max_value``).
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    if np.issubdtype(dtype, np.unsignedinteger):
        return float(np.iinfo(dtype).max)
    raise TypeError(f"no default max_value for dtype {dtype}; pass max_value explicitly")


def to_basicsr_scale(image: np.ndarray, max_value: float | None = None) -> np.ndarray:
    """Convert an RGB image to basicsr's metric input.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) RGB, any real dtype, in [0, max_value].
        max_value: peak of ``image``'s scale; ``None`` takes :func:`default_max_value` of its dtype.

    Returns:
        (H, W, C) float64 in [0, 255], BGR channel order for 3 channels.

    Raises:
        ValueError: other shapes (e.g. RGBA: drop or composite alpha first).
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    peak = default_max_value(image.dtype) if max_value is None else float(max_value)
    if peak <= 0:
        raise ValueError(f"max_value must be > 0, got {peak}")
    return image[..., ::-1].astype(np.float64) * (255.0 / peak)


def psnr(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    crop_border: int = 0,
    test_y_channel: bool = False,
    max_value: float | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB, identical to basicsr's ``calculate_psnr``.

    Args:
        image, reference: same-shaped RGB or gray images (see :func:`to_basicsr_scale`); they may have
            different dtypes (e.g. a float model output against a uint16 ground truth).
        crop_border: pixels ignored at each edge (by convention the SR scale).
        test_y_channel: measure on the BT.601 luma (Y of YCbCr, [16, 235]) of RGB images; gray images are
            used as they are.
        max_value: peak value applied to both images; ``None``: each image's dtype default.

    Returns:
        PSNR in dB; ``inf`` for identical images (basicsr's convention).
    """
    _check_pair(image, reference)
    import medsr_dist.compat  # noqa: F401  # lazy: basicsr (after its quirks) imports torch; scoring alone needs it
    from basicsr.metrics.psnr_ssim import calculate_psnr

    return float(
        calculate_psnr(
            to_basicsr_scale(image, max_value),
            to_basicsr_scale(reference, max_value),
            crop_border=crop_border,
            input_order="HWC",
            test_y_channel=test_y_channel,
        )
    )


def ssim(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    crop_border: int = 0,
    test_y_channel: bool = False,
    max_value: float | None = None,
) -> float:
    """Structural similarity (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5), identical to basicsr's
    ``calculate_ssim``: per channel, averaged. Arguments as for :func:`psnr`.

    Returns:
        SSIM in [-1, 1]; 1.0 for identical images. Images must be larger than 10 pixels per side after
        ``crop_border`` (valid-mode filtering).
    """
    _check_pair(image, reference)
    import medsr_dist.compat  # noqa: F401  # lazy: basicsr (after its quirks) imports torch; scoring alone needs it
    from basicsr.metrics.psnr_ssim import calculate_ssim

    return float(
        calculate_ssim(
            to_basicsr_scale(image, max_value),
            to_basicsr_scale(reference, max_value),
            crop_border=crop_border,
            input_order="HWC",
            test_y_channel=test_y_channel,
        )
    )


def _check_pair(image: np.ndarray, reference: np.ndarray) -> None:
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {image.shape} vs {reference.shape}")


def bicubic_upscale(lr: np.ndarray, scale: float) -> np.ndarray:
    """The bicubic baseline an SR model must beat: OpenCV ``INTER_CUBIC`` in float32.

    Args:
        lr: (h, w) or (h, w, C) float in [0, 1].
        scale: upscaling factor.

    Returns:
        (round(h*scale), round(w*scale)[, C]) float32 clipped to [0, 1] (cubic overshoots at edges).

    Raises:
        TypeError: integer input (divide by its max value first).
    """
    _require_float(lr)
    return _resize(lr, scale, cv2.INTER_CUBIC)


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Make a low-resolution image the way SR benchmarks do ("BI" degradation): MATLAB ``imresize``
    bicubic with antialiasing (basicsr's ``matlab_functions.imresize``).

    Args:
        hr: (H, W) or (H, W, C) float in [0, 1]. Crop H and W to multiples of ``scale`` first if the LR
            must map back exactly onto the HR grid.
        scale: integer downscaling factor.

    Returns:
        (ceil(H/scale), ceil(W/scale)[, C]) float32 clipped to [0, 1].

    Raises:
        TypeError: integer input (divide by its max value first).
    """
    _require_float(hr)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    squeeze = hr.ndim == 2
    hr = hr[..., None] if squeeze else hr
    import medsr_dist.compat  # noqa: F401  # lazy: basicsr (after its quirks) imports torch
    from basicsr.utils.matlab_functions import imresize as matlab_imresize

    lr = matlab_imresize(np.ascontiguousarray(hr, dtype=np.float32), 1.0 / scale, antialiasing=True)
    lr = np.clip(lr, 0.0, 1.0).astype(np.float32, copy=False)
    return lr[..., 0] if squeeze else lr


def _require_float(image: np.ndarray) -> None:
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1], got dtype {image.dtype}")


def _resize(image: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    h, w = image.shape[:2]
    size_wh = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = cv2.resize(np.asarray(image, dtype=np.float32), size_wh, interpolation=interpolation)
    if resized.ndim < image.ndim:  # cv2 drops a single channel axis
        resized = resized[..., None]
    return np.clip(resized, 0.0, 1.0, out=resized)
