"""Evaluation protocols of the papers: how a source image becomes a (ground truth, model input) pair.

A :class:`Protocol` is a small frozen description (sizes, kernels, blur, metric settings) with one job,
:meth:`Protocol.make_pair`. The named presets in :data:`PRESETS` follow the papers' text; every parameter
can be overridden (``eval.params.<key>=...``), and the report prints the parameters that were used.

Steps, in order (all images float32 (H, W, C) in [0, 1], RGB or gray, as :func:`medsr_dist.io.image.decode_image`
returns them):

1. *source check*: with ``source_size`` set, the source must be ``source_size`` x ``source_size`` (NIH
   ChestX-ray14 images are 1024 x 1024); anything else is an error for that image, not a silent resize.
2. *ground truth*: resized to ``hr_size`` x ``hr_size`` with ``hr_resize`` (``none`` requires it to be that
   size already), or, with ``hr_size`` null, the source modcropped to a multiple of ``scale`` (top-left, as
   basicsr's ``mod_crop``).
3. *model input*: the ground truth (``lr_from: hr``) or the source (``lr_from: source``) resized to
   ground truth / ``scale`` with ``downsample`` (``matlab``: basicsr's MATLAB-compatible antialiased bicubic,
   the classic-benchmark "BI" degradation; ``opencv``: ``cv2.resize`` ``INTER_CUBIC``, no antialiasing), then
   a Gaussian blur of ``blur_sigma`` (kernel ``2*ceil(3*sigma)+1``, reflect-101 borders) when > 0, clipped
   to [0, 1], then quantized like a real low-resolution image file (``lr_quantization``): ``source`` (default)
   rounds it to the source's own levels (255 for 8-bit, 4095 for a 12-bit DICOM, 65535 for 16-bit: the papers'
   pairs are 8-bit PNG files of 8-bit sources), ``8bit`` to 255 levels whatever the source, ``none`` keeps float32.
   The ground truth is not re-quantized.
4. *metrics*: PSNR/SSIM (basicsr's) with ``crop_border`` and ``test_y_channel``.

The parameters, their rules and the presets are declared in :mod:`medsr_dist.config.protocols` (the config
validates them before any Ray work); this module adds what a protocol does with an image.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsr_dist.config import protocols as parameters
from medsr_dist.config.protocols import VOLUME_PRESETS, VolumeProtocol
from medsr_dist.eval.metrics import bicubic_downscale

__all__ = ["PRESETS", "VOLUME_PRESETS", "Protocol", "ProtocolError", "ProtocolPair", "VolumeProtocol", "resolve_protocol"]


class ProtocolError(ValueError):
    """An image cannot be evaluated under a protocol (wrong size, too small); the message says why."""


@dataclass(frozen=True)
class ProtocolPair:
    """What a protocol makes of one source image.

    Attributes:
        hr: (H, W, C) float32 in [0, 1], the ground truth.
        lr: (H / scale, W / scale, C) float32 in [0, 1], the model input.
    """

    hr: np.ndarray
    lr: np.ndarray


@dataclass(frozen=True)
class Protocol(parameters.ProtocolParameters):
    """An evaluation protocol; see the module docstring for what each parameter does."""

    # -- the pair ---------------------------------------------------------------------------------------
    def make_pair(self, source: np.ndarray, source_levels: int | None = None) -> ProtocolPair:
        """Ground truth and model input for one source image.

        Args:
            source: (H, W) or (H, W, C) float in [0, 1], C in {1, 3, 4} (alpha is dropped).
            source_levels: the source's largest stored value (``2**bits - 1``: 255, 4095, 65535), which
                ``lr_quantization: source`` rounds the input to; None: unknown, the input is then not rounded
                under ``source`` (callers that decode a file always know it).

        Returns:
            The pair, both (h, w, C) float32 with C in {1, 3}.

        Raises:
            ProtocolError: the source has the wrong size, or is too small for the scale.
            TypeError: integer input (decode to float first).
        """
        if self.lr_from in parameters.GIVEN_LR:
            raise ProtocolError(f"lr_from {self.lr_from!r} makes no synthetic input: use given_pair")
        source = np.asarray(source)
        if not np.issubdtype(source.dtype, np.floating):
            raise TypeError(f"expected a float image in [0, 1], got dtype {source.dtype}")
        if source.ndim == 2:
            source = source[:, :, None]
        if source.ndim != 3 or source.shape[2] not in (1, 3, 4):
            raise ProtocolError(f"expected an (H, W, C) image with C in {{1, 3, 4}}, got shape {source.shape}")
        source = np.ascontiguousarray(source[:, :, :3], dtype=np.float32)
        h, w = source.shape[:2]
        if self.source_size is not None and (h, w) != (self.source_size, self.source_size):
            raise ProtocolError(
                f"{self.name} expects {self.source_size}x{self.source_size} source images, got {w}x{h} "
                f"(set eval.params.source_size=null to accept any size)"
            )
        hr = self._ground_truth(source)
        if self.lr_from == "hr":
            lr = _downsample(hr, self.scale, self.downsample)
        else:
            lr = _resize_to(source, hr.shape[0] // self.scale, hr.shape[1] // self.scale, self.downsample)
        if self.blur_sigma > 0:
            lr = gaussian_blur(lr, self.blur_sigma)
        lr = np.clip(lr, 0.0, 1.0).astype(np.float32, copy=False)
        levels = {"source": source_levels, "8bit": 255, "none": None}[self.lr_quantization]
        if levels is not None:
            if levels < 1:
                raise ValueError(f"source_levels must be >= 1, got {levels}")
            lr = (np.rint(lr * np.float32(levels)) / np.float32(levels)).astype(np.float32)
        return ProtocolPair(hr=hr, lr=lr)

    def given_pair(self, lr: np.ndarray, hr: np.ndarray | None = None, names: tuple[str, str] = ("ground truth", "input")
                   ) -> ProtocolPair:
        """``lr_from: paired`` / ``no_reference``: the input is a real low-resolution file, kept exactly as decoded
        (no resize, blur or rounding); the ground truth (None without one) must be exactly ``scale`` times its size.

        Args:
            lr, hr: (h, w[, C]) float in [0, 1] as :func:`medsr_dist.io.image.decode_image` returns them (alpha dropped).
            names: the two files' names, for messages.

        Returns:
            The pair; without a ground truth ``hr`` is an empty (0, 0, C) array.

        Raises:
            ProtocolError: sizes not in the ratio ``scale``, or different channel counts.
        """
        lr = self._plain(lr, names[1])
        if hr is None:
            return ProtocolPair(hr=np.zeros((0, 0, lr.shape[2]), np.float32), lr=lr)
        hr = self._plain(hr, names[0])
        (H, W, C), (h, w, c) = hr.shape, lr.shape
        if (H, W) != (h * self.scale, w * self.scale):
            raise ProtocolError(f"{names[0]} is {W}x{H} and {names[1]} is {w}x{h}: the ground truth must be exactly "
                                f"x{self.scale} the low-resolution file ({w * self.scale}x{h * self.scale})")
        if C != c:
            raise ProtocolError(f"{names[0]} has {C} channel(s) and {names[1]} {c}: they must match")
        if self.source_size is not None and (H, W) != (self.source_size, self.source_size):
            raise ProtocolError(f"{self.name} expects {self.source_size}x{self.source_size} ground truths, got {W}x{H} "
                                f"({names[0]}; set eval.params.source_size=null to accept any size)")
        return ProtocolPair(hr=hr, lr=lr)

    @staticmethod
    def _plain(image: np.ndarray, name: str) -> np.ndarray:
        image = np.asarray(image)
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"{name}: expected a float image in [0, 1], got dtype {image.dtype}")
        image = image[:, :, None] if image.ndim == 2 else image
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ProtocolError(f"{name}: expected an (H, W, C) image with C in {{1, 3, 4}}, got shape {image.shape}")
        return np.ascontiguousarray(image[:, :, :3], dtype=np.float32)

    def _ground_truth(self, source: np.ndarray) -> np.ndarray:
        h, w = source.shape[:2]
        if self.hr_size is None:
            hh, ww = h - h % self.scale, w - w % self.scale
            if hh < self.scale or ww < self.scale:
                raise ProtocolError(f"image {w}x{h} is smaller than the scale {self.scale}")
            return source[:hh, :ww]
        size = self.hr_size
        if (h, w) == (size, size):
            return source
        if self.hr_resize == "none":
            raise ProtocolError(f"{self.name} expects {size}x{size} images, got {w}x{h} (set eval.params.hr_resize)")
        import cv2

        flag = {"lanczos": cv2.INTER_LANCZOS4, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}[self.hr_resize]
        return _as_hwc(np.clip(cv2.resize(source, (size, size), interpolation=flag), 0.0, 1.0))


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image  # cv2 drops a single channel axis


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float32 blurred with an isotropic Gaussian: kernel side ``2*ceil(3*sigma)+1``, reflect-101."""
    import cv2

    k = 2 * math.ceil(3 * sigma) + 1
    return _as_hwc(cv2.GaussianBlur(image, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101))


def _downsample(image: np.ndarray, scale: int, kernel: str) -> np.ndarray:
    h, w = image.shape[:2]
    if h // scale < 1 or w // scale < 1:
        raise ProtocolError(f"image {w}x{h} is too small for x{scale} downsampling")
    if kernel == "matlab":
        return _as_hwc(bicubic_downscale(image, scale))
    return _resize_to(image, h // scale, w // scale, "opencv")


def _resize_to(image: np.ndarray, height: int, width: int, kernel: str) -> np.ndarray:
    h, w = image.shape[:2]
    if height < 1 or width < 1:
        raise ProtocolError(f"image {w}x{h} is too small to resize to {width}x{height}")
    if kernel == "matlab":
        factor = height / h
        if not math.isclose(width / w, factor):
            raise ProtocolError(f"MATLAB bicubic needs one factor for both axes; {w}x{h} -> {width}x{height} has two")
        import medsr_dist.compat  # noqa: F401  # lazy: must precede basicsr; both import torch
        from basicsr.utils.matlab_functions import imresize

        return _as_hwc(np.clip(imresize(np.ascontiguousarray(image), factor, antialiasing=True), 0.0, 1.0))
    import cv2

    return _as_hwc(cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC))


#: The named protocols. Configs ``configs/eval_<name>.yaml`` select them and may override any parameter.
PRESETS: dict[str, Protocol] = {name: Protocol(**dataclasses.asdict(p)) for name, p in parameters.PRESETS.items()}


def resolve_protocol(name: str, overrides: Mapping[str, Any] | None = None) -> Protocol | VolumeProtocol:
    """The preset ``name`` (2-D :data:`PRESETS` or volume :data:`VOLUME_PRESETS`) with ``overrides`` applied.

    Raises:
        ValueError: unknown preset (the message lists them) or invalid parameters.
    """
    resolved = parameters.resolve_protocol_parameters(name, overrides)
    if isinstance(resolved, VolumeProtocol):
        return resolved
    return Protocol(**dataclasses.asdict(resolved))
