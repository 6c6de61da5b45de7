"""Real-ESRGAN's second-order degradation, per sample on CPU, as a Ray Data stage.

This is the synthesis of ``RealESRGANDataset.__getitem__`` (kernels) and
``RealESRGANModel.feed_data`` (blur, resize, noise, JPEG, twice, then the final sinc/JPEG in
random order) moved out of the training step into the data pipeline. The random draws follow the
same distributions; basicsr's kernel and noise functions are used as they are. Differences, on
purpose: the pipeline runs per sample in numpy/OpenCV (real libjpeg instead of DiffJPEG: the two differ by
~1.4-3.6/255 on average at quality 30-95, about half of JPEG's own error, see tests/test_degradation.py; cv2
bilinear/bicubic and an adaptive-pooling ``area`` equal to torch's ``F.interpolate`` with ``size=``), the
first-order resize maps the image extent exactly (feed_data's ``scale_factor=f`` samples at ``(x+0.5)/f-0.5``,
which stretches the content by up to ~2 pixels at the far edge of a 256-pixel crop), and the GT is cropped to
``gt_size`` before degradation instead of degrading a 400-pixel crop and cropping afterwards. Kernels,
``filter2D`` and the noise draws are basicsr's own (parity tests in tests/test_degradation.py).

Every sample is seeded from (run seed, image key, epoch): the same sample always degrades the same
way, on any actor, in any order.

Medical archives, on purpose too: a gray source gets gray noise only (``gray_noise_prob`` null: 1.0 for gray
images, Real-ESRGAN's 0.4 for colour ones: a radiograph never has chroma noise), and the LQ is quantized to
the source's significant bits (``lq_quantization: source``; the prepared PNG's ``sBIT`` says them), because
inference feeds a 12-bit CT as 12-bit values, not 8-bit ones. For such sources the 8-bit libjpeg round trip
adds its error (JPEG(x) - round8(x): block and ringing artefacts) to the unquantized image instead of
replacing it with 8-bit values. An 8-bit colour source degrades exactly as Real-ESRGAN's pipeline.

Arrays: ``gt``/``gt_usm`` (3, gt_size, gt_size) and ``lq`` (3, gt_size/scale, gt_size/scale),
float32 in [0, 1], RGB.
"""
from __future__ import annotations

import hashlib
import math
import random

import cv2
import numpy as np

import medsr_dist.compat  # noqa: F401  (makes basicsr importable)
from basicsr.data.degradations import (
    circular_lowpass_kernel,
    random_add_gaussian_noise,
    random_add_poisson_noise,
    random_mixed_kernels,
)
from basicsr.utils.img_process_util import usm_sharp

from medsr_dist.config import DegradationConfig, Range
from medsr_dist.data.prepare import significant_bits

_RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def sample_seed(run_seed: int, key: str, epoch: int) -> int:
    """A 32-bit seed that depends only on the run seed, the sample's key and the epoch."""
    digest = hashlib.blake2b(f"{run_seed}|{key}|{epoch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def training_image_info(data: bytes) -> tuple[int, bool]:
    """(significant bits, gray) of a prepared PNG: its ``sBIT`` chunk (else its bit depth) and whether it is
    stored as one gray channel."""
    data = bytes(data)
    return significant_bits(data), data[25] in (0, 4)


def decode_training_image(data: bytes) -> np.ndarray:
    """PNG bytes (8/16-bit, gray or RGB) of a prepared dataset -> float32 (H, W, 3) in [0, 1], RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("prepared image bytes could not be decoded")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


class KernelSampler:
    """Draws the three kernels of one sample exactly as ``RealESRGANDataset.__getitem__`` does."""

    def __init__(self, cfg: DegradationConfig):
        self.cfg = cfg
        self.max_size = max(cfg.blur_kernel_size, cfg.blur_kernel_size2)
        # kernel sizes 7, 9, ..., 21 as in Real-ESRGAN
        self.kernel_range = [2 * v + 1 for v in range(3, self.max_size // 2 + 1)]
        self.pulse = np.zeros((self.max_size, self.max_size), np.float32)
        self.pulse[self.max_size // 2, self.max_size // 2] = 1

    def _blur_kernel(self, sinc_prob, kernel_list, kernel_prob, sigma, betag, betap) -> tuple[np.ndarray, str]:
        kernel_size = random.choice(self.kernel_range)
        if np.random.uniform() < sinc_prob:
            omega_c = np.random.uniform(np.pi / 3, np.pi) if kernel_size < 13 else np.random.uniform(np.pi / 5, np.pi)
            kernel, kind = circular_lowpass_kernel(omega_c, kernel_size, pad_to=False), "sinc"
        else:
            # random_mixed_kernels draws the type with random.choices(kernel_list, kernel_prob)
            state = random.getstate()
            kind = random.choices(kernel_list, kernel_prob)[0]
            random.setstate(state)
            kernel = random_mixed_kernels(
                kernel_list, kernel_prob, kernel_size, sigma, sigma, [-math.pi, math.pi], betag, betap, noise_range=None
            )
        pad = (self.max_size - kernel_size) // 2
        return np.pad(kernel, ((pad, pad), (pad, pad))).astype(np.float32), kind

    def sample(self) -> dict:
        c = self.cfg
        k1, kind1 = self._blur_kernel(c.sinc_prob, c.kernel_list, c.kernel_prob, c.blur_sigma, c.betag_range, c.betap_range)
        k2, kind2 = self._blur_kernel(
            c.sinc_prob2, c.kernel_list2, c.kernel_prob2, c.blur_sigma2, c.betag_range2, c.betap_range2
        )
        if np.random.uniform() < c.final_sinc_prob:
            size = random.choice(self.kernel_range)
            omega_c = np.random.uniform(np.pi / 3, np.pi)
            sinc, final = circular_lowpass_kernel(omega_c, size, pad_to=self.max_size).astype(np.float32), True
        else:
            sinc, final = self.pulse, False
        return {"kernel1": k1, "kind1": kind1, "kernel2": k2, "kind2": kind2, "sinc": sinc, "final_sinc": final}


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # basicsr.utils.img_process_util.filter2D: correlation with reflect padding (== BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _area(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch's ``F.interpolate(mode="area")``, i.e. adaptive average pooling: output pixel i averages input pixels
    ``floor(i*H/h)`` to ``ceil((i+1)*H/h) - 1`` (OpenCV's INTER_AREA weights fractional pixels instead, and is
    bilinear when enlarging)."""
    for axis, (n_in, n_out) in enumerate(((img.shape[0], h), (img.shape[1], w))):
        if n_in == n_out:
            continue
        i = np.arange(n_out)
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        cs = np.cumsum(img, axis=axis, dtype=np.float64)
        cs = np.concatenate([np.zeros_like(np.take(cs, [0], axis=axis)), cs], axis=axis)
        shape = [1] * img.ndim
        shape[axis] = n_out
        img = ((np.take(cs, end, axis=axis) - np.take(cs, start, axis=axis)) / (end - start).reshape(shape)).astype(np.float32)
    return img


def _resize(img: np.ndarray, size_hw: tuple[int, int], mode: str) -> np.ndarray:
    """``F.interpolate(img, size=size_hw, mode=mode)`` as feed_data calls it (align_corners False, no antialias):
    cv2's bilinear/bicubic agree with torch's within 0.002/255, ``area`` is torch's adaptive pooling exactly."""
    h, w = max(1, size_hw[0]), max(1, size_hw[1])
    out = _area(img, h, w) if mode == "area" else cv2.resize(img, (w, h), interpolation=_RESIZE_MODES[mode])
    return out if out.ndim == 3 else out[:, :, None]


def _jpeg(img: np.ndarray, quality: float, keep_depth: bool = False) -> np.ndarray:
    """Real JPEG round trip at ``quality`` on an RGB float image (libjpeg expects BGR), clipped to [0, 1].

    ``keep_depth``: return ``img + (JPEG(img) - round8(img))``, the JPEG's error on the unquantized image (for
    sources of more than 8 bits: artefacts without the 8-bit staircase)."""
    clipped = np.clip(img, 0, 1)
    bgr8 = (cv2.cvtColor(clipped, cv2.COLOR_RGB2BGR) * 255.0).round().astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", bgr8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV JPEG encoding failed")
    out = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    if keep_depth:
        error = out - cv2.cvtColor(bgr8, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        out = np.clip(clipped + error, 0, 1)
    return out


def random_add_poisson_noise_rgb(img: np.ndarray, scale_range: Range, gray_prob: float) -> np.ndarray:
    """basicsr's ``random_add_poisson_noise`` (clipped, not rounded) on an RGB image: the numpy version takes the
    gray level of a BGR image (``cv2.COLOR_BGR2GRAY``), so the channels are reversed around it, giving the
    luminance feed_data's torch version uses (``rgb_to_grayscale``). The random draws are unchanged."""
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    out = random_add_poisson_noise(bgr, scale_range=scale_range, gray_prob=gray_prob, clip=True, rounds=False)
    return np.ascontiguousarray(out[:, :, ::-1])


def gray_noise_prob(cfg: DegradationConfig, stage: int, gray: bool) -> float:
    """``gray_noise_prob`` (stage 1) / ``gray_noise_prob2`` (stage 2); null: 1.0 for gray sources, 0.4 (Real-ESRGAN)
    for colour ones."""
    value = getattr(cfg, "gray_noise_prob" if stage == 1 else "gray_noise_prob2")
    return value if value is not None else (1.0 if gray else 0.4)


def _resize_noise_jpeg(out, c: DegradationConfig, stage: int, target_hw=None, ori_hw=None, scale=None, log=None,
                       gray: bool = False):
    """One degradation order's resize + noise (+ JPEG in the first order), drawn as feed_data draws them."""
    suffix = "" if stage == 1 else "2"
    resize_prob = getattr(c, f"resize_prob{suffix}")
    resize_range = getattr(c, f"resize_range{suffix}")
    updown = random.choices(["up", "down", "keep"], resize_prob)[0]
    factor = (np.random.uniform(1, resize_range[1]) if updown == "up"
              else np.random.uniform(resize_range[0], 1) if updown == "down" else 1.0)
    mode = random.choice(list(_RESIZE_MODES))
    h, w = out.shape[:2]
    if stage == 1:
        out = _resize(out, (int(h * factor), int(w * factor)), mode)
    else:
        out = _resize(out, (int(ori_hw[0] / scale * factor), int(ori_hw[1] / scale * factor)), mode)
    gray_prob = gray_noise_prob(c, stage, gray)
    if np.random.uniform() < getattr(c, f"gaussian_noise_prob{suffix}"):
        out = random_add_gaussian_noise(out, sigma_range=getattr(c, f"noise_range{suffix}"), clip=True, rounds=False, gray_prob=gray_prob)
        noise = "gaussian"
    else:
        out = random_add_poisson_noise_rgb(out, getattr(c, f"poisson_scale_range{suffix}"), gray_prob)
        noise = "poisson"
    if log is not None:
        log[f"resize{stage}"], log[f"noise{stage}"] = updown, noise
    return out.astype(np.float32)


def degrade_second_order(gt: np.ndarray, cfg: DegradationConfig, scale: int, seed: int, *, bits: int = 8,
                         gray: bool = False) -> dict:
    """Degrade one GT crop. ``gt`` float32 (H, W, 3) in [0, 1], H and W divisible by ``scale``.

    ``bits``: the source's significant bits (1-16); with ``lq_quantization: source`` the LQ lies on the
    ``1 / (2**bits - 1)`` grid (and, above 8 bits, JPEG keeps the depth, see :func:`_jpeg`). ``gray``: the source
    is gray (its three channels are equal), which sets the default ``gray_noise_prob`` to 1.0.

    Returns ``{"gt", "gt_usm", "lq"}`` as float32 (H, W, 3) / (H/scale, W/scale, 3) in [0, 1], plus
    ``"log"``: which random branches were taken (kernel kinds, sinc use, JPEG use) for statistics.
    """
    random.seed(seed)
    np.random.seed(seed)
    c = cfg
    kernels = KernelSampler(c).sample()
    log = {"kind1": kernels["kind1"], "kind2": kernels["kind2"], "final_sinc": kernels["final_sinc"]}
    gt_usm = np.clip(usm_sharp(gt), 0, 1).astype(np.float32) if c.usm_sharpen_gt else gt
    ori_hw = gt.shape[:2]

    # ----- first order (Real-ESRGAN degrades the USM-sharpened GT) -----
    out = _filter(gt_usm, kernels["kernel1"])
    levels = (1 << bits) - 1 if c.lq_quantization == "source" else 255
    deep = levels > 255
    out = _resize_noise_jpeg(out, c, 1, log=log, gray=gray)
    out = _jpeg(out, np.random.uniform(*c.jpeg_range), deep)

    # ----- second order -----
    log["blur2"] = bool(np.random.uniform() < c.second_blur_prob)
    if log["blur2"]:
        out = _filter(out, kernels["kernel2"])
    out = _resize_noise_jpeg(out, c, 2, ori_hw=ori_hw, scale=scale, log=log, gray=gray)

    # ----- final: [resize back + sinc] and JPEG, in random order -----
    lq_hw = (ori_hw[0] // scale, ori_hw[1] // scale)
    if np.random.uniform() < 0.5:
        out = _filter(_resize(out, lq_hw, random.choice(list(_RESIZE_MODES))), kernels["sinc"])
        out = _jpeg(out, np.random.uniform(*c.jpeg_range2), deep)
        log["order"] = "sinc-then-jpeg"
    else:
        out = _jpeg(out, np.random.uniform(*c.jpeg_range2), deep)
        out = _filter(_resize(out, lq_hw, random.choice(list(_RESIZE_MODES))), kernels["sinc"])
        log["order"] = "jpeg-then-sinc"
    lq = (np.clip(out, 0, 1) * levels).round() / levels
    return {"gt": gt, "gt_usm": gt_usm, "lq": lq.astype(np.float32), "log": log}


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """Reflect-pad to at least ``size`` (as RealESRGANDataset does), random ``size``x``size`` crop, optional flip."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_REFLECT_101)
        h, w = img.shape[:2]
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = img[top:top + size, left:left + size]
    if hflip and rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


class SecondOrderDegradation:
    """Ray Data stage (callable class, run in an actor pool): prepared rows -> training pairs.

    In: a batch with ``image`` (PNG bytes), ``key`` (str) and ``epoch`` (int) columns.
    Out: ``lq`` (N, 3, h, w), ``gt`` and ``gt_usm`` (N, 3, H, W) float32 in [0, 1], plus ``key``.
    """

    def __init__(self, cfg: DegradationConfig, scale: int, run_seed: int):
        if cfg.gt_size % scale:
            raise ValueError(f"degradation.gt_size ({cfg.gt_size}) must be divisible by model.scale ({scale})")
        self.cfg, self.scale, self.run_seed = cfg, scale, run_seed
        cv2.setNumThreads(1)  # one sample at a time per actor; parallelism comes from the actor pool

    def degrade_one(self, data: bytes, key: str, epoch: int) -> dict:
        seed = sample_seed(self.run_seed, key, epoch)
        bits, gray = training_image_info(data)
        crop = random_crop(decode_training_image(data), self.cfg.gt_size, np.random.default_rng(seed), self.cfg.use_hflip)
        return degrade_second_order(crop, self.cfg, self.scale, seed, bits=bits, gray=gray)

    def __call__(self, batch: dict) -> dict:
        results = [self.degrade_one(d, str(k), int(e)) for d, k, e in zip(batch["image"], batch["key"], batch["epoch"])]
        chw = lambda name: np.stack([r[name].transpose(2, 0, 1) for r in results]).astype(np.float32)  # noqa: E731
        return {"lq": chw("lq"), "gt": chw("gt"), "gt_usm": chw("gt_usm"), "key": np.asarray(batch["key"])}


def decode_training_pair(gt_data: bytes, lq_data: bytes) -> tuple[np.ndarray, np.ndarray]:
    return decode_training_image(gt_data), decode_training_image(lq_data)


class PairedCrop:
    """Ray Data stage for paired datasets (real LR/HR pairs, no synthesis): aligned random crops.

    In: ``image`` (GT PNG), ``lq_image`` (LQ PNG), ``key``, ``epoch``. Out: the same columns as
    :class:`SecondOrderDegradation` (``gt_usm`` is the USM-sharpened GT, as in Real-ESRGAN's paired model).
    """

    def __init__(self, cfg: DegradationConfig, scale: int, run_seed: int):
        if cfg.gt_size % scale:
            raise ValueError(f"degradation.gt_size ({cfg.gt_size}) must be divisible by model.scale ({scale})")
        self.cfg, self.scale, self.run_seed = cfg, scale, run_seed
        cv2.setNumThreads(1)

    def crop_one(self, gt_data: bytes, lq_data: bytes, key: str, epoch: int) -> dict:
        gt, lq = decode_training_pair(gt_data, lq_data)
        s, size = self.scale, self.cfg.gt_size
        if gt.shape[0] != lq.shape[0] * s or gt.shape[1] != lq.shape[1] * s:
            raise ValueError(f"{key}: pair is {gt.shape[:2]} / {lq.shape[:2]}, not x{s} (model.scale)")
        lq_size = size // s
        if lq.shape[0] < lq_size or lq.shape[1] < lq_size:
            raise ValueError(f"{key}: low-resolution image {lq.shape[:2]} smaller than the crop {lq_size}")
        rng = np.random.default_rng(sample_seed(self.run_seed, key, epoch))
        top, left = rng.integers(0, lq.shape[0] - lq_size + 1), rng.integers(0, lq.shape[1] - lq_size + 1)
        lq_c = lq[top:top + lq_size, left:left + lq_size]
        gt_c = gt[top * s:top * s + size, left * s:left * s + size]
        if self.cfg.use_hflip and rng.uniform() < 0.5:
            lq_c, gt_c = lq_c[:, ::-1], gt_c[:, ::-1]
        gt_c, lq_c = np.ascontiguousarray(gt_c), np.ascontiguousarray(lq_c)
        gt_usm = np.clip(usm_sharp(gt_c), 0, 1).astype(np.float32) if self.cfg.usm_sharpen_gt else gt_c
        return {"gt": gt_c, "gt_usm": gt_usm, "lq": lq_c}

    def __call__(self, batch: dict) -> dict:
        results = [self.crop_one(g, q, str(k), int(e))
                   for g, q, k, e in zip(batch["image"], batch["lq_image"], batch["key"], batch["epoch"])]
        chw = lambda name: np.stack([r[name].transpose(2, 0, 1) for r in results]).astype(np.float32)  # noqa: E731
        return {"lq": chw("lq"), "gt": chw("gt"), "gt_usm": chw("gt_usm"), "key": np.asarray(batch["key"])}


def preview_grid(image: np.ndarray, cfg: DegradationConfig, scale: int, n: int = 15, seed: int = 0,
                 columns: int = 4) -> np.ndarray:
    """A grid of ``n`` second-order degradations of one crop, with the ground-truth crop first.

    ``image`` float32 (H, W, C) in [0, 1]. Each low-quality sample is shown nearest-upscaled to the crop
    size. Returns uint8 (rows*gt_size, columns*gt_size, 3) RGB.
    """
    rgb = image if image.shape[2] == 3 else np.repeat(image[:, :, :1], 3, axis=2)
    crop = random_crop(rgb.astype(np.float32), cfg.gt_size, np.random.default_rng(seed), hflip=False)
    size = cfg.gt_size
    tiles = [crop] + [
        cv2.resize(degrade_second_order(crop, cfg, scale, sample_seed(seed, "preview", i), gray=image.shape[2] == 1)["lq"],
                   (size, size),
                   interpolation=cv2.INTER_NEAREST)
        for i in range(n)
    ]
    rows = -(-len(tiles) // columns)
    grid = np.ones((rows * size, columns * size, 3), np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = tile
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
