"""Classic bicubic "BI" training pairs (SRGAN / ESRGAN / PSNR-oriented families) as a Ray Data stage.

Per sample: random ``gt_size`` crop (+ optional horizontal flip) of the prepared image, optional Gaussian blur
(sigma drawn from ``degradation.bicubic.blur_sigma``; the "BD" variant of the SR benchmarks), bicubic
downsampling by the model's scale (MATLAB ``imresize`` through basicsr, antialiased, as the DIV2K/benchmark LR
images are made; or OpenCV ``INTER_CUBIC``), optional Gaussian noise (std drawn from
``degradation.bicubic.noise_sigma`` in 8-bit grey levels). Every sample is seeded from (run seed, image key,
epoch) like the second-order pipeline, so pairs are the same on any actor, in any order, after a resume.

Arrays: ``gt`` (3, gt_size, gt_size) and ``lq`` (3, gt_size/scale, gt_size/scale), float32 in [0, 1], RGB.
The LQ is not quantised (float, like basicsr's on-the-fly ``imresize``).
"""
from __future__ import annotations

import cv2
import numpy as np

import medsr_dist.compat  # noqa: F401  (makes basicsr importable)
from basicsr.utils.matlab_functions import imresize

from medsr_dist.config import BicubicConfig, DegradationConfig
from medsr_dist.data.degrade import decode_training_image, random_crop, sample_seed


def degrade_bicubic(gt: np.ndarray, cfg: BicubicConfig, scale: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] -> (H/scale, W/scale, 3) float32 in [0, 1]: blur, bicubic down, noise.

    Raises:
        ValueError: H or W not divisible by ``scale``.
    """
    h, w = gt.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"ground truth {h}x{w} is not divisible by the scale {scale}")
    img = gt
    sigma = float(rng.uniform(*cfg.blur_sigma)) if cfg.blur_sigma[1] > 0 else 0.0
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    if cfg.kernel == "matlab":
        lq = imresize(np.ascontiguousarray(img, dtype=np.float32), 1.0 / scale, antialiasing=True)
    else:
        lq = cv2.resize(img, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    noise = float(rng.uniform(*cfg.noise_sigma)) if cfg.noise_sigma[1] > 0 else 0.0
    if noise > 0:
        lq = lq + rng.normal(0.0, noise / 255.0, lq.shape).astype(np.float32)
    return np.clip(lq, 0, 1).astype(np.float32)


class BicubicDegradation:
    """Ray Data stage (callable class, run in an actor pool): prepared rows -> BI training pairs.

    In: a batch with ``image`` (PNG bytes), ``key`` (str) and ``epoch`` (int) columns.
    Out: ``lq`` (N, 3, h, w) and ``gt`` (N, 3, H, W) float32 in [0, 1], plus ``key``.
    """

    def __init__(self, cfg: DegradationConfig, scale: int, run_seed: int):
        if cfg.gt_size % scale:
            raise ValueError(f"degradation.gt_size ({cfg.gt_size}) must be divisible by model.scale ({scale})")
        self.cfg, self.scale, self.run_seed = cfg, scale, run_seed
        cv2.setNumThreads(1)  # one sample at a time per actor; parallelism comes from the actor pool

    def degrade_one(self, data: bytes, key: str, epoch: int) -> dict:
        rng = np.random.default_rng(sample_seed(self.run_seed, key, epoch))
        gt = random_crop(decode_training_image(data), self.cfg.gt_size, rng, self.cfg.use_hflip)
        return {"gt": gt, "lq": degrade_bicubic(gt, self.cfg.bicubic, self.scale, rng)}

    def __call__(self, batch: dict) -> dict:
        results = [self.degrade_one(d, str(k), int(e)) for d, k, e in zip(batch["image"], batch["key"], batch["epoch"])]
        chw = lambda name: np.stack([r[name].transpose(2, 0, 1) for r in results]).astype(np.float32)  # noqa: E731
        return {"lq": chw("lq"), "gt": chw("gt"), "key": np.asarray(batch["key"])}
