"""Image-quality metrics and the bicubic baseline, on the project's array conventions.

PSNR is basicsr's own ``calculate_psnr`` and SSIM its ``calculate_ssim`` with the Gaussian window applied as two
1-D passes (equal to 1e-9, so numbers match papers and basicsr validation logs); this module adapts the inputs.
basicsr expects (H, W, C) arrays on a [0, 255] scale in BGR order; medsr-dist arrays are RGB, either float in [0, 1] or native integers
(uint8, uint16 for 12/16-bit medical images) with a known ``max_value``. Both images are converted to
float64 on basicsr's [0, 255] scale (``x * 255 / max_value``; no integer arithmetic, so no uint16
overflow) and flipped to BGR. Rescaling leaves PSNR unchanged (peak and error scale together) and makes
SSIM's stabilising constants relative to ``max_value``, which is SSIM's definition for that data range.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["bicubic_downscale", "bicubic_upscale", "default_max_value", "haarpsi", "niqe", "psnr", "ssim",
           "to_basicsr_scale"]


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
    """Structural similarity (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5), basicsr's ``calculate_ssim``:
    per channel, averaged. Arguments as for :func:`psnr`.

    The same steps as basicsr's (its crop, its Y conversion, float64, the valid part of each filtered map), with
    the 11x11 Gaussian window applied as the two 1-D passes it factors into instead of one 2-D pass: equal to
    ``calculate_ssim`` to about 1e-15 (float64 summation order; tests hold it to 1e-9) at a fifth of the cost
    (SSIM was a third of the evaluation's scoring time).

    Returns:
        SSIM in [-1, 1]; 1.0 for identical images. Images must be larger than 10 pixels per side after
        ``crop_border`` (valid-mode filtering).
    """
    _check_pair(image, reference)
    import medsr_dist.compat  # noqa: F401  # lazy: basicsr (after its quirks) imports torch; scoring alone needs it
    from basicsr.metrics.metric_util import to_y_channel

    a, b = to_basicsr_scale(image, max_value), to_basicsr_scale(reference, max_value)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border, ...]
        b = b[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        a, b = to_y_channel(a), to_y_channel(b)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return float(np.mean([_ssim_channel(np.ascontiguousarray(a[..., c]), np.ascontiguousarray(b[..., c]))
                          for c in range(a.shape[2])]))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    """basicsr's ``_ssim`` of one channel on [0, 255], with the window's separable form (cv2.sepFilter2D, the same
    border handling; only the valid part, 5 pixels in from each edge, is kept)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.sepFilter2D(x, -1, kernel, kernel)[5:-5, 5:-5]

    mu1, mu2 = blur(a), blur(b)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = blur(a ** 2) - mu1_sq
    sigma2_sq = blur(b ** 2) - mu2_sq
    sigma12 = blur(a * b) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


# ------------------------------------------------------------------------------------------------------------
# HaarPSI (Reisenhofer, Bosse, Kutyniok & Wiegand, Signal Processing: Image Communication 2018)
# ------------------------------------------------------------------------------------------------------------
HAARPSI_C = 30.0  # the paper's constant, for images on [0, 255]
HAARPSI_ALPHA = 4.2


def _conv_same(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """MATLAB ``conv2(image, kernel, 'same')`` with zero padding (the authors' reference is MATLAB's): for an even
    kernel side k the window of output (i, j) covers rows/columns i-k/2+1 .. i+k/2."""
    k = kernel.shape[0]
    before = (k - 1) // 2 if k % 2 else k // 2 - 1
    # correlation with the flipped kernel is convolution; the anchor places the window, BORDER_CONSTANT pads zeros
    return cv2.filter2D(image, cv2.CV_64F, np.ascontiguousarray(kernel[::-1, ::-1]), anchor=(before, before),
                        borderType=cv2.BORDER_CONSTANT)


def _haar_coefficients(luma: np.ndarray, scales: int) -> list[np.ndarray]:
    """Horizontal then vertical Haar responses for each scale: [h1, v1, h2, v2, ...]."""
    out = []
    for scale in range(1, scales + 1):
        k = 2 ** scale
        haar = np.full((k, k), 2.0 ** -scale)
        haar[: k // 2] *= -1
        out += [_conv_same(luma, haar), _conv_same(luma, haar.T)]
    return out


def haarpsi(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    crop_border: int = 0,
    max_value: float | None = None,
    subsample: bool = True,
    scales: int = 3,
) -> float:
    """Haar wavelet-based perceptual similarity index (HaarPSI), as the authors' reference implementation
    (MATLAB ``HaarPSI.m``; https://github.com/rgcda/haarpsi) computes it, on RGB (YIQ) or gray images.

    Among the full-reference metrics that track radiologists' judgements best (Kastryulin et al., IEEE Access 2023).
    Steps: images on a [0, 255] scale; RGB -> YIQ; 2x2 mean subsampling (``subsample``); Haar filters of sides 2, 4
    and 8 on the luma; local similarity of the two finest scales' magnitudes, weighted by the coarsest; chroma
    similarity of the 2x2 mean magnitudes of I and Q; logistic pooling with C = 30, alpha = 4.2.

    Args:
        image, reference: same-shaped (H, W[, 1 or 3]) RGB or gray images in [0, ``max_value``].
        crop_border: pixels ignored at each edge (cropped before anything else).
        max_value: peak of the scale; ``None``: the dtype's (1.0 for floats).

    Returns:
        HaarPSI in [0, 1]; 1.0 for identical images.

    Raises:
        ValueError: different shapes, or an image smaller than the largest Haar filter (16 pixels with subsampling).
    """
    _check_pair(image, reference)
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
        reference = reference[crop_border:-crop_border, crop_border:-crop_border]
    a = to_basicsr_scale(image, max_value)[..., ::-1]  # back to RGB, [0, 255] float64
    b = to_basicsr_scale(reference, max_value)[..., ::-1]
    smallest = 2 ** (scales + (1 if subsample else 0))
    if min(a.shape[:2]) < smallest:
        raise ValueError(f"HaarPSI needs images of at least {smallest}x{smallest} pixels, got {a.shape[1]}x{a.shape[0]}")
    colour = a.shape[2] == 3
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def channels(x: np.ndarray) -> list[np.ndarray]:
        x = x @ yiq.T if colour else x
        planes = [np.ascontiguousarray(x[:, :, c]) for c in range(x.shape[2])]
        if subsample:  # MATLAB: conv2(x, ones(2)/4, 'same') then every other pixel from the first
            planes = [_conv_same(p, np.full((2, 2), 0.25))[::2, ::2] for p in planes]
        return planes

    pa, pb = channels(a), channels(b)
    ca, cb = _haar_coefficients(pa[0], scales), _haar_coefficients(pb[0], scales)
    c = HAARPSI_C

    def similarity(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (2 * x * y + c) / (x * x + y * y + c)

    coarse = 2 * (scales - 1)
    weights, local = [], []
    for o in range(2):  # horizontal, vertical
        weights.append(np.maximum(np.abs(ca[coarse + o]), np.abs(cb[coarse + o])))
        local.append((similarity(np.abs(ca[o]), np.abs(cb[o])) + similarity(np.abs(ca[2 + o]), np.abs(cb[2 + o]))) / 2)
    if colour:
        mean2 = np.full((2, 2), 0.25)
        iq = [similarity(np.abs(_conv_same(pa[k], mean2)), np.abs(_conv_same(pb[k], mean2))) for k in (1, 2)]
        local.append((iq[0] + iq[1]) / 2)
        weights.append((weights[0] + weights[1]) / 2)
    w, s = np.stack(weights), np.stack(local)
    pooled = float(np.sum(w / (1.0 + np.exp(-HAARPSI_ALPHA * s))) / np.sum(w))
    return float((np.log(pooled / (1.0 - pooled)) / HAARPSI_ALPHA) ** 2)


def niqe(image: np.ndarray, *, crop_border: int = 0, max_value: float | None = None) -> float:
    """NIQE (Mittal et al. 2013), the no-reference naturalness score, as basicsr's ``calculate_niqe`` computes it
    (its pristine model ``niqe_pris_params.npz`` ships in the basicsr wheel: nothing is downloaded) on the luma.
    Lower is more natural. Images must hold at least two of NIQE's 96x96 blocks.
    """
    base = to_basicsr_scale(image, max_value)
    h, w = (n - 2 * crop_border for n in base.shape[:2])
    if (h // 96) * (w // 96) < 2:  # its covariance is over blocks: one block has none
        raise ValueError(f"NIQE needs at least two 96x96 blocks (e.g. 192x96 pixels after crop_border), got {w}x{h}")
    import medsr_dist.compat  # noqa: F401  # lazy: basicsr (after its quirks) imports torch; scoring alone needs it
    from basicsr.metrics.niqe import calculate_niqe

    gray = base.shape[2] == 1
    return float(calculate_niqe(base if not gray else base[:, :, 0], crop_border=crop_border,
                                input_order="HWC" if not gray else "HW", convert_to="y"))


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
