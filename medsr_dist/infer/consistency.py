"""The consistency score: how far an enhanced image agrees with what was measured.

Contract: :func:`consistency_psnr` (output area-downsampled back onto the input grid vs the input, dB); the same
number for the nightly job, Serve and eval.
"""
from __future__ import annotations

import math

import numpy as np


def consistency_psnr(output: np.ndarray, source: np.ndarray) -> float:
    """Our safeguard against invented detail: PSNR (dB) between the output area-downsampled back to the
    input grid and the input. High: the enhancement agrees with what was measured; low: it changed it.

    Args:
        output: (H', W'[, C]) float in [0, 1], or (F, H', W', C) for F frames (the mean squared error of all
            frames together).
        source: (H, W[, C]) float in [0, 1], same channels; (F, H, W, C) with ``output``'s F.

    Returns:
        PSNR in dB with peak 1.0 (the same number as basicsr's ``calculate_psnr``; ``inf`` for identical
        images). Computed here rather than through :mod:`medsr_dist.eval.metrics`, whose basicsr import would cost
        every encode worker seconds of start-up.
    """
    if np.ndim(output) == 4:
        if np.shape(source)[0] != np.shape(output)[0]:
            raise ValueError(f"output has {np.shape(output)[0]} frames, source {np.shape(source)[0]}")
        mse = float(np.mean([frame_mse(o, s) for o, s in zip(output, source)]))
    else:
        mse = frame_mse(output, source)
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def frame_mse(output: np.ndarray, source: np.ndarray) -> float:
    import cv2  # heavy: only encode workers score

    h, w = source.shape[:2]
    down = cv2.resize(np.asarray(output, np.float32), (w, h), interpolation=cv2.INTER_AREA)
    if down.ndim == 2:
        down = down[:, :, None]
    diff = down.astype(np.float64) - np.asarray(source, np.float64).reshape(down.shape)
    return float(np.mean(diff * diff))
